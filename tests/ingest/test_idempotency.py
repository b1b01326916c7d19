"""Idempotency (AIP-155): a request_id, scoped to its tenant, makes a send happen once, however often (and however
concurrently) it is repeated; Postgres' unique key is the truth and Redis the fast path."""

from __future__ import annotations

import asyncio

import grpc
from esp.v1 import credits_pb2, messages_pb2

from libs.common.auth import Principal
from services.ingest.server import IngestComponents, draft_from_proto
from tests.ingest.conftest import IngestHarness, TenantHandle, failure, refused, send_request


async def _held(harness: IngestHarness, tenant: TenantHandle) -> int:
    return (await harness.balance(tenant)).held


async def test_a_repeated_request_returns_the_first_response(harness: IngestHarness):
    tenant = await harness.new_tenant()
    first = await harness.send(tenant, send_request(request_id="order-1"))
    again = await harness.send(tenant, send_request(request_id="order-1"))
    assert again == first
    assert await harness.message_rows(tenant) == 1
    assert await _held(harness, tenant) == first.credits


async def test_the_same_request_id_with_a_different_request_is_already_exists(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.send(tenant, send_request(request_id="order-2"))
    failed = await refused(harness.messages.SendEmail(send_request(request_id="order-2", subject="Another"),
                                                      metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.ALREADY_EXISTS
    assert failed.info.reason == "REQUEST_ID_REUSED"
    assert failed.info.metadata["request_id"] == "order-2"
    assert failed.fields == ["request_id"]
    assert await harness.message_rows(tenant) == 1


async def test_request_ids_are_scoped_per_tenant(harness: IngestHarness):
    one, other = await harness.new_tenant(), await harness.new_tenant()
    first = await harness.send(one, send_request(request_id="shared-id"))
    second = await harness.send(other, send_request(request_id="shared-id"))
    assert first.id != second.id


async def test_a_thousand_concurrent_identical_requests_create_one_message(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=5)
    request = send_request(request_id="burst-1")
    replies = await asyncio.gather(*(harness.messages.SendEmail(request, metadata=tenant.auth, timeout=60)
                                     for _ in range(1000)))
    assert len({r.message.id for r in replies}) == 1
    assert all(r.message == replies[0].message for r in replies)
    assert await harness.message_rows(tenant) == 1
    assert await _held(harness, tenant) == replies[0].message.credits
    assert await harness.parts.gate.used_today(tenant.id) == 1


async def test_concurrent_identical_requests_on_two_replicas_create_one_message(harness: IngestHarness,
                                                                                replica: IngestComponents):
    tenant = await harness.new_tenant()
    principal = await harness.parts.tenants.authenticate(tenant.key)
    draft = draft_from_proto(send_request(request_id="two-replicas"))
    results = await asyncio.gather(*(acceptor.send(principal, draft) for _ in range(100)
                                     for acceptor in (harness.parts.acceptor, replica.acceptor)))
    assert len({r.message.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await harness.message_rows(tenant) == 1
    assert await _held(harness, tenant) == results[0].message.credits


async def test_concurrent_different_requests_with_one_id_let_exactly_one_through(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=1000)
    outcomes = await asyncio.gather(*(harness.messages.SendEmail(
        send_request(request_id="contested", subject=f"variant {i}"), metadata=tenant.auth, timeout=60)
        for i in range(20)), return_exceptions=True)
    accepted = [o for o in outcomes if isinstance(o, messages_pb2.SendEmailResponse)]
    assert len(accepted) == 1
    assert {failure(o).info.reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {
        "REQUEST_ID_REUSED"}
    assert await harness.message_rows(tenant) == 1


async def test_postgres_answers_when_redis_has_forgotten_the_request_id(harness: IngestHarness):
    tenant = await harness.new_tenant()
    first = await harness.send(tenant, send_request(request_id="forgotten"))
    await harness.parts.redis.delete(harness.parts.gate.claim_key(tenant.id, "forgotten"))
    again = await harness.send(tenant, send_request(request_id="forgotten"))
    assert again == first
    assert await harness.message_rows(tenant) == 1
    assert await _held(harness, tenant) == first.credits  # the second hold was released
    assert await harness.parts.gate.used_today(tenant.id) == 1  # and its quota count given back
    # Redis knows the request_id again: the next retry takes the fast path.
    assert (await harness.parts.gate.holder(tenant.id, "forgotten") or b"").endswith(first.id.encode())


async def test_postgres_refuses_a_different_request_when_redis_has_forgotten_the_id(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.send(tenant, send_request(request_id="forgotten-2"))
    await harness.parts.redis.delete(harness.parts.gate.claim_key(tenant.id, "forgotten-2"))
    failed = await refused(harness.messages.SendEmail(send_request(request_id="forgotten-2", subject="other"),
                                                      metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.ALREADY_EXISTS
    assert await harness.message_rows(tenant) == 1


async def test_a_refused_request_leaves_its_request_id_free_for_a_retry(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.messages.SendEmail(send_request(request_id="after-top-up"),
                                                      metadata=tenant.auth))
    assert failed.info.reason == "INSUFFICIENT_CREDITS"
    await harness.credits.TopUp(credits_pb2.TopUpRequest(tenant=tenant.name, amount=1000, request_id="top-up"),
                                metadata=harness.admin)
    sent = await harness.send(tenant, send_request(request_id="after-top-up"))
    assert sent.request_id == "after-top-up"
    assert await harness.message_rows(tenant) == 1


async def test_redis_remembers_a_request_id_for_at_least_a_day(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.send(tenant, send_request(request_id="kept"))
    ttl = await harness.parts.redis.ttl(harness.parts.gate.claim_key(tenant.id, "kept"))
    assert ttl > 86_400 - 60


async def test_a_retry_of_a_send_whose_attachment_was_deleted_since_returns_the_first_response(
        harness: IngestHarness):
    tenant = await harness.new_tenant()
    attachment = await harness.upload(tenant, b"contract")
    first = await harness.send(tenant, send_request(request_id="with-attachment", attachment_ids=[attachment.id]))
    await harness.parts.attachments.delete(tenant.id, attachment.id)
    again = await harness.send(tenant, send_request(request_id="with-attachment", attachment_ids=[attachment.id]))
    assert again == first


async def test_a_concurrent_twin_in_the_same_process_gets_the_first_ones_answer(harness: IngestHarness):
    tenant = await harness.new_tenant()
    principal = Principal(tenant.id, frozenset({"send"}))
    draft = draft_from_proto(send_request(request_id="twins"))
    first, second = await asyncio.gather(harness.parts.acceptor.send(principal, draft),
                                         harness.parts.acceptor.send(principal, draft))
    assert (first.created, second.created) == (True, False)
    assert first.message == second.message
