"""A message accepted with a send_time ahead is SCHEDULED, with its send time, until a sender reports on it; the
SCHEDULED state never replaces a state recorded before it."""

from __future__ import annotations

from datetime import datetime

import grpc
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from tests.reports.builders import accepted, at, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M = messages_pb2


def _scheduled(tenant: str, message_id: str, when: datetime, send_time: datetime) -> queue_pb2.EventEnvelope:
    """The ACCEPTED event of a message scheduled for ``send_time``, as ingest publishes it."""
    envelope = accepted(tenant, message_id, when)
    envelope.message.state = M.MESSAGE_STATE_SCHEDULED
    envelope.message.send_time.FromDatetime(send_time)
    return envelope


async def _message(reports: ReportsService, tenant: str, message_id: str) -> messages_pb2.Message | None:
    try:
        return await reports.messages.GetMessage(M.GetMessageRequest(name=f"messages/{message_id}"),
                                                 metadata=caller(tenant))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _in_state(reports: ReportsService, tenant: str, message_id: str, state: int) -> messages_pb2.Message:
    async def probe() -> messages_pb2.Message | None:
        message = await _message(reports, tenant, message_id)
        return message if message is not None and message.state == state else None

    return await eventually(probe, what=f"message {message_id} in state {M.MessageState.Name(state)}")


async def test_a_scheduled_message_is_in_state_scheduled_with_its_send_time(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([_scheduled(tenant, message_id, at(9), send_time=at(12, day=20))])

    message = await _in_state(reports, tenant, message_id, M.MESSAGE_STATE_SCHEDULED)

    assert message.send_time.ToDatetime().isoformat() == "2024-03-20T12:00:00"
    assert message.subject == "Hello"
    listed = await reports.messages.ListMessages(M.ListMessagesRequest(state=M.MESSAGE_STATE_SCHEDULED),
                                                 metadata=caller(tenant))
    assert [m.id for m in listed.messages] == [message_id]


async def test_a_scheduled_message_moves_on_with_the_senders_events(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([_scheduled(tenant, message_id, at(9), send_time=at(10))])
    await _in_state(reports, tenant, message_id, M.MESSAGE_STATE_SCHEDULED)

    await reports.publish([sent(tenant, message_id, at(10, 0, 1), provider="ses-eu", provider_message_id="s-1")])

    message = await _in_state(reports, tenant, message_id, M.MESSAGE_STATE_SENT)
    assert message.send_time.ToDatetime() == at(10).replace(tzinfo=None)


async def test_a_late_scheduled_accepted_event_does_not_replace_a_later_state(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CANCELLED, at(9, 30),
                                        reason="message cancelled", final=True)])
    await _in_state(reports, tenant, message_id, M.MESSAGE_STATE_CANCELLED)

    await reports.publish([_scheduled(tenant, message_id, at(9), send_time=at(10))])

    async def filled_in() -> messages_pb2.Message | None:
        message = await _message(reports, tenant, message_id)
        return message if message is not None and message.subject == "Hello" else None

    message = await eventually(filled_in, what="summary from the late ACCEPTED")
    assert message.state == M.MESSAGE_STATE_CANCELLED
    assert message.HasField("send_time")
