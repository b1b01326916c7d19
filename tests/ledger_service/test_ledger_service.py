"""The ledger service as deployed: gRPC wiring, the JetStream outcome consumer and the notification publisher."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, credits_pb2, credits_pb2_grpc, messages_pb2

from libs.common.db import migrate_services
from libs.common.grpc_server import serve
from libs.common.jetstream import Topology, publish
from services.ledger.config import LedgerSettings
from services.ledger.server import build_app
from tests.conftest import free_port

ADMIN = (("x-esp-tenant", ""), ("x-esp-scopes", "platform-admin"))


@dataclass
class LedgerService:
    stub: credits_pb2_grpc.CreditServiceStub
    js: object
    topology: Topology


@pytest.fixture(params=[True, False], ids=["settlement-worker", "settlement-in-process"])
async def ledger_service(request: pytest.FixtureRequest, new_database: Callable[[], str], nats_url: str,
                         redis_url: str, run_id: str) -> AsyncIterator[LedgerService]:
    dsn = new_database()
    await migrate_services(dsn, ["ledger"])
    namespace = f"{run_id}led{free_port()}"
    port = free_port()
    settings = LedgerSettings(postgres_dsn=dsn, nats_url=nats_url, redis_url=redis_url, namespace=namespace,
                              grpc_port=port, sweep_interval_s=0.2, shutdown_grace_s=3,
                              settlement_worker=request.param)
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(await build_app(settings), settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 20)
    nc = await nats.connect(nats_url)
    topology = Topology(namespace)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield LedgerService(credits_pb2_grpc.CreditServiceStub(channel), nc.jetstream(), topology)
    stop.set()
    await asyncio.wait_for(task, 20)
    js = nc.jetstream()
    for name in topology.streams:
        await js.delete_stream(name)
    await nc.close()


async def _balance(service: LedgerService, tenant: str) -> credits_pb2.Balance:
    return await service.stub.GetBalance(credits_pb2.GetBalanceRequest(tenant=f"tenants/{tenant}"), metadata=ADMIN)


async def _eventually(check: Callable[[], object], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await check():  # type: ignore[misc]
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _sent_event(tenant: str, hold_id: str) -> queue_pb2.EventEnvelope:
    return queue_pb2.EventEnvelope(
        tenant_id=tenant, message_id=hold_id, hold_id=hold_id, final=True,
        message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        event=messages_pb2.MessageEvent(event_id=f"{hold_id}:sent", type=messages_pb2.MESSAGE_EVENT_TYPE_SENT))


async def test_the_same_sent_event_delivered_three_times_commits_once(ledger_service: LedgerService):
    await ledger_service.stub.TopUp(credits_pb2.TopUpRequest(tenant="tenants/acme", amount=100, request_id="t1"),
                                    metadata=ADMIN)
    hold = await ledger_service.stub.ReserveCredits(credits_pb2.ReserveCreditsRequest(
        tenant="tenants/acme", hold_id="m-1", message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, email_count=1))
    envelope = _sent_event("acme", "m-1")
    # Three deliveries that JetStream's dedupe does not catch (different Nats-Msg-Ids): only the event id is equal.
    for copy in range(3):
        await publish(ledger_service.js, ledger_service.topology.events_subject("acme", final=True),
                      envelope.SerializeToString(), msg_id=f"copy-{copy}")

    async def committed() -> bool:
        balance = await _balance(ledger_service, "acme")
        return balance.held == 0 and balance.spent == hold.amount

    await _eventually(committed)
    await asyncio.sleep(0.5)  # the later copies are consumed too; nothing must change
    balance = await _balance(ledger_service, "acme")
    assert (balance.available, balance.held, balance.spent) == (100 - hold.amount, 0, hold.amount)


def _settlement_workers(namespace: str) -> list[int]:
    """Pids of this process's children that run the settlement worker of the ledger serving ``namespace`` (other
    fixtures of the session may run ledgers of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (int(fields[1]) == os.getpid() and b"services.ledger.settlement_worker" in cmdline
                and f"ESP_NAMESPACE={namespace}".encode() in environ):
            found.append(int(stat.parent.name))
    return found


async def test_the_settlement_worker_is_the_ledgers_child_at_lower_cpu_priority(ledger_service: LedgerService,
                                                                              request: pytest.FixtureRequest):
    workers = _settlement_workers(ledger_service.topology.namespace)
    if "settlement-in-process" in request.node.callspec.id:
        assert workers == []
        return
    assert len(workers) == 1
    assert _niceness(workers[0]) == min(19, os.nice(0) + LedgerSettings().settlement_niceness)


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_a_failed_event_releases_the_hold(ledger_service: LedgerService):
    await ledger_service.stub.TopUp(credits_pb2.TopUpRequest(tenant="tenants/beta", amount=50, request_id="t1"),
                                    metadata=ADMIN)
    await ledger_service.stub.ReserveCredits(credits_pb2.ReserveCreditsRequest(
        tenant="tenants/beta", hold_id="m-2", message_class=common_pb2.MESSAGE_CLASS_BULK))
    envelope = _sent_event("beta", "m-2")
    envelope.event.type = messages_pb2.MESSAGE_EVENT_TYPE_FAILED
    envelope.event.event_id = "m-2:failed"
    await publish(ledger_service.js, ledger_service.topology.events_subject("beta", final=True),
                  envelope.SerializeToString(), msg_id="m-2:failed")

    async def released() -> bool:
        balance = await _balance(ledger_service, "beta")
        return balance.held == 0 and balance.available == 50

    await _eventually(released)
    assert (await _balance(ledger_service, "beta")).spent == 0


async def test_insufficient_credits_carry_the_shortfall_in_error_info(ledger_service: LedgerService):
    reply = await ledger_service.stub.BatchReserveCredits(credits_pb2.BatchReserveCreditsRequest(requests=[
        credits_pb2.ReserveCreditsRequest(tenant="tenants/poor", hold_id="m-3",
                                          message_class=common_pb2.MESSAGE_CLASS_OTP)]))
    error = reply.results[0].error
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert error.reason == "INSUFFICIENT_CREDITS"
    assert int(error.metadata["shortfall"]) > 0


async def test_another_tenant_cannot_read_a_balance(ledger_service: LedgerService):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger_service.stub.GetBalance(credits_pb2.GetBalanceRequest(tenant="tenants/acme"),
                                             metadata=(("x-esp-tenant", "intruder"), ("x-esp-scopes", "read")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_crossing_the_low_balance_threshold_emits_one_account_event(ledger_service: LedgerService):
    await ledger_service.stub.TopUp(credits_pb2.TopUpRequest(tenant="tenants/low", amount=20, request_id="t1"),
                                    metadata=ADMIN)
    await ledger_service.stub.SetLowBalanceThreshold(credits_pb2.SetLowBalanceThresholdRequest(
        tenant="tenants/low", threshold=15), metadata=ADMIN)
    for i in range(4):  # the first reserve crosses below 15; the later ones stay below: no new event
        await ledger_service.stub.ReserveCredits(credits_pb2.ReserveCreditsRequest(
            tenant="tenants/low", hold_id=f"low-{i}", message_class=common_pb2.MESSAGE_CLASS_OTP))
    sub = await ledger_service.js.subscribe(ledger_service.topology.account_subject("low"),
                                            stream=ledger_service.topology.events_stream, ordered_consumer=True)
    first = await sub.next_msg(timeout=10)
    event = queue_pb2.AccountEvent.FromString(first.data)
    assert (event.tenant_id, event.kind) == ("low", "low_balance_crossed")
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=2)


async def test_a_backlog_larger_than_a_fetch_with_progress_events_between_settles_every_hold(
        ledger_service: LedgerService):
    await ledger_service.stub.TopUp(credits_pb2.TopUpRequest(tenant="tenants/busy", amount=10_000, request_id="t1"),
                                    metadata=ADMIN)
    hold_ids = [f"busy-{i}" for i in range(700)]
    reply = await ledger_service.stub.BatchReserveCredits(credits_pb2.BatchReserveCreditsRequest(requests=[
        credits_pb2.ReserveCreditsRequest(tenant="tenants/busy", hold_id=hold_id,
                                          message_class=common_pb2.MESSAGE_CLASS_BULK) for hold_id in hold_ids]))
    assert [r.hold.name for r in reply.results] == [f"holds/{hold_id}" for hold_id in hold_ids]
    for hold_id in hold_ids:  # a non-final event before each final one: the consumer must skip it and go on
        progress = _sent_event("busy", hold_id)
        progress.final = False
        progress.event.type = messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED
        progress.event.event_id = f"{hold_id}:a:1"
        await publish(ledger_service.js, ledger_service.topology.events_subject("busy"),
                      progress.SerializeToString(), msg_id=progress.event.event_id)
        await publish(ledger_service.js, ledger_service.topology.events_subject("busy", final=True),
                      _sent_event("busy", hold_id).SerializeToString(), msg_id=f"{hold_id}:sent")

    async def settled() -> bool:
        balance = await _balance(ledger_service, "busy")
        return balance.held == 0

    await _eventually(settled, timeout_s=30)
    balance = await _balance(ledger_service, "busy")
    assert (balance.available, balance.spent) == (10_000 - 700, 700)
