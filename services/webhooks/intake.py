"""The dispatcher's intake: two durable consumers of the EVENTS stream — recorded message events
(``esp.notify.<tenant>``, published by reports with their sequence) and account notifications
(``esp.account.<tenant>``) — whose batches become queued deliveries in one transaction each, acked after the
commit (at-least-once; queueing is idempotent, see :mod:`services.webhooks.queueing`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from esp.internal.v1 import queue_pb2
from esp.v1 import events_pb2
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from libs.common.consumer_lag import watch_consumer_lag
from libs.common.event_types import ACCOUNT_EVENT_TYPES
from libs.common.jetstream import Topology, ensure_pull_consumer, pull_loop
from services.webhooks.queueing import queue_events, routes_of

__all__ = ["EventIntake", "account_event"]

log = logging.getLogger(__name__)

DELIVERIES_QUEUED = Counter("esp_webhook_deliveries_queued_total", "Webhook deliveries queued", ["source"])


def account_event(note: queue_pb2.AccountEvent) -> events_pb2.Event | None:
    """An account notification as customers see it; None for a kind customers are not told about."""
    event_type = ACCOUNT_EVENT_TYPES.get(note.kind)
    if event_type is None:
        return None
    event = events_pb2.Event(name=f"events/{note.event_id}", type=event_type, attributes=note.attributes,
                             campaign=note.attributes.get("campaign", ""))
    event.event_time.CopyFrom(note.event_time)
    return event


class EventIntake:
    """Consumes recorded events and account notifications into the delivery queue."""

    def __init__(self, pool: AsyncConnectionPool, nc: NATS, topology: Topology, *, batch: int = 500,
                 on_queued: Callable[[], None] = lambda: None) -> None:
        self._pool = pool
        self._nc = nc
        self._topology = topology
        self._batch = batch
        self._on_queued = on_queued

    async def _ensure(self, durable: str, subject: str) -> None:
        await ensure_pull_consumer(self._nc.jetstream(), self._topology.events_stream, durable, subject,
                                   ack_wait_s=60.0, max_ack_pending=20_000)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume both subjects until ``stop`` is set."""
        consumers = ((self._topology.consumer("webhooks"), self._topology.notify_wildcard),
                     (self._topology.consumer("webhooks-account"), self._topology.account_wildcard))
        for durable, subject in consumers:
            await self._ensure(durable, subject)
        await asyncio.gather(
            *(pull_loop(self._nc, self._topology.events_stream, durable, self.handle_batch, stop, batch=self._batch,
                        idle_timeout_s=0.5)
              for durable, _ in consumers),
            watch_consumer_lag(self._nc.jetstream(), [(self._topology.events_stream, d) for d, _ in consumers], stop))

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Queue one fetched batch's deliveries, then ack it."""
        groups: list[tuple[str, list[events_pb2.Event]]] = []
        for msg in msgs:
            try:
                tenant_id, decoded = self._decode(msg)
            except DecodeError:
                log.error("dropping an undecodable event", extra={"subject": msg.subject})
                await msg.term()
                continue
            if decoded:
                groups.append((tenant_id, decoded))
        if groups:
            async with self._pool.connection() as conn, conn.transaction():
                routes = await routes_of(conn, (tenant_id for tenant_id, _ in groups))
                queued = await queue_events(conn, routes, groups) if routes else 0
            if queued:
                DELIVERIES_QUEUED.labels("events").inc(queued)
                self._on_queued()
        for msg in msgs:
            await msg.ack()

    def _decode(self, msg: Msg) -> tuple[str, list[events_pb2.Event]]:
        if msg.subject.startswith(self._topology.notify_subject("")):
            recorded = queue_pb2.RecordedEvents.FromString(msg.data)
            return recorded.tenant_id, list(recorded.events)
        note = queue_pb2.AccountEvent.FromString(msg.data)
        event = account_event(note)
        return note.tenant_id, [event] if event is not None else []
