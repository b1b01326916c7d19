"""Concurrent SendEmail calls without request_id or attachments are accepted together (one submission per step for
all of them), and each caller still gets its own email's answer: its message, or the refusal of that email alone."""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import grpc
import pytest
from esp.v1 import common_pb2, messages_pb2
from psycopg_pool import AsyncConnectionPool, PoolClosed

from libs.common.auth import Principal
from libs.common.batching import BATCH_SIZE
from libs.common.suppressions import suppression_key_for_every_class
from services.ingest.accept import Acceptor
from services.ingest.server import draft_from_proto
from services.ingest.store import MessageStore
from tests.ingest.conftest import IngestHarness, RpcFailure, count_passes, failure, send_request


def _admissions() -> tuple[float, float]:
    """(emails, round trips) of ingest's Redis admission so far."""
    histogram = BATCH_SIZE.labels("ingest-redis-admit")
    samples = {s.name: s.value for metric in histogram.collect() for s in metric.samples}
    return samples["esp_batch_size_sum"], samples["esp_batch_size_count"]


async def _send_all(harness: IngestHarness, auth: tuple[tuple[str, str], ...],
                    requests: list[messages_pb2.SendEmailRequest]) -> list[Any]:
    """Every request sent at once; each one's Message or RpcFailure."""
    async def one(request: messages_pb2.SendEmailRequest) -> Any:
        try:
            return (await harness.messages.SendEmail(request, metadata=auth)).message
        except grpc.aio.AioRpcError as exc:
            return failure(exc)
    return await asyncio.gather(*(one(r) for r in requests))


async def test_concurrent_sends_are_accepted_together_and_each_caller_gets_its_own_message(harness: IngestHarness):
    tenant = await harness.new_tenant()
    emails_before, trips_before = _admissions()
    requests = [send_request(subject=f"receipt {i}", to=[common_pb2.EmailAddress(email=f"buyer{i}@example.net")])
                for i in range(60)]
    messages = await _send_all(harness, tenant.auth, requests)
    assert [m.subject for m in messages] == [f"receipt {i}" for i in range(60)]
    assert [m.to[0].email for m in messages] == [f"buyer{i}@example.net" for i in range(60)]
    assert len({m.id for m in messages}) == 60
    assert await harness.message_rows(tenant) == 60
    assert (await harness.balance(tenant)).held == sum(m.credits for m in messages)
    emails, trips = _admissions()
    assert emails - emails_before == 60
    assert trips - trips_before < 60  # some of them shared a round trip


async def test_a_suppressed_recipient_among_concurrent_sends_is_refused_alone(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.parts.redis.sadd(suppression_key_for_every_class(harness.namespace, tenant.id), "blocked@example.net")
    addresses = ["a@example.net", "b@example.net", "Blocked@Example.net", "c@example.net"]
    outcomes = await _send_all(harness, tenant.auth, [
        send_request(to=[common_pb2.EmailAddress(email=address)]) for address in addresses])
    refused = outcomes[2]
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION and refused.info.reason == "SUPPRESSED_RECIPIENT"
    assert [m.to[0].email for i, m in enumerate(outcomes) if i != 2] == ["a@example.net", "b@example.net",
                                                                       "c@example.net"]
    assert await harness.message_rows(tenant) == 3


async def test_concurrent_sends_beyond_the_credits_refuse_only_the_excess(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=3)  # a bulk email costs 1 in the default price book
    outcomes = await _send_all(harness, tenant.auth, [
        send_request(message_class=common_pb2.MESSAGE_CLASS_BULK, subject=f"s{i}") for i in range(7)])
    accepted = [o for o in outcomes if not isinstance(o, RpcFailure)]
    refused = [o for o in outcomes if isinstance(o, RpcFailure)]
    assert len(accepted) == 3 and len(refused) == 4
    assert {r.code for r in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert await harness.message_rows(tenant) == 3
    assert (await harness.balance(tenant)).held == 3
    assert await harness.parts.gate.used_today(tenant.id) == 3  # the refused ones gave their quota back


def acceptor_whose_commits_fail(harness: IngestHarness) -> Acceptor:
    """The harness's acceptor, but storing messages through a Postgres pool that is closed: every commit fails."""
    parts = harness.parts
    unreachable = AsyncConnectionPool(harness.settings.postgres_dsn, open=False)
    return Acceptor(tenants=parts.tenants, gate=parts.gate, credits=parts.credits, attachments=parts.attachments,
                    store=MessageStore(unreachable), topology=parts.topology, sizes=parts.acceptor.sizes,
                    senders=parts.acceptor.senders)


async def test_a_failed_commit_of_concurrent_sends_fails_each_and_gives_credits_and_quota_back(
        harness: IngestHarness):
    tenant = await harness.new_tenant()
    acceptor = acceptor_whose_commits_fail(harness)
    principal = Principal(tenant.id, frozenset({"send"}))
    outcomes = await asyncio.gather(*(acceptor.send(principal, draft_from_proto(send_request(subject=f"s{i}")))
                                      for i in range(5)), return_exceptions=True)
    assert all(isinstance(o, PoolClosed) for o in outcomes)
    assert (await harness.balance(tenant)).held == 0
    assert await harness.parts.gate.used_today(tenant.id) == 0


async def test_concurrent_sends_failed_by_one_error_each_get_it_without_the_other_callers_frames(
        harness: IngestHarness):
    tenant = await harness.new_tenant()
    acceptor = acceptor_whose_commits_fail(harness)
    principal = Principal(tenant.id, frozenset({"send"}))

    async def frames_of_the_error(index: int) -> int:
        try:
            await acceptor.send(principal, draft_from_proto(send_request(subject=f"s{index}")))
        except PoolClosed as exc:
            return len(traceback.extract_tb(exc.__traceback__))
        raise AssertionError("the send was accepted")

    frames = await asyncio.gather(*(frames_of_the_error(i) for i in range(5)))
    assert len(set(frames)) == 1, frames  # one error for the five (the commit failed); no traceback grew


async def test_a_send_whose_caller_goes_away_is_still_accepted_whole(harness: IngestHarness):
    tenant = await harness.new_tenant()
    principal = Principal(tenant.id, frozenset({"send"}))
    acceptor = harness.parts.acceptor
    await acceptor.tenants.get_tenant(tenant.id)  # cached: each call joins its pool without waiting for Postgres
    calls = [asyncio.ensure_future(acceptor.send(principal, draft_from_proto(send_request(subject=f"s{i}"))))
             for i in range(5)]
    await asyncio.sleep(0)  # the calls have joined their pool
    calls[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    answered = [await call for i, call in enumerate(calls) if i != 1]
    await acceptor.drain()
    assert len(answered) == 4
    assert await harness.message_rows(tenant) == 5  # the abandoned one too, with its hold
    assert (await harness.balance(tenant)).held == 5 * answered[0].message.credits


async def test_concurrent_sends_with_request_ids_are_pooled_too_and_their_retries_answer_the_first(
        harness: IngestHarness, monkeypatch: pytest.MonkeyPatch):
    tenant = await harness.new_tenant()
    passes = count_passes(harness.parts.acceptor, monkeypatch)
    requests = [send_request(request_id=f"order-{i}", subject=f"receipt {i}") for i in range(40)]
    first = await _send_all(harness, tenant.auth, requests)
    assert [m.request_id for m in first] == [f"order-{i}" for i in range(40)]
    assert sum(passes) == 40 and len(passes) < 40  # went through the steps in shared passes
    again = await _send_all(harness, tenant.auth, requests)
    assert [m.id for m in again] == [m.id for m in first]
    assert await harness.message_rows(tenant) == 40
