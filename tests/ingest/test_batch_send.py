"""BatchSendEmails: many emails in one call, each with its own result; one refused email never fails the others."""

from __future__ import annotations

import grpc
from esp.v1 import common_pb2, messages_pb2
from google.rpc import code_pb2

from tests.ingest.conftest import IngestHarness, refused, send_request


async def test_each_email_of_a_batch_gets_its_own_result_in_order(harness: IngestHarness):
    tenant = await harness.new_tenant()
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(requests=[
        send_request(request_id="b-1"), send_request(to=[common_pb2.EmailAddress(email="broken")]),
        send_request(request_id="b-3", subject="third")]), metadata=tenant.auth)
    first, second, third = reply.results
    assert first.HasField("message") and first.message.request_id == "b-1"
    assert second.error.code == code_pb2.INVALID_ARGUMENT and list(second.error.fields) == ["to[0].email"]
    assert third.HasField("message") and third.message.subject == "third"
    assert await harness.message_rows(tenant) == 2


async def test_a_repeated_request_id_inside_one_batch_creates_one_message(harness: IngestHarness):
    tenant = await harness.new_tenant()
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(
        requests=[send_request(request_id="same")] * 5), metadata=tenant.auth)
    assert len({r.message.id for r in reply.results}) == 1
    assert await harness.message_rows(tenant) == 1


async def test_an_oversized_or_empty_batch_is_refused_whole(harness: IngestHarness):
    tenant = await harness.new_tenant()
    too_many = messages_pb2.BatchSendEmailsRequest(
        requests=[send_request()] * (harness.settings.max_batch_send + 1))
    for request in (too_many, messages_pb2.BatchSendEmailsRequest()):
        failed = await refused(harness.messages.BatchSendEmails(request, metadata=tenant.auth))
        assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert await harness.message_rows(tenant) == 0
