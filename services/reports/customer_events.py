"""Recorded message events as customers see them (``esp.v1.Event``): the body of a webhook and a row of the events
API are one conversion. Recorded batches are queued for the webhook dispatcher through the reports outbox."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime

import psycopg
from esp.internal.v1 import queue_pb2
from esp.v1 import events_pb2

from libs.common.event_types import MESSAGE_EVENT_TYPES
from libs.common.jetstream import Topology
from libs.common.message_classes import MessageClass
from libs.common.outbox import CommittedRow, OutboxRow
from libs.common.telemetry import current_traceparent
from libs.common.timestamps import to_timestamp
from services.reports.models import EventType
from services.reports.recorder import RecordedEvent

__all__ = ["CUSTOMER_TYPES", "OUTBOX_TABLE", "customer_event", "queue_recorded_events"]

OUTBOX_TABLE = "reports.outbox"

CUSTOMER_TYPES: Mapping[EventType, str] = {
    event_type: name for event_type in EventType
    if (name := f"message.{event_type.value}") in MESSAGE_EVENT_TYPES.values()
}
"""The recorded event types customers see, and their names (ATTEMPTED stays internal)."""


def customer_event(*, event_id: str, event_type: EventType, event_time: datetime, message_id: str, sequence: int,
                   recipient: str, provider: str, tags: Sequence[str], metadata: Mapping[str, str], campaign: str,
                   message_class: str, reason: str, bounce_type: str, url: str, attempt: int) -> events_pb2.Event:
    """One recorded event of a message as ``esp.v1.Event`` (``recipient``: the event's own, or the message's first
    To address for whole-message events)."""
    event = events_pb2.Event(
        name=f"events/{event_id}", type=CUSTOMER_TYPES[event_type], event_time=to_timestamp(event_time),
        message=f"messages/{message_id}", sequence=sequence, recipient=recipient, provider=provider, tags=tags,
        metadata=metadata, campaign=campaign, reason=reason, bounce_type=bounce_type, url=url, attempt=attempt,
    )
    if message_class:
        event.message_class = MessageClass(message_class).proto
    return event


def _from_recorded(recorded: RecordedEvent) -> events_pb2.Event:
    e = recorded.event
    return customer_event(
        event_id=e.event_id, event_type=e.event_type, event_time=e.event_time, message_id=e.message_id,
        sequence=recorded.sequence, recipient=e.recipient or recorded.first_recipient, provider=e.provider,
        tags=recorded.tags, metadata=recorded.metadata, campaign=recorded.campaign,
        message_class=recorded.message_class, reason=e.reason, bounce_type=e.bounce_type, url=e.url,
        attempt=e.attempt,
    )


async def queue_recorded_events(conn: psycopg.AsyncConnection, topology: Topology,
                                recorded: Sequence[RecordedEvent]) -> list[CommittedRow]:
    """Queue a recorded batch's customer events in the caller's transaction: one ``RecordedEvents`` per tenant on
    ``esp.notify.<tenant>``. The publish's ``Nats-Msg-Id`` is the first event's id, which no other row can carry:
    an event is new in one transaction only."""
    by_tenant: dict[str, list[events_pb2.Event]] = defaultdict(list)
    first_ids: dict[str, str] = {}
    for item in recorded:
        if item.event.event_type not in CUSTOMER_TYPES:
            continue
        by_tenant[item.event.tenant_id].append(_from_recorded(item))
        first_ids.setdefault(item.event.tenant_id, item.event.event_id)
    if not by_tenant:
        return []
    # The batch's trace (that of its first event, whose consumer span is current): the webhook dispatcher's spans
    # join it.
    traceparent = current_traceparent()
    rows = [OutboxRow(topology.notify_subject(tenant), f"recorded-{first_ids[tenant]}",
                      queue_pb2.RecordedEvents(tenant_id=tenant, events=events).SerializeToString(),
                      traceparent=traceparent)
            for tenant, events in sorted(by_tenant.items())]
    cur = await conn.execute(
        f"""INSERT INTO {OUTBOX_TABLE} (subject, msg_id, payload, traceparent)
            SELECT s, m, p, %s FROM unnest(%s::text[], %s::text[], %s::bytea[]) AS r(s, m, p)
            RETURNING id, msg_id""",
        (traceparent or None, [r.subject for r in rows], [r.msg_id for r in rows], [r.payload for r in rows]))
    ids = {msg_id: row_id for row_id, msg_id in await cur.fetchall()}
    return [CommittedRow(ids[r.msg_id], r) for r in rows]
