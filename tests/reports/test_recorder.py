"""The recorder directly: parked webhook events are claimed by the sweep when the consumer missed them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from services.reports.envelopes import decode_envelope
from services.reports.models import MessageEventRecord, SuppressionReason
from services.reports.recorder import claim_parked_events, record_events
from tests.reports.builders import accepted, at, new_id, sender_event, sent
from tests.reports.conftest import ReportsService

M = messages_pb2


async def test_the_sweep_applies_a_parked_callback_whose_sent_event_was_recorded_meanwhile(reports: ReportsService):
    tenant, message_id, provider = new_id("tenant-"), new_id(), f"mg-{new_id()[:8]}"
    provider_message_id = f"<{new_id()}@mg>"
    parked = sender_event("unknown", "unknown", M.MESSAGE_EVENT_TYPE_DELIVERED, at(19, 5), provider=provider,
                          provider_message_id=provider_message_id, recipient="alice@example.com").event
    async with await reports.connect_db() as conn:
        # The SENT event is recorded first; the callback is parked right after, so that batch did not claim it.
        await record_events(conn, [
            decode_envelope(accepted(tenant, message_id, at(19)).SerializeToString()),
            decode_envelope(sent(tenant, message_id, at(19, 1), provider=provider,
                                 provider_message_id=provider_message_id).SerializeToString()),
        ])
        await conn.execute(
            """INSERT INTO reports.unmatched_delivery_events (event_id, provider, provider_message_id, event,
                   received_at) VALUES (%s, %s, %s, %s, now() - interval '1 minute')""",
            (parked.event_id, provider, provider_message_id, parked.SerializeToString()))

        async with conn.transaction():
            claimed = await claim_parked_events(conn, min_age=timedelta(seconds=1))
            outcome = await record_events(conn, claimed)
        cur = await conn.execute("SELECT state FROM reports.messages WHERE tenant_id = %s AND message_id = %s",
                                 (tenant, message_id))
        state = (await cur.fetchone() or ("",))[0]
        cur = await conn.execute("SELECT count(*) FROM reports.unmatched_delivery_events WHERE event_id = %s",
                                 (parked.event_id,))
        left = (await cur.fetchone() or (0,))[0]

    assert [e.event_id for e in outcome.new_events] == [parked.event_id]
    assert state == "delivered"
    assert left == 0


async def test_the_same_batch_twice_changes_nothing_the_second_time(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    batch = [decode_envelope(e.SerializeToString()) for e in (
        accepted(tenant, message_id, at(20)),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_COMPLAINED, at(20, 5), recipient="x@example.com"),
    )]
    async with await reports.connect_db() as conn:
        first = await record_events(conn, batch)
        second = await record_events(conn, batch)

    assert len(first.new_events) == 2
    assert [(s.tenant_id, s.email, s.reason) for s in first.suppressed] == [
        (tenant, "x@example.com", SuppressionReason.COMPLAINT)]
    assert (second.new_events, second.duplicates, second.suppressed) == ((), 2, ())


async def test_a_sent_event_names_the_provider_even_after_a_delivery_report_named_one_in_an_earlier_batch(
        reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()

    def event(envelope: queue_pb2.EventEnvelope) -> MessageEventRecord:
        return decode_envelope(envelope.SerializeToString())

    async def provider() -> tuple[str, str] | None:
        cur = await conn.execute(
            "SELECT provider, provider_message_id FROM reports.messages WHERE tenant_id = %s AND message_id = %s",
            (tenant, message_id))
        row = await cur.fetchone()
        return (row[0], row[1]) if row else None

    async with await reports.connect_db() as conn:
        # Each record_events call is a batch of its own, so each merge meets the row the previous one left.
        await record_events(conn, [event(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(21, 5),
                                                      provider="mg-early", provider_message_id="<early@mg>"))])
        named_by_report = await provider()
        await record_events(conn, [event(sent(tenant, message_id, at(21, 1), provider="ses-took-it",
                                              provider_message_id="ses-1"))])
        named_by_sent = await provider()
        await record_events(conn, [event(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CLICKED, at(21, 9),
                                                      provider="mg-late", provider_message_id="<late@mg>"))])
        after_a_later_report = await provider()

    assert named_by_report == ("mg-early", "<early@mg>")
    assert named_by_sent == ("ses-took-it", "ses-1")
    assert after_a_later_report == ("ses-took-it", "ses-1")


@pytest.mark.parametrize("cancelled_minute", [1, 3])
async def test_failed_outranks_cancelled_within_one_batch_whichever_happened_later(reports: ReportsService,
                                                                                    cancelled_minute: int):
    tenant, message_id = new_id("tenant-"), new_id()
    batch = [decode_envelope(e.SerializeToString()) for e in (
        accepted(tenant, message_id, at(22), message_class="bulk"),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_FAILED, at(22, 2), message_class="bulk", final=True),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CANCELLED, at(22, cancelled_minute),
                     message_class="bulk", final=True),
    )]
    async with await reports.connect_db() as conn:
        await record_events(conn, batch)
        cur = await conn.execute("SELECT state FROM reports.messages WHERE tenant_id = %s AND message_id = %s",
                                 (tenant, message_id))
        state = (await cur.fetchone() or ("",))[0]

    assert state == "failed"
