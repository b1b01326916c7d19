"""BatchSendEmails: many emails in one call, each with its own result; one refused email never fails the others."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from esp.v1 import common_pb2, messages_pb2
from google.rpc import code_pb2

from libs.common.suppressions import suppression_key
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


async def test_a_campaign_batch_is_accepted_in_order_with_its_holds_and_queued_tasks(harness: IngestHarness):
    # No request_id, no attachments: the emails go through the accept steps together, one submission a step.
    tenant = await harness.new_tenant(credits=1_000)
    requests = [send_request(message_class=common_pb2.MESSAGE_CLASS_BULK, subject=f"news {i}",
                             to=[common_pb2.EmailAddress(email=f"reader{i}@example.net")]) for i in range(40)]
    requests[7] = send_request(to=[common_pb2.EmailAddress(email="broken")])
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(requests=requests),
                                                   metadata=tenant.auth)
    assert reply.results[7].error.code == code_pb2.INVALID_ARGUMENT
    accepted = [r for i, r in enumerate(reply.results) if i != 7]
    assert [r.message.subject for r in accepted] == [f"news {i}" for i in range(40) if i != 7]
    assert len({r.message.id for r in accepted}) == 39
    assert all(r.message.credits == 1 for r in accepted)  # a bulk email's price in the default book
    assert await harness.message_rows(tenant) == 39
    assert (await harness.balance(tenant)).held == 39


async def test_in_a_campaign_batch_only_the_emails_beyond_the_credits_are_refused(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=3)
    requests = [send_request(message_class=common_pb2.MESSAGE_CLASS_BULK,
                             to=[common_pb2.EmailAddress(email=f"reader{i}@example.net")]) for i in range(5)]
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(requests=requests),
                                                   metadata=tenant.auth)
    assert [r.HasField("message") for r in reply.results] == [True, True, True, False, False]
    assert {r.error.code for r in reply.results[3:]} == {code_pb2.FAILED_PRECONDITION}
    assert await harness.message_rows(tenant) == 3
    balance = await harness.balance(tenant)
    assert (balance.available, balance.held) == (0, 3)
    # The refused emails gave their daily quota count back.
    assert await harness.parts.gate.used_today(tenant.id) == 3


async def test_a_suppressed_recipient_in_a_campaign_batch_is_refused_alone(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.parts.redis.sadd(suppression_key(harness.namespace, tenant.id), "blocked@example.net")
    requests = [send_request(message_class=common_pb2.MESSAGE_CLASS_BULK,
                             to=[common_pb2.EmailAddress(email=address)])
                for address in ("a@example.net", "Blocked@Example.net", "c@example.net")]
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(requests=requests),
                                                   metadata=tenant.auth)
    assert [r.HasField("message") for r in reply.results] == [True, False, True]
    assert reply.results[1].error.reason == "SUPPRESSED_RECIPIENT"
    assert (await harness.balance(tenant)).held == 2


async def test_a_batch_mixing_request_ids_and_campaign_emails_answers_each_in_order(harness: IngestHarness):
    tenant = await harness.new_tenant()
    requests = [send_request(subject="one"), send_request(request_id="r-2", subject="two"),
                send_request(subject="three"), send_request(request_id="r-2", subject="two")]
    reply = await harness.messages.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(requests=requests),
                                                   metadata=tenant.auth)
    assert [r.message.subject for r in reply.results] == ["one", "two", "three", "two"]
    assert reply.results[1].message.id == reply.results[3].message.id
    assert await harness.message_rows(tenant) == 3


async def test_batch_calls_beyond_the_passes_in_flight_wait_their_turn_and_are_all_accepted(
        harness: IngestHarness, monkeypatch: pytest.MonkeyPatch):
    tenant = await harness.new_tenant()
    acceptor = harness.parts.acceptor
    accept_together = acceptor._accept_together
    running, most = 0, 0

    async def counted(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await accept_together(*args)
        finally:
            running -= 1

    monkeypatch.setattr(acceptor, "_accept_together", counted)
    calls = [messages_pb2.BatchSendEmailsRequest(requests=[
        send_request(message_class=common_pb2.MESSAGE_CLASS_BULK, subject=f"call {c} email {i}") for i in range(100)])
        for c in range(6)]
    replies = await asyncio.gather(*(harness.messages.BatchSendEmails(call, metadata=tenant.auth) for call in calls))
    assert all(r.HasField("message") for reply in replies for r in reply.results)
    assert most == harness.settings.batch_passes_in_flight
    assert await harness.message_rows(tenant) == 600
