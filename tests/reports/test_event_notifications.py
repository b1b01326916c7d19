"""End to end through the running reports service: message events published on the EVENTS stream are recorded
by its consumer and reach ``esp.notify.<tenant>`` (the webhook dispatcher's subject) as RecordedEvents, numbered."""

from __future__ import annotations

import nats.errors
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from nats.js import JetStreamContext

from tests.reports.builders import accepted, at, attempted, new_id, sender_event, sent
from tests.reports.conftest import ReportsService

M = messages_pb2


async def _subscribe(reports: ReportsService, tenant: str) -> JetStreamContext.PushSubscription:
    return await reports.js.subscribe(reports.topology.notify_subject(tenant),
                                      stream=reports.topology.events_stream, ordered_consumer=True)


async def _received(subscription: JetStreamContext.PushSubscription, count: int) -> list[queue_pb2.RecordedEvents]:
    return [queue_pb2.RecordedEvents.FromString((await subscription.next_msg(timeout=15)).data)
            for _ in range(count)]


async def test_recorded_events_are_published_on_the_tenants_notify_subject(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    subscription = await _subscribe(reports, tenant)
    await reports.publish([accepted(tenant, message_id, at(12), tags=["welcome"])])
    (first,) = await _received(subscription, 1)

    await reports.publish([
        attempted(tenant, message_id, at(12, 1), provider="ses", latency_ms=70),
        sent(tenant, message_id, at(12, 1), provider="ses", provider_message_id=new_id()),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(12, 2), recipient="alice@example.com"),
    ])
    later: list[queue_pb2.RecordedEvents] = []
    while sum(len(n.events) for n in later) < 2:  # the consumer may take the three in one batch or more
        later += await _received(subscription, 1)

    assert first.tenant_id == tenant
    assert [(e.type, e.sequence, e.message, list(e.tags)) for e in first.events] == [
        ("message.accepted", 1, f"messages/{message_id}", ["welcome"])]
    assert {n.tenant_id for n in later} == {tenant}
    assert [(e.type, list(e.tags)) for n in later for e in n.events] == [
        ("message.sent", ["welcome"]), ("message.delivered", ["welcome"])]
    # Numbered on from the accepted event's, increasing (the unpublished ATTEMPTED event takes a number too).
    sequences = [e.sequence for n in later for e in n.events]
    assert sequences[0] > 1 and sequences[1] > sequences[0]


async def test_an_event_redelivered_to_the_consumer_is_not_published_again(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    subscription = await _subscribe(reports, tenant)
    acceptance = accepted(tenant, message_id, at(12))
    await reports.publish([acceptance])
    await _received(subscription, 1)

    # The same event again, past JetStream's duplicate window (another Nats-Msg-Id): the recorder drops it.
    await reports.publish([acceptance], msg_id_suffix="-again")

    with pytest.raises(nats.errors.TimeoutError):
        await subscription.next_msg(timeout=3)
