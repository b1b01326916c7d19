"""CancelMessage: a scheduled message whose time has not come is withdrawn — no SEND task ever, a final CANCELLED
event, the hold released; a queued one is halted for the senders; a sent one cannot be cancelled. Another
tenant's message is NOT_FOUND; a retry with the same request_id answers as the first cancel."""

from __future__ import annotations

import asyncio
import time

import grpc
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2, tenants_pb2

from libs.common.campaign_halts import read_snapshot
from libs.common.jetstream import publish
from tests.ingest import publishing
from tests.ingest.conftest import IngestHarness, TenantHandle, refused, send_request
from tests.ingest.publishing import Watch, arrival, stamp

M = messages_pb2
watch = publishing.watch  # the fixture


async def _cancel(harness: IngestHarness, tenant: TenantHandle, message: M.Message,
                  request_id: str = "") -> M.Message:
    return await harness.messages.CancelMessage(M.CancelMessageRequest(name=message.name, request_id=request_id),
                                                metadata=tenant.auth, timeout=10)


async def _state(harness: IngestHarness, tenant: TenantHandle, message: M.Message, state: int,
                 timeout_s: float = 10.0) -> M.Message:
    """The message as reports has it, once in ``state``."""
    deadline = time.time() + timeout_s
    while True:
        try:
            seen = await harness.messages.GetMessage(M.GetMessageRequest(name=message.name), metadata=tenant.auth)
            if seen.state == state:
                return seen
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if time.time() > deadline:
            raise AssertionError(f"{message.name} not {M.MessageState.Name(state)} after {timeout_s} s")
        await asyncio.sleep(0.05)


async def _held(harness: IngestHarness, tenant: TenantHandle, expected: int, timeout_s: float = 10.0) -> int:
    deadline = time.time() + timeout_s
    while True:
        held = (await harness.balance(tenant)).held
        if held == expected or time.time() > deadline:
            return held
        await asyncio.sleep(0.05)


async def test_cancelling_before_the_send_time_publishes_no_send_task_but_a_final_cancelled_event(
        harness: IngestHarness, watch: Watch):
    tenant = await harness.new_tenant()
    topology = harness.parts.topology
    sends = await watch(topology.send_subject("transactional"))
    finals = await watch(topology.events_subject(tenant.id, final=True))
    send_at = time.time() + 1.0
    message = await harness.send(tenant, send_request(send_time=stamp(send_at)))

    cancelled = await _cancel(harness, tenant, message)

    assert cancelled.state == M.MESSAGE_STATE_CANCELLED and cancelled.send_time == message.send_time
    published = await arrival(finals, message.id, 5.0)
    assert published is not None, "no CANCELLED event"
    event = queue_pb2.EventEnvelope.FromString(published[1])
    assert event.final and event.event.type == M.MESSAGE_EVENT_TYPE_CANCELLED and event.hold_id == message.id
    await asyncio.sleep(send_at + 1.0 - time.time())  # its send time came and went: the due pass found nothing
    assert message.id not in sends


async def test_cancelling_before_the_send_time_releases_the_hold_and_reports_cancelled(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request(send_time=stamp(time.time() + 3600)))
    assert (await harness.balance(tenant)).held == message.credits

    await _cancel(harness, tenant, message)

    assert await _held(harness, tenant, 0) == 0
    await _state(harness, tenant, message, M.MESSAGE_STATE_CANCELLED)


async def test_cancelling_a_queued_message_halts_it_for_the_senders(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request())  # queued at once (no sender runs here)

    answer = await _cancel(harness, tenant, message)

    assert answer.state in (M.MESSAGE_STATE_ACCEPTED, M.MESSAGE_STATE_DEFERRED)  # until a sender drops it
    halted = await read_snapshot(harness.parts.redis, namespace=harness.namespace)
    assert message.id in halted.messages


async def test_cancelling_a_sent_message_is_refused_naming_its_state(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request())
    sent = queue_pb2.EventEnvelope(tenant_id=tenant.id, message_id=message.id, final=True, hold_id=message.id,
                                   message_class=message.message_class)
    sent.event.event_id, sent.event.message = f"{message.id}:sent", message.name
    sent.event.type, sent.event.provider = M.MESSAGE_EVENT_TYPE_SENT, "ses-eu"
    sent.event.event_time.GetCurrentTime()
    await publish(harness.parts.js, harness.parts.topology.events_subject(tenant.id, final=True),
                  sent.SerializeToString(), msg_id=sent.event.event_id)
    await _state(harness, tenant, message, M.MESSAGE_STATE_SENT)

    failure = await refused(_cancel(harness, tenant, message))

    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.info.reason == "MESSAGE_NOT_CANCELLABLE"
    assert failure.info.metadata["state"] == "MESSAGE_STATE_SENT" and "SENT" in failure.message
    halted = await read_snapshot(harness.parts.redis, namespace=harness.namespace)
    assert message.id not in halted.messages


async def test_another_tenants_message_is_not_found(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    message = await harness.send(owner, send_request(send_time=stamp(time.time() + 3600)))

    failure = await refused(_cancel(harness, stranger, message))

    assert failure.code == grpc.StatusCode.NOT_FOUND
    again = await _cancel(harness, owner, message)  # untouched: its owner can still cancel it
    assert again.state == M.MESSAGE_STATE_CANCELLED


async def test_a_cancel_retried_with_its_request_id_answers_as_the_first_time(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request(send_time=stamp(time.time() + 3600)))
    first = await _cancel(harness, tenant, message, request_id="c-1")

    retried = await _cancel(harness, tenant, message, request_id="c-1")
    other = await refused(_cancel(harness, tenant, message, request_id="c-2"))

    assert retried == first and first.state == M.MESSAGE_STATE_CANCELLED
    assert other.code == grpc.StatusCode.FAILED_PRECONDITION
    assert other.info.metadata["state"] == "MESSAGE_STATE_CANCELLED"


async def test_cancelling_needs_the_send_scope(harness: IngestHarness):
    tenant = await harness.new_tenant()
    message = await harness.send(tenant, send_request(send_time=stamp(time.time() + 3600)))
    reader = TenantHandle(tenant.id, await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_READ]))

    failure = await refused(_cancel(harness, reader, message))

    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
