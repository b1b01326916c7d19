"""The consumer turns EVENTS stream messages into message state and timelines."""

from __future__ import annotations

from datetime import datetime

import grpc
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from tests.reports.builders import accepted, at, attempted, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M = messages_pb2


async def _message(reports: ReportsService, tenant: str, message_id: str) -> messages_pb2.Message | None:
    try:
        return await reports.messages.GetMessage(M.GetMessageRequest(name=f"messages/{message_id}"),
                                                 metadata=caller(tenant))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _message_in_state(reports: ReportsService, tenant: str, message_id: str,
                            state: int) -> messages_pb2.Message:
    async def probe() -> messages_pb2.Message | None:
        message = await _message(reports, tenant, message_id)
        return message if message is not None and message.state == state else None

    return await eventually(probe, what=f"message {message_id} in state {M.MessageState.Name(state)}")


async def _timeline(reports: ReportsService, tenant: str, message_id: str) -> list[messages_pb2.MessageEvent]:
    response = await reports.messages.ListMessageEvents(
        M.ListMessageEventsRequest(parent=f"messages/{message_id}", page_size=100), metadata=caller(tenant))
    return list(response.events)


async def test_a_delivered_message_has_its_summary_state_provider_and_full_timeline(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(10), tags=["welcome"], to=["alice@example.com", "bob@example.com"]),
        attempted(tenant, message_id, at(10, 0, 1), provider="ses-eu", latency_ms=900,
                  outcome=M.ATTEMPT_OUTCOME_RETRYABLE),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DEFERRED, at(10, 0, 2), provider="ses-eu",
                     reason="503 service unavailable"),
        attempted(tenant, message_id, at(10, 0, 3), provider="mailgun-main", latency_ms=120, attempt=2),
        sent(tenant, message_id, at(10, 0, 4), provider="mailgun-main", provider_message_id="<a1@mg.example>"),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 0, 9), provider="mailgun-main",
                     recipient="alice@example.com"),
    ])

    message = await _message_in_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)

    assert message.name == f"messages/{message_id}"
    assert [a.email for a in message.to] == ["alice@example.com", "bob@example.com"]
    assert getattr(message, "from").email == "shop@example.net"
    assert message.subject == "Hello"
    assert list(message.tags) == ["welcome"]
    assert dict(message.metadata) == {"order": "42"}
    assert message.message_class == 2  # transactional
    assert message.credits == 3
    assert message.provider == "mailgun-main"
    assert message.provider_message_id == "<a1@mg.example>"
    assert message.attempts == 2
    assert message.create_time.ToDatetime().isoformat() == "2024-03-01T10:00:00"
    timeline = await _timeline(reports, tenant, message_id)
    assert [M.MessageEventType.Name(e.type) for e in timeline] == [
        "MESSAGE_EVENT_TYPE_ACCEPTED", "MESSAGE_EVENT_TYPE_ATTEMPTED", "MESSAGE_EVENT_TYPE_DEFERRED",
        "MESSAGE_EVENT_TYPE_ATTEMPTED", "MESSAGE_EVENT_TYPE_SENT", "MESSAGE_EVENT_TYPE_DELIVERED",
    ]
    assert timeline[1].outcome == M.ATTEMPT_OUTCOME_RETRYABLE
    assert timeline[1].latency_ms == 900
    assert timeline[-1].recipient == "alice@example.com"


async def test_a_late_deferred_does_not_move_a_sent_message_back(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(11)),
        sent(tenant, message_id, at(11, 0, 5), provider="postmark", provider_message_id="pm-1"),
    ])
    await _message_in_state(reports, tenant, message_id, M.MESSAGE_STATE_SENT)

    late = sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DEFERRED, at(11, 0, 2), provider="ses-eu")
    await reports.publish([late])
    await eventually(lambda: _has_event(reports, tenant, message_id, late.event.event_id), what="late DEFERRED")

    message = await _message(reports, tenant, message_id)
    assert message is not None and message.state == M.MESSAGE_STATE_SENT


async def _has_event(reports: ReportsService, tenant: str, message_id: str, event_id: str) -> bool:
    if await _message(reports, tenant, message_id) is None:
        return False
    return any(e.event_id == event_id for e in await _timeline(reports, tenant, message_id))


@pytest.mark.parametrize("outcome_type, state", [
    (M.MESSAGE_EVENT_TYPE_BOUNCED, M.MESSAGE_STATE_BOUNCED),
    (M.MESSAGE_EVENT_TYPE_COMPLAINED, M.MESSAGE_STATE_COMPLAINED),
])
async def test_a_bounce_or_complaint_after_delivery_wins(reports: ReportsService, outcome_type: int, state: int):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(12)),
        sent(tenant, message_id, at(12, 0, 1), provider="mailgun-main", provider_message_id="<b@mg>"),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(12, 0, 2), recipient="alice@example.com"),
        sender_event(tenant, message_id, outcome_type, at(12, 5), recipient="alice@example.com", bounce_type="soft"
                     if outcome_type == M.MESSAGE_EVENT_TYPE_BOUNCED else ""),
    ])

    await _message_in_state(reports, tenant, message_id, state)


def _cancelled(tenant: str, message_id: str, when: datetime) -> queue_pb2.EventEnvelope:
    """The sender dropping a cancelled campaign's email before any provider had it."""
    return sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CANCELLED, when, message_class="bulk",
                        reason="campaign cancelled", final=True)


async def test_a_cancelled_event_puts_the_message_in_state_cancelled_and_in_its_timeline(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(16), message_class="bulk", campaign="campaigns/c-16"),
        _cancelled(tenant, message_id, at(16, 5)),
    ])

    message = await _message_in_state(reports, tenant, message_id, M.MESSAGE_STATE_CANCELLED)

    assert message.campaign == "campaigns/c-16"
    timeline = await _timeline(reports, tenant, message_id)
    assert [M.MessageEventType.Name(e.type) for e in timeline] == [
        "MESSAGE_EVENT_TYPE_ACCEPTED", "MESSAGE_EVENT_TYPE_CANCELLED"]
    assert timeline[-1].reason == "campaign cancelled"


@pytest.mark.parametrize("outcome_type, state", [
    (M.MESSAGE_EVENT_TYPE_SENT, M.MESSAGE_STATE_SENT),
    (M.MESSAGE_EVENT_TYPE_DELIVERED, M.MESSAGE_STATE_DELIVERED),
    (M.MESSAGE_EVENT_TYPE_BOUNCED, M.MESSAGE_STATE_BOUNCED),
    (M.MESSAGE_EVENT_TYPE_COMPLAINED, M.MESSAGE_STATE_COMPLAINED),
])
async def test_a_late_cancelled_does_not_move_a_message_a_provider_had_back(reports: ReportsService,
                                                                            outcome_type: int, state: int):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(17), message_class="bulk", campaign="campaigns/c-17"),
        sender_event(tenant, message_id, outcome_type, at(17, 0, 1), message_class="bulk", provider="ses-eu",
                     provider_message_id="ses-17", recipient="alice@example.com"),
    ])
    await _message_in_state(reports, tenant, message_id, state)

    late = _cancelled(tenant, message_id, at(17, 5))
    await reports.publish([late])
    await eventually(lambda: _has_event(reports, tenant, message_id, late.event.event_id), what="late CANCELLED")

    message = await _message(reports, tenant, message_id)
    assert message is not None and message.state == state


@pytest.mark.parametrize("cancelled_first", [True, False])
async def test_failed_outranks_cancelled_whichever_is_recorded_first(reports: ReportsService, cancelled_first: bool):
    tenant, message_id = new_id("tenant-"), new_id()
    failed = sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_FAILED, at(18, 2), message_class="bulk",
                          reason="550 no such user", final=True)
    cancelled = _cancelled(tenant, message_id, at(18, 1 if cancelled_first else 3))
    first, second = (cancelled, failed) if cancelled_first else (failed, cancelled)
    await reports.publish([accepted(tenant, message_id, at(18), message_class="bulk", campaign="campaigns/c-18"),
                           first])
    await eventually(lambda: _has_event(reports, tenant, message_id, first.event.event_id), what="first outcome")

    await reports.publish([second])
    await eventually(lambda: _has_event(reports, tenant, message_id, second.event.event_id), what="second outcome")

    message = await _message(reports, tenant, message_id)
    assert message is not None and message.state == M.MESSAGE_STATE_FAILED


async def test_events_before_accepted_create_a_placeholder_that_accepted_fills_in(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        sent(tenant, message_id, at(13, 0, 4), provider="ses-eu", provider_message_id="ses-123"),
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(13, 0, 8), recipient="alice@example.com"),
    ])
    placeholder = await _message_in_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)
    assert placeholder.subject == "" and len(placeholder.to) == 0

    await reports.publish([accepted(tenant, message_id, at(13), subject="Your receipt", tags=["receipt"])])

    async def filled_in() -> messages_pb2.Message | None:
        message = await _message(reports, tenant, message_id)
        return message if message is not None and message.subject == "Your receipt" else None

    message = await eventually(filled_in, what="summary from the late ACCEPTED")
    assert message.state == M.MESSAGE_STATE_DELIVERED
    assert message.provider == "ses-eu"
    assert list(message.tags) == ["receipt"]
    assert message.create_time.ToDatetime().isoformat() == "2024-03-01T13:00:00"
    assert len(await _timeline(reports, tenant, message_id)) == 3


async def test_a_redelivered_event_is_recorded_once(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    attempt = attempted(tenant, message_id, at(14, 0, 1), provider="ses-eu", latency_ms=300)
    await reports.publish([accepted(tenant, message_id, at(14)), attempt])
    await eventually(lambda: _has_event(reports, tenant, message_id, attempt.event.event_id), what="first copy")

    # Same event id under another Nats-Msg-Id: what a producer's retry after the dedupe window looks like.
    marker = sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_OPENED, at(14, 3))
    await reports.publish([attempt], msg_id_suffix="-retry")
    await reports.publish([marker])
    await eventually(lambda: _has_event(reports, tenant, message_id, marker.event.event_id), what="marker")

    timeline = await _timeline(reports, tenant, message_id)
    assert [e.event_id for e in timeline].count(attempt.event.event_id) == 1
    message = await _message(reports, tenant, message_id)
    assert message is not None and message.attempts == 1


async def test_a_message_of_another_tenant_is_not_found(reports: ReportsService):
    owner, intruder, message_id = new_id("tenant-"), new_id("tenant-"), new_id()
    await reports.publish([accepted(owner, message_id, at(15))])
    await _message_in_state(reports, owner, message_id, M.MESSAGE_STATE_ACCEPTED)

    with pytest.raises(grpc.aio.AioRpcError) as get_error:
        await reports.messages.GetMessage(M.GetMessageRequest(name=f"messages/{message_id}"),
                                          metadata=caller(intruder))
    with pytest.raises(grpc.aio.AioRpcError) as events_error:
        await reports.messages.ListMessageEvents(M.ListMessageEventsRequest(parent=f"messages/{message_id}"),
                                                 metadata=caller(intruder))
    listing = await reports.messages.ListMessages(M.ListMessagesRequest(), metadata=caller(intruder))

    assert get_error.value.code() == grpc.StatusCode.NOT_FOUND
    assert events_error.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(listing.messages) == []


async def test_send_email_is_left_to_ingest(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.messages.SendEmail(M.SendEmailRequest(), metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reading_needs_the_read_scope(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.messages.ListMessages(M.ListMessagesRequest(), metadata=caller(new_id("tenant-"), "send"))

    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
