"""Scheduled single sends (SendEmailRequest.send_time): the email is accepted now — validated, credits held for
longer than the wait, stored, its ACCEPTED event published — and its SEND task is held in the outbox until the
send time, then published by the outbox's due pass within a fraction of a second."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from tests.ingest import publishing
from tests.ingest.conftest import IngestHarness, refused, send_request
from tests.ingest.publishing import Watch, arrival, stamp

M = messages_pb2
watch = publishing.watch  # the fixture


async def _hold_expiry(harness: IngestHarness, hold_id: str) -> datetime:
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT expires_at FROM ledger.holds WHERE hold_id = %s", (hold_id,))
        row = await cur.fetchone()
    assert row is not None, f"no hold {hold_id}"
    expires_at: datetime = row[0]
    return expires_at


async def test_a_scheduled_send_is_not_published_before_its_time_and_is_published_within_a_second_after(
        harness: IngestHarness, watch: Watch):
    tenant = await harness.new_tenant()
    send_subject = await watch(harness.parts.topology.send_subject("transactional"))
    send_at = time.time() + 2.0

    message = await harness.send(tenant, send_request(send_time=stamp(send_at)))

    assert message.state == M.MESSAGE_STATE_SCHEDULED and message.send_time == stamp(send_at)
    await asyncio.sleep(send_at - time.time() - 0.3)
    assert message.id not in send_subject
    published = await arrival(send_subject, message.id, send_at + 3.0 - time.time())
    assert published is not None, "the SEND task was never published"
    assert send_at <= published[0] <= send_at + 1.0


async def test_a_scheduled_sends_accepted_event_is_published_at_once(harness: IngestHarness,
                                                                     watch: Watch):
    tenant = await harness.new_tenant()
    events = await watch(harness.parts.topology.events_subject(tenant.id))

    message = await harness.send(tenant, send_request(send_time=stamp(time.time() + 3600)))

    published = await arrival(events, message.id, 5.0)
    assert published is not None, "no ACCEPTED event"
    envelope = queue_pb2.EventEnvelope.FromString(published[1])
    assert envelope.event.type == M.MESSAGE_EVENT_TYPE_ACCEPTED
    assert envelope.message.state == M.MESSAGE_STATE_SCHEDULED and envelope.message.send_time == message.send_time


async def test_the_queued_task_of_a_scheduled_send_counts_its_useful_life_from_the_send_time(
        harness: IngestHarness, watch: Watch):
    tenant = await harness.new_tenant()
    send_subject = await watch(harness.parts.topology.send_subject("otp"))
    send_at = time.time() + 0.5

    message = await harness.send(tenant, send_request(message_class=common_pb2.MESSAGE_CLASS_OTP,
                                                      send_time=stamp(send_at)))

    published = await arrival(send_subject, message.id, 5.0)
    assert published is not None
    task = queue_pb2.SendTask.FromString(published[1])
    assert task.accepted_time == stamp(send_at)  # an OTP lives ten minutes from when it is handed over
    assert message.create_time.ToDatetime(UTC) < datetime.fromtimestamp(send_at, UTC)


async def test_a_send_time_in_the_past_sends_at_once(harness: IngestHarness, watch: Watch):
    tenant = await harness.new_tenant()
    send_subject = await watch(harness.parts.topology.send_subject("transactional"))

    message = await harness.send(tenant, send_request(send_time=stamp(time.time() - 60)))

    assert message.state == M.MESSAGE_STATE_ACCEPTED and not message.HasField("send_time")
    assert await arrival(send_subject, message.id, 5.0) is not None


async def test_a_send_time_too_far_ahead_is_invalid_and_nothing_is_taken(harness: IngestHarness):
    tenant = await harness.new_tenant()
    too_far = time.time() + harness.settings.max_send_ahead_s + 3600

    failure = await refused(harness.messages.SendEmail(send_request(send_time=stamp(too_far)), metadata=tenant.auth))

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.violation("send_time").reason == "SEND_TIME_TOO_FAR"
    assert await harness.message_rows(tenant) == 0
    assert (await harness.balance(tenant)).held == 0


async def test_a_malformed_send_time_is_invalid(harness: IngestHarness):
    tenant = await harness.new_tenant()

    failure = await refused(harness.messages.SendEmail(send_request(send_time=Timestamp(seconds=1, nanos=-1)),
                                                       metadata=tenant.auth))

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.fields == ["send_time"]


async def test_in_a_batch_a_malformed_send_time_refuses_only_its_email(harness: IngestHarness):
    tenant = await harness.new_tenant()
    reply = await harness.messages.BatchSendEmails(M.BatchSendEmailsRequest(requests=[
        send_request(send_time=Timestamp(seconds=2**40)),
        send_request(send_time=stamp(time.time() + 3600)),
        send_request(),
    ]), metadata=tenant.auth)

    bad, scheduled, now = reply.results
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert list(bad.error.fields) == ["send_time"]
    assert scheduled.message.state == M.MESSAGE_STATE_SCHEDULED
    assert now.message.state == M.MESSAGE_STATE_ACCEPTED


async def test_the_credit_hold_of_a_scheduled_send_outlives_its_send_time(harness: IngestHarness):
    tenant = await harness.new_tenant()
    send_at = datetime.now(UTC) + timedelta(days=10)

    message = await harness.send(tenant, send_request(send_time=stamp(send_at.timestamp())))

    expires_at = await _hold_expiry(harness, message.id)
    expected = send_at + timedelta(seconds=harness.settings.hold_ttl_after_send_s)
    assert abs((expires_at - expected).total_seconds()) < 60
    assert (await harness.balance(tenant)).held == message.credits


async def test_a_send_times_request_id_answers_the_same_send_time_and_refuses_another(harness: IngestHarness):
    tenant = await harness.new_tenant()
    send_at = time.time() + 3600
    first = await harness.send(tenant, send_request(request_id="r-1", send_time=stamp(send_at)))

    again = await harness.send(tenant, send_request(request_id="r-1", send_time=stamp(send_at)))
    other = await refused(harness.messages.SendEmail(send_request(request_id="r-1", send_time=stamp(send_at + 60)),
                                                     metadata=tenant.auth))

    assert again == first and again.state == M.MESSAGE_STATE_SCHEDULED
    assert other.code == grpc.StatusCode.ALREADY_EXISTS
