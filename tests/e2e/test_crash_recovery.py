"""At-least-once from the first byte: a crash between the accept commit and the JetStream publish loses nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from esp.v1 import common_pb2, credits_pb2, credits_pb2_grpc, messages_pb2, messages_pb2_grpc

from dev import mesh as m
from tests.conftest import S3Server
from tests.e2e.conftest import STALL_S, RunningMesh, build_mesh_config, start_mesh
from tests.progress import wait_for_progress

pytestmark = pytest.mark.e2e


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[m.RestartableNats]:
    """A NATS server of this test's own, so the test can kill and restart it (same port, same store)."""
    nats = m.RestartableNats(tmp_path / "jetstream", tmp_path / "logs")
    nats.start()
    yield nats
    nats.crash()


@pytest.fixture
def crash_mesh(private_nats: m.RestartableNats, new_database: Callable[[], str], redis_url: str,
               s3_server: S3Server, run_id: str, smtp_sink: tuple[int, Path],
               tmp_path: Path) -> Iterator[RunningMesh]:
    smtp_port, maildir = smtp_sink
    config = build_mesh_config(new_database(), redis_url, private_nats.url, s3_server,
                               f"{run_id}crash", tmp_path / "mesh-logs")
    running = start_mesh(config, maildir, smtp_port)
    yield running
    running.stop()


def test_an_email_committed_while_nats_is_down_is_sent_after_ingest_crashes_and_restarts(
        crash_mesh: RunningMesh, private_nats: m.RestartableNats):
    mesh = crash_mesh
    # Cut JetStream: the accept path still commits (message + hold + outbox) but cannot publish.
    private_nats.crash()
    with mesh.channel() as channel:
        reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(messages_pb2.SendEmailRequest(
            message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, subject="survives a crash",
            to=[common_pb2.EmailAddress(email="rcpt@example.net")], text_body="still here",
            **{"from": common_pb2.EmailAddress(email="shop@example.com")}), metadata=mesh.auth(), timeout=10)
    message_id = reply.message.id
    # Ingest dies before its publisher could ever publish the row.
    mesh.mesh.processes["ingest"].kill()

    private_nats.start()
    mesh.mesh.start_service("ingest")
    # Nothing reaches the sink while NATS and ingest come back: a longer stall window than a flowing mesh needs.
    mail = mesh.wait_for_mail(lambda msg: msg["X-ESP-Message-Id"] == message_id, stall_s=2 * STALL_S)
    assert mail["Subject"] == "survives a crash"



def _balance(mesh: RunningMesh) -> credits_pb2.Balance:
    with mesh.channel() as channel:
        return credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credits_pb2.GetBalanceRequest(tenant="tenants/acme"), metadata=mesh.auth(), timeout=10)


def _balance_once_served(mesh: RunningMesh) -> credits_pb2.Balance | None:
    """The balance; None while the restarted ledger is not reachable yet (UNAVAILABLE, which a client retries: ingest's
    channel reconnects to it within a second of its serving)."""
    try:
        return _balance(mesh)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_settlement_worker_killed_while_a_campaign_settles_loses_no_credit(crash_mesh: RunningMesh):
    mesh = crash_mesh
    before = _balance(mesh)
    with mesh.channel() as channel:
        reply = messages_pb2_grpc.MessageServiceStub(channel).BatchSendEmails(messages_pb2.BatchSendEmailsRequest(
            requests=[messages_pb2.SendEmailRequest(
                message_class=common_pb2.MESSAGE_CLASS_BULK, subject=f"news {i}", text_body="news",
                to=[common_pb2.EmailAddress(email=f"reader{i}@example.net")],
                **{"from": common_pb2.EmailAddress(email="shop@example.com")}) for i in range(200)]),
            metadata=mesh.auth(), timeout=30)
    charged = sum(result.message.credits for result in reply.results)
    assert charged > 0 and all(result.HasField("message") for result in reply.results)

    # Settlement dies in the middle of the campaign (no chance to ack what it was settling) ...
    ledger = mesh.mesh.processes["ledger"]
    workers = _children(ledger.popen.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    # ... which takes the ledger down with it (the orchestrator restarts the whole replica) ...
    assert ledger.popen.wait(timeout=30) != 0
    mesh.mesh.start_service("ledger")

    # ... and once it is back every hold is settled, none twice.
    after = wait_for_progress(lambda: _balance_once_served(mesh), lambda b: b is not None and b.held == before.held,
                              what="every hold settled",
                              stall_s=2 * STALL_S, every_s=0.2,
                              progress=lambda b: b and (b.held, b.spent),
                              describe=lambda b: f"held {b.held - before.held} of the campaign's {charged} still"
                              if b else "the ledger not reachable yet")
    assert after is not None
    assert (after.spent - before.spent, after.held, before.available - after.available) == (
        charged, before.held, charged)
