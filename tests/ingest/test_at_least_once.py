"""At-least-once from the first byte: "accepted" means the message, its outbox rows and its credit hold are
committed; the outbox reaches JetStream after the commit — after a crash, through any replica's reconciling pass —
and a publish repeated after a crash is dropped by JetStream's duplicate window."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import credits_pb2
from psycopg_pool import AsyncConnectionPool, PoolClosed

from dev.mesh import forget_namespace
from libs.common.auth import Principal
from libs.common.db import migrate_services
from libs.common.outbox import CommittedRow, OutboxPublisher, OutboxRow
from services.ingest.accept import Acceptor
from services.ingest.server import IngestComponents, build_components, draft_from_proto
from services.ingest.store import MessageStore
from tests.conftest import free_port
from tests.ingest.conftest import IngestHarness, send_request


@pytest.fixture
async def silent_replica(harness: IngestHarness, new_database: Callable[[], str]) -> AsyncIterator[IngestComponents]:
    """An ingest replica with its own database and streams whose outbox publisher never runs — as if it crashed
    right after each commit. It reserves credits in the harness' ledger."""
    dsn = new_database()
    await migrate_services(dsn, ["ingest"])
    settings = replace(harness.settings, postgres_dsn=dsn, grpc_port=free_port(),
                       namespace=f"{harness.namespace}x{secrets.token_hex(3)}")
    parts = await build_components(settings)
    yield parts
    await parts.close()
    await forget_namespace(settings.namespace, settings.nats_url, settings.redis_url)  # streams, bucket, keys


async def _tenant(harness: IngestHarness, replica: IngestComponents) -> Principal:
    tenant_id = f"t-{secrets.token_hex(5)}"
    await replica.tenants.create_tenant(tenant_id)
    await harness.credits.TopUp(credits_pb2.TopUpRequest(tenant=f"tenants/{tenant_id}", amount=10_000,
                                                         request_id="start"), metadata=harness.admin)
    return Principal(tenant_id, frozenset({"send"}))


async def _held(harness: IngestHarness, tenant_id: str) -> int:
    reply = await harness.credits.GetBalance(credits_pb2.GetBalanceRequest(tenant=f"tenants/{tenant_id}"),
                                             metadata=harness.admin)
    return reply.held


async def _outbox(replica: IngestComponents) -> list[tuple[str, str, bytes]]:
    async with replica.pool.connection() as conn:
        cur = await conn.execute("SELECT subject, msg_id, payload FROM ingest.outbox ORDER BY id")
        return [(s, m, bytes(p)) for s, m, p in await cur.fetchall()]


async def _queued(replica: IngestComponents) -> int:
    return sum([(await replica.js.stream_info(stream)).state.messages for stream in replica.topology.send_streams])


async def test_accepted_means_message_outbox_and_credit_hold_are_committed_before_any_publish(
        harness: IngestHarness, silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    accepted = await silent_replica.acceptor.send(principal, draft_from_proto(send_request()))
    message_id = accepted.message.id
    rows = await _outbox(silent_replica)
    assert [(subject, msg_id) for subject, msg_id, _ in rows] == [
        (silent_replica.topology.send_subject("transactional"), message_id),
        (silent_replica.topology.events_subject(principal.tenant_id), f"{message_id}:accepted")]
    assert queue_pb2.SendTask.FromString(rows[0][2]).message_id == message_id
    assert queue_pb2.EventEnvelope.FromString(rows[1][2]).hold_id == message_id
    assert await _held(harness, principal.tenant_id) == accepted.message.credits
    assert await _queued(silent_replica) == 0


async def test_the_publisher_puts_outbox_rows_on_jetstream_under_their_ids_and_clears_them(
        harness: IngestHarness, silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    accepted = await silent_replica.acceptor.send(principal, draft_from_proto(send_request()))
    assert await silent_replica.outbox.publish_pending() == 2
    assert await _outbox(silent_replica) == []
    assert await _queued(silent_replica) == 1
    stored = await silent_replica.js.get_last_msg(silent_replica.topology.send_stream("transactional"),
                                                  silent_replica.topology.send_subject("transactional"))
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == accepted.message.id
    assert queue_pb2.SendTask.FromString(stored.data).message_id == accepted.message.id


async def test_a_publish_repeated_after_a_crash_is_dropped_by_jetstream(harness: IngestHarness,
                                                                       silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    await silent_replica.acceptor.send(principal, draft_from_proto(send_request()))
    rows = await _outbox(silent_replica)
    await silent_replica.outbox.publish_pending()
    # The publisher died after publishing but before its delete committed: the rows are back for the next pass.
    async with silent_replica.pool.connection() as conn:
        for subject, msg_id, payload in rows:
            await conn.execute("INSERT INTO ingest.outbox (subject, msg_id, payload) VALUES (%s, %s, %s)",
                               (subject, msg_id, payload))
    assert await silent_replica.outbox.publish_pending() == 2
    assert await _queued(silent_replica) == 1


async def test_another_replicas_reconciling_pass_publishes_what_a_crashed_replica_committed(
        harness: IngestHarness, silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    for i in range(3):
        await silent_replica.acceptor.send(principal, draft_from_proto(send_request(subject=f"#{i}")))
    survivor = OutboxPublisher(silent_replica.pool, silent_replica.nc, "ingest.outbox", interval_s=0.05,
                               reconcile_after_s=0)
    stop = asyncio.Event()
    running = asyncio.create_task(survivor.run(stop))  # never notified: only its periodic pass finds the rows
    try:
        for _ in range(200):
            if await _queued(silent_replica) == 3:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    assert await _queued(silent_replica) == 3
    assert await _outbox(silent_replica) == []


async def test_a_failed_commit_gives_the_credits_and_the_quota_back(harness: IngestHarness,
                                                                   silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    unreachable = AsyncConnectionPool(silent_replica.settings.postgres_dsn, open=False)  # every use fails
    parts = silent_replica
    acceptor = Acceptor(tenants=parts.tenants, gate=parts.gate, credits=parts.credits, attachments=parts.attachments,
                        store=MessageStore(unreachable), topology=parts.topology,
                        sizes=parts.acceptor.sizes, senders=parts.acceptor.senders)
    with pytest.raises(PoolClosed):  # raised by the commit step, after credits were reserved
        await acceptor.send(principal, draft_from_proto(send_request(request_id="doomed")))
    assert await _held(harness, principal.tenant_id) == 0
    assert await parts.gate.used_today(principal.tenant_id) == 0
    assert await parts.gate.holder(principal.tenant_id, "doomed") is None


async def _committed_rows(replica: IngestComponents, message_id: str) -> list[CommittedRow]:
    async with replica.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, subject, msg_id, payload FROM ingest.outbox WHERE msg_id LIKE %s ORDER BY id",
            (f"{message_id}%",))
        return [CommittedRow(i, OutboxRow(s, m, bytes(p))) for i, s, m, p in await cur.fetchall()]


async def test_the_next_email_is_published_while_the_previous_ones_rows_wait_to_be_deleted(
        harness: IngestHarness, silent_replica: IngestComponents):
    principal = await _tenant(harness, silent_replica)
    publisher = OutboxPublisher(silent_replica.pool, silent_replica.nc, "ingest.outbox", reconcile_after_s=3600)
    first = await silent_replica.acceptor.send(principal, draft_from_proto(send_request(subject="first")))
    first_rows = await _committed_rows(silent_replica, first.message.id)
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    try:
        async with silent_replica.pool.connection() as blocker, blocker.transaction():
            # The first email's rows are locked: once published, their deletion waits for this transaction.
            await blocker.execute("SELECT id FROM ingest.outbox WHERE id = ANY(%s) FOR UPDATE",
                                  ([r.id for r in first_rows],))
            publisher.publish_soon(first_rows)
            await _wait_until_queued(silent_replica, 1)
            second = await silent_replica.acceptor.send(principal, draft_from_proto(send_request(subject="second")))
            publisher.publish_soon(await _committed_rows(silent_replica, second.message.id), urgent=True)
            await _wait_until_queued(silent_replica, 2)
            # ... and the first email's rows are still there: their deletion is still waiting.
            assert {r.row.msg_id for r in first_rows} <= {m for _, m, _ in await _outbox(silent_replica)}
    finally:
        stop.set()
        await running
    assert await _outbox(silent_replica) == []


async def _wait_until_queued(replica: IngestComponents, count: int) -> None:
    for _ in range(200):
        if await _queued(replica) >= count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{await _queued(replica)} emails on the SEND stream after 5 s, expected {count}")
