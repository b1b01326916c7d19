"""A reports service running in-process against the session's real Postgres, Redis and NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
import psycopg
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2, messages_pb2_grpc, reports_pb2_grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from redis.asyncio import Redis

from dev.simulator.signing import SnsSigningCertificate, generate_sns_certificate
from libs.common.grpc_server import serve
from libs.common.jetstream import Topology, connect, publish
from libs.common.unsubscribe import new_key_entry
from libs.providers.ses.webhook import StaticCertificateFetcher
from services.reports.app import build_app
from services.reports.config import ReportsSettings
from tests.conftest import free_port
from tests.reports.builders import eventually

SNS_CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-reports-tests.pem"


@dataclass
class ReportsService:
    """Handles on a running reports service for tests."""

    settings: ReportsSettings
    channel: grpc.aio.Channel
    nc: NATS
    js: JetStreamContext
    redis: Redis
    webhook_url: str
    confirmations: list[tuple[str, object]]
    sns_certificate: SnsSigningCertificate
    sns_cert_url: str

    @property
    def topology(self) -> Topology:
        return Topology(self.settings.namespace)

    @property
    def messages(self) -> messages_pb2_grpc.MessageServiceStub:
        return messages_pb2_grpc.MessageServiceStub(self.channel)

    @property
    def stats(self) -> reports_pb2_grpc.StatsServiceStub:
        return reports_pb2_grpc.StatsServiceStub(self.channel)

    @property
    def suppressions(self) -> reports_pb2_grpc.SuppressionServiceStub:
        return reports_pb2_grpc.SuppressionServiceStub(self.channel)

    async def publish(self, envelopes: Iterable[queue_pb2.EventEnvelope], *, msg_id_suffix: str = "") -> None:
        """Publish envelopes as producers do (Nats-Msg-Id = event id)."""
        for envelope in envelopes:
            await publish(self.js, self.topology.events_subject(envelope.tenant_id), envelope.SerializeToString(),
                          msg_id=envelope.event.event_id + msg_id_suffix)

    def connect_db(self) -> psycopg.AsyncConnection:
        return psycopg.AsyncConnection.connect(self.settings.postgres_dsn, autocommit=True)  # type: ignore[return-value]


def caller(tenant: str, scopes: str = "read,send,admin") -> tuple[tuple[str, str], ...]:
    """gRPC metadata the ingest edge adds for an authenticated caller."""
    return (("x-esp-tenant", tenant), ("x-esp-scopes", scopes))


async def message_state(reports: ReportsService, tenant: str, message_id: str) -> int | None:
    """The message's state as GetMessage shows it, None while reports does not know it."""
    try:
        message = await reports.messages.GetMessage(messages_pb2.GetMessageRequest(name=f"messages/{message_id}"),
                                                    metadata=caller(tenant))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return int(message.state)


async def wait_for_state(reports: ReportsService, tenant: str, message_id: str, state: int) -> None:
    """Wait until the message is in ``state``."""
    async def reached() -> bool:
        return await message_state(reports, tenant, message_id) == state

    await eventually(reached, what=messages_pb2.MessageState.Name(state))


async def _wait_listening(port: int, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@pytest.fixture(scope="session")
async def reports(new_database, redis_url: str, nats_url: str, run_id: str) -> AsyncIterator[ReportsService]:
    """One reports service for the session; tests isolate themselves with their own tenant ids."""
    settings = ReportsSettings(
        postgres_dsn=new_database(), redis_url=redis_url, nats_url=nats_url, namespace=f"{run_id}rep",
        grpc_port=free_port(), webhook_port=free_port(), parked_sweep_interval_s=1.0, log_format="text",
        shutdown_grace_s=2.0,
        # The tests' events happened in 2024: keep them all (retention is tested on its own).
        event_retention_days=10_000, minute_rollup_retention_days=10_000, hour_rollup_retention_days=10_000,
        day_rollup_retention_days=10_000,
        # Two keys, as during a rotation: the first signs, both verify (tests/reports/test_unsubscribe.py).
        unsubscribe_keys=(new_key_entry(2), new_key_entry(1)),
    )
    confirmations: list[tuple[str, object]] = []

    async def confirm(provider_name: str, confirmation: object) -> None:
        confirmations.append((provider_name, confirmation))

    sns_certificate = generate_sns_certificate()
    fetcher = StaticCertificateFetcher({SNS_CERT_URL: sns_certificate.certificate_pem})
    app = await build_app(settings, confirmer=confirm, certificate_fetcher=fetcher)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve(app, settings, ready=ready, stop=stop))
    nc = await connect(nats_url, "reports-tests")
    redis = Redis.from_url(redis_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    try:
        started = asyncio.create_task(ready.wait())
        await asyncio.wait([started, server], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()  # raises why the service did not start
            pytest.fail("the reports service stopped right after starting")
        if not ready.is_set():
            pytest.fail("the reports service did not become ready within 30s")
        await _wait_listening(settings.webhook_port)
        yield ReportsService(settings, channel, nc, nc.jetstream(), redis,
                             f"http://127.0.0.1:{settings.webhook_port}", confirmations, sns_certificate,
                             SNS_CERT_URL)
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)
        await channel.close()
        js = nc.jetstream()
        topology = Topology(settings.namespace)
        for stream in topology.streams:
            try:
                await js.delete_stream(stream)
            except NotFoundError:
                pass
        await nc.close()
        async for key in redis.scan_iter(match=f"{settings.namespace}*", count=1000):
            await redis.delete(key)
        await redis.aclose()
