"""Which endpoints want an event, and queueing the HTTP messages that carry events to them.

A delivery's body is fixed when it is queued, and so is its ``webhook-id``: ``msg_<event id>`` for one event,
``msg_batch_<first event id>`` for a batch, so a retry, a restart or a replay presents the receiver with the id it
may already have seen. Queueing is idempotent: an event handed over twice (JetStream redelivers after a crash)
finds its delivery queued (``dedupe_key``). That holds for batches too because a batch never spans two groups of
events (two stream messages): a redelivered message is cut into the same batches, under the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from esp.v1 import events_pb2
from google.protobuf import json_format

from libs.common.telemetry import current_traceparent

__all__ = ["Route", "batch_body", "event_document", "queue_events", "routes_of"]


@dataclass(frozen=True)
class Route:
    """An enabled endpoint as the queueing sees it."""

    endpoint_id: str
    tenant_id: str
    event_types: frozenset[str]
    tags: frozenset[str]
    max_batch_size: int

    def wants(self, event: events_pb2.Event) -> bool:
        """Whether the endpoint's filters let ``event`` through (tags filter message events only)."""
        if self.event_types and event.type not in self.event_types:
            return False
        return not (self.tags and event.message and self.tags.isdisjoint(event.tags))


def event_id_of(event: events_pb2.Event) -> str:
    """The id in the event's name (``events/{id}``)."""
    return str(event.name).removeprefix("events/")


def event_document(event: events_pb2.Event) -> dict[str, Any]:
    """One event as a webhook body (Standard Webhooks' suggested shape: type, timestamp, data)."""
    return {"type": event.type, "timestamp": event.event_time.ToJsonString(),
            "data": json_format.MessageToDict(event)}


def _dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def batch_body(events: Sequence[events_pb2.Event], now: datetime | None = None) -> bytes:
    """Several events in one body: ``{"type": "batch", "timestamp": …, "data": [event documents]}``."""
    return _dumps({"type": "batch", "timestamp": (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
                   "data": [event_document(e) for e in events]})


async def routes_of(conn: psycopg.AsyncConnection, tenant_ids: Iterable[str]) -> dict[str, list[Route]]:
    """The enabled endpoints of these tenants."""
    cur = await conn.execute(
        """SELECT id, tenant_id, event_types, tags, max_batch_size FROM webhooks.endpoints
           WHERE tenant_id = ANY(%b) AND enabled ORDER BY id""", (sorted(set(tenant_ids)),))
    routes: dict[str, list[Route]] = {}
    for endpoint_id, tenant_id, types, tags, batch in await cur.fetchall():
        routes.setdefault(tenant_id, []).append(Route(endpoint_id, tenant_id, frozenset(types), frozenset(tags),
                                                      batch))
    return routes


class _Documents:
    """Each event's JSON made once, however many endpoints receive it."""

    def __init__(self) -> None:
        self._documents: dict[str, bytes] = {}

    def _document(self, event: events_pb2.Event) -> bytes:
        document = self._documents.get(event.name)
        if document is None:
            document = self._documents[event.name] = _dumps(event_document(event))
        return document

    def body(self, event: events_pb2.Event) -> bytes:
        """The body of a delivery of ``event`` alone."""
        return self._document(event)

    def batch_body(self, events: Sequence[events_pb2.Event]) -> bytes:
        """The body of a batch (as :func:`batch_body`), from the events' documents."""
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return b'{"type":"batch","timestamp":"' + stamp.encode() + b'","data":[' + b",".join(
            self._document(e) for e in events) + b"]}"


@dataclass
class _Rows:
    endpoint_ids: list[str]
    tenant_ids: list[str]
    webhook_ids: list[str]
    dedupe_keys: list[str]
    event_types: list[str]
    bodies: list[bytes]
    forced: list[bool]

    def add(self, route: Route, webhook_id: str, dedupe_key: str, types: Iterable[str], body: bytes,
            forced: bool) -> None:
        self.endpoint_ids.append(route.endpoint_id)
        self.tenant_ids.append(route.tenant_id)
        self.webhook_ids.append(webhook_id)
        self.dedupe_keys.append(dedupe_key)
        # A text[] per row travels as one '{a,b}' literal: unnest cannot take a two-dimensional ragged array.
        self.event_types.append("{" + ",".join(sorted(set(types))) + "}")
        self.bodies.append(body)
        self.forced.append(forced)


async def queue_events(conn: psycopg.AsyncConnection, routes: Mapping[str, Sequence[Route]],
                       groups: Sequence[tuple[str, Sequence[events_pb2.Event]]], *, replay_key: str = "",
                       forced: bool = False) -> int:
    """Queue the events of each group to its tenant's endpoints that want them, in the caller's transaction;
    return how many deliveries were queued now.

    Args:
        routes: tenant → endpoints.
        groups: (tenant, events in the order to deliver them): what arrived together, e.g. one stream message. A
            batch takes events of one group only, so the same group always yields the same batches.
        replay_key: for a replay (or a test event): makes each delivery new even though its webhook-id was sent
            before; batching endpoints then batch the replayed events among themselves.
        forced: deliver even while the endpoint is disabled (a test event).
    """
    rows = _Rows([], [], [], [], [], [], [])
    documents = _Documents()
    for tenant_id, tenant_events in groups:
        for route in routes.get(tenant_id, ()):
            wanted = [e for e in tenant_events if route.wants(e)]
            if not wanted:
                continue
            if route.max_batch_size <= 1:
                for event in wanted:
                    webhook_id = f"msg_{event_id_of(event)}"
                    rows.add(route, webhook_id, replay_key + webhook_id, (event.type,), documents.body(event),
                             forced)
                continue
            for start in range(0, len(wanted), route.max_batch_size):
                chunk = wanted[start:start + route.max_batch_size]
                webhook_id = f"msg_batch_{event_id_of(chunk[0])}"
                rows.add(route, webhook_id, replay_key + webhook_id, (e.type for e in chunk),
                         documents.batch_body(chunk), forced)
    if not rows.endpoint_ids:
        return 0
    cur = await conn.execute(
        """INSERT INTO webhooks.deliveries (endpoint_id, tenant_id, webhook_id, dedupe_key, event_types, body,
               ignore_disabled, traceparent)
           SELECT e, t, w, k, types::text[], b, f, %s
           FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::boolean[])
               AS u(e, t, w, k, types, b, f)
           ON CONFLICT (endpoint_id, dedupe_key) DO NOTHING""",
        (current_traceparent() or None, rows.endpoint_ids, rows.tenant_ids, rows.webhook_ids, rows.dedupe_keys,
         rows.event_types, rows.bodies, rows.forced))
    return cur.rowcount
