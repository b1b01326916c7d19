"""Per-message event sequence numbers, and the RecordedEvents the recorder queues in ``reports.outbox``.

The recorder runs directly here, in a reports database of this module's own (real Postgres, migrated, no service
reading it): no consumer, sweep or outbox publisher races the test for the rows it looks at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, events_pb2, messages_pb2

from libs.common.db import migrate_services
from libs.common.jetstream import Topology
from services.reports.customer_events import queue_recorded_events
from services.reports.envelopes import decode_envelope
from services.reports.recorder import RecordOutcome, claim_parked_events, record_events
from tests.reports.builders import accepted, at, attempted, new_id, sender_event, sent

M = messages_pb2
TOPOLOGY = Topology("seqtests")


@pytest.fixture(scope="module")
async def reports_dsn(new_database: Callable[[], str]) -> str:
    dsn = new_database()
    await migrate_services(dsn, ["reports"])
    return dsn


@pytest.fixture
async def conn(reports_dsn: str) -> AsyncIterator[psycopg.AsyncConnection]:
    connection = await psycopg.AsyncConnection.connect(reports_dsn, autocommit=True)
    async with connection:
        yield connection


async def _record(conn: psycopg.AsyncConnection, envelopes: Sequence[queue_pb2.EventEnvelope]) -> RecordOutcome:
    """One consumer batch: recorded and its customer events queued, in one transaction."""
    async with conn.transaction():
        outcome = await record_events(conn, [decode_envelope(e.SerializeToString()) for e in envelopes])
        await queue_recorded_events(conn, TOPOLOGY, outcome.recorded)
    return outcome


async def _sequences(conn: psycopg.AsyncConnection, tenant: str, message_id: str) -> dict[str, int]:
    """The message's recorded events: event id → sequence."""
    cur = await conn.execute("SELECT event_id, seq FROM reports.events WHERE tenant_id = %s AND message_id = %s",
                             (tenant, message_id))
    return dict(await cur.fetchall())


async def _notifications(conn: psycopg.AsyncConnection,
                         *tenants: str) -> list[tuple[str, str, queue_pb2.RecordedEvents]]:
    """The outbox rows queued for ``tenants``: (subject, msg id, payload), oldest first."""
    cur = await conn.execute("SELECT subject, msg_id, payload FROM reports.outbox WHERE subject = ANY(%s) ORDER BY id",
                             ([TOPOLOGY.notify_subject(t) for t in tenants],))
    return [(subject, msg_id, queue_pb2.RecordedEvents.FromString(bytes(payload)))
            for subject, msg_id, payload in await cur.fetchall()]


def _event(tenant: str, message_id: str, event_type: int, minute: int, **fields: Any) -> queue_pb2.EventEnvelope:
    return sender_event(tenant, message_id, event_type, at(9, minute), **fields)


async def test_a_messages_events_are_numbered_from_one_in_the_order_they_were_recorded_across_batches(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    first = accepted(tenant, message_id, at(9))
    second = sent(tenant, message_id, at(9, 1), provider="ses", provider_message_id=new_id())
    # Happened before the SENT event, recorded after it: the sequence follows the recording.
    third = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DEFERRED, 0, reason="greylisted")

    for envelope in (first, second, third):
        await _record(conn, [envelope])

    assert await _sequences(conn, tenant, message_id) == {
        first.event.event_id: 1, second.event.event_id: 2, third.event.event_id: 3}


async def test_events_of_one_batch_are_numbered_by_event_time_then_lifecycle_order(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    acceptance = accepted(tenant, message_id, at(9, 5))
    sending = sent(tenant, message_id, at(9, 5), provider="ses", provider_message_id=new_id())  # same time
    delivery = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, 7, recipient="alice@example.com")
    opening = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_OPENED, 9, recipient="alice@example.com")

    outcome = await _record(conn, [opening, delivery, sending, acceptance])

    expected = [acceptance.event.event_id, sending.event.event_id, delivery.event.event_id, opening.event.event_id]
    assert [(r.event.event_id, r.sequence) for r in outcome.recorded] == list(zip(expected, [1, 2, 3, 4], strict=True))
    assert await _sequences(conn, tenant, message_id) == dict(zip(expected, [1, 2, 3, 4], strict=True))


async def test_each_message_has_a_sequence_of_its_own(conn: psycopg.AsyncConnection) -> None:
    tenant, one, other = new_id("tenant-"), new_id(), new_id()

    await _record(conn, [accepted(tenant, one, at(9)), accepted(tenant, other, at(9))])
    await _record(conn, [sent(tenant, other, at(9, 1), provider="ses", provider_message_id=new_id())])

    assert sorted((await _sequences(conn, tenant, one)).values()) == [1]
    assert sorted((await _sequences(conn, tenant, other)).values()) == [1, 2]


async def test_an_event_recorded_again_keeps_its_number_and_takes_none_from_the_next(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    acceptance = accepted(tenant, message_id, at(9))
    sending = sent(tenant, message_id, at(9, 1), provider="ses", provider_message_id=new_id())
    delivery = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, 2, recipient="alice@example.com")
    await _record(conn, [acceptance, sending])

    redelivered = await _record(conn, [sending, delivery])

    assert [(r.event.event_id, r.sequence) for r in redelivered.recorded] == [(delivery.event.event_id, 3)]
    assert await _sequences(conn, tenant, message_id) == {
        acceptance.event.event_id: 1, sending.event.event_id: 2, delivery.event.event_id: 3}
    cur = await conn.execute("SELECT event_seq FROM reports.messages WHERE tenant_id = %s AND message_id = %s",
                             (tenant, message_id))
    assert await cur.fetchone() == (3,)


async def test_a_parked_callback_claimed_by_a_later_sent_event_is_numbered_after_it(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id, provider_message_id = new_id("tenant-"), new_id(), f"<{new_id()}@mg>"
    await _record(conn, [accepted(tenant, message_id, at(9))])
    callback = sender_event("unknown", "unknown", M.MESSAGE_EVENT_TYPE_DELIVERED, at(9, 3), provider="mg",
                            provider_message_id=provider_message_id, recipient="alice@example.com").event
    await conn.execute(
        """INSERT INTO reports.unmatched_delivery_events (event_id, provider, provider_message_id, event)
           VALUES (%s, 'mg', %s, %s)""", (callback.event_id, provider_message_id, callback.SerializeToString()))
    sending = sent(tenant, message_id, at(9, 1), provider="mg", provider_message_id=provider_message_id)

    outcome = await _record(conn, [sending])

    assert [(r.event.event_id, r.sequence) for r in outcome.recorded] == [
        (sending.event.event_id, 2), (callback.event_id, 3)]
    assert (await _sequences(conn, tenant, message_id))[callback.event_id] == 3


async def test_a_parked_callback_claimed_by_the_sweep_gets_the_next_number(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id, provider_message_id = new_id("tenant-"), new_id(), f"<{new_id()}@mg>"
    await _record(conn, [accepted(tenant, message_id, at(9)),
                         sent(tenant, message_id, at(9, 1), provider="mg", provider_message_id=provider_message_id)])
    # Parked while the SENT event's batch was being recorded, so that batch did not claim it.
    callback = sender_event("unknown", "unknown", M.MESSAGE_EVENT_TYPE_CLICKED, at(9, 8), provider="mg",
                            provider_message_id=provider_message_id, recipient="alice@example.com",
                            url="https://example.com/x").event
    await conn.execute(
        """INSERT INTO reports.unmatched_delivery_events (event_id, provider, provider_message_id, event, received_at)
           VALUES (%s, 'mg', %s, %s, now() - interval '1 minute')""",
        (callback.event_id, provider_message_id, callback.SerializeToString()))

    async with conn.transaction():
        claimed = await claim_parked_events(conn, min_age=timedelta(seconds=1))
        outcome = await record_events(conn, claimed)

    assert [(r.event.event_id, r.sequence) for r in outcome.recorded] == [(callback.event_id, 3)]
    assert (await _sequences(conn, tenant, message_id))[callback.event_id] == 3


async def test_a_batch_queues_one_recorded_events_per_tenant_on_its_notify_subject(
        conn: psycopg.AsyncConnection) -> None:
    first_tenant, second_tenant = new_id("tenant-"), new_id("tenant-")
    a, b, c = new_id(), new_id(), new_id()

    await _record(conn, [accepted(second_tenant, c, at(9)), accepted(first_tenant, a, at(9)),
                         accepted(first_tenant, b, at(9, 1))])

    rows = await _notifications(conn, first_tenant, second_tenant)
    by_subject = {subject: (msg_id, payload) for subject, msg_id, payload in rows}
    assert len(rows) == 2
    first_msg_id, first = by_subject[TOPOLOGY.notify_subject(first_tenant)]
    second_msg_id, second = by_subject[TOPOLOGY.notify_subject(second_tenant)]
    assert (first.tenant_id, sorted(e.message for e in first.events)) == (
        first_tenant, sorted([f"messages/{a}", f"messages/{b}"]))
    assert (second.tenant_id, [e.message for e in second.events]) == (second_tenant, [f"messages/{c}"])
    assert first_msg_id != second_msg_id
    assert all(msg_id.startswith("recorded-") for msg_id in (first_msg_id, second_msg_id))


async def test_each_batch_queues_its_own_notification(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()

    await _record(conn, [accepted(tenant, message_id, at(9))])
    await _record(conn, [sent(tenant, message_id, at(9, 1), provider="ses", provider_message_id=new_id())])

    rows = await _notifications(conn, tenant)
    assert [[(e.type, e.sequence) for e in payload.events] for _s, _m, payload in rows] == [
        [("message.accepted", 1)], [("message.sent", 2)]]


async def test_a_notified_event_carries_tags_metadata_and_campaign_of_its_accepted_event(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    campaign = f"campaigns/{new_id()}"
    await _record(conn, [accepted(tenant, message_id, at(9), tags=["spring", "sale"], campaign=campaign,
                                  message_class="bulk", to=["alice@example.com", "bob@example.com"])])

    bounced = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, 4, recipient="bob@example.com",
                     bounce_type="hard", provider="ses", reason="550 no such user", message_class="bulk")
    await _record(conn, [bounced, sent(tenant, message_id, at(9, 2), provider="ses", provider_message_id=new_id(),
                                       message_class="bulk")])

    (_subject, _msg_id, payload), = (await _notifications(conn, tenant))[1:]
    sending, bounce = payload.events
    expected_bounce = events_pb2.Event(
        name=f"events/{bounced.event.event_id}", type="message.bounced", message=f"messages/{message_id}",
        sequence=3, recipient="bob@example.com", provider="ses", tags=["spring", "sale"], metadata={"order": "42"},
        campaign=campaign, message_class=common_pb2.MESSAGE_CLASS_BULK, reason="550 no such user",
        bounce_type="hard")
    expected_bounce.event_time.FromDatetime(at(9, 4))
    assert bounce == expected_bounce
    # A whole-message event names the message's first To address.
    assert (sending.type, sending.sequence, sending.recipient, list(sending.tags), sending.campaign) == (
        "message.sent", 2, "alice@example.com", ["spring", "sale"], campaign)


async def test_attempted_events_are_left_out_of_notifications(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    await _record(conn, [accepted(tenant, message_id, at(9))])

    await _record(conn, [attempted(tenant, message_id, at(9, 1), provider="ses", latency_ms=80)])
    await _record(conn, [attempted(tenant, message_id, at(9, 2), provider="ses", latency_ms=80),
                         sent(tenant, message_id, at(9, 2), provider="ses", provider_message_id=new_id())])

    rows = await _notifications(conn, tenant)
    assert [[e.type for e in payload.events] for _s, _m, payload in rows] == [
        ["message.accepted"], ["message.sent"]]


async def test_a_batch_of_duplicates_queues_no_notification(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    acceptance = accepted(tenant, message_id, at(9))
    await _record(conn, [acceptance])

    await _record(conn, [acceptance])

    assert len(await _notifications(conn, tenant)) == 1
