"""The accept path while Redis or Postgres is down, and once it is back.

While a dependency is down every call that needs it is refused UNAVAILABLE, with a ``RetryInfo`` of about a second
and an ``ErrorInfo`` (reason ``DEPENDENCY_UNAVAILABLE``) naming the dependency, so that a client following gRPC's
retry rules tries again; nothing is accepted that is then lost, and nothing is charged. Once the dependency is back
the next call succeeds: the connection pools reconnect by themselves.

Ingest and the ledger run in this process over a private redis-server and a private PostgreSQL (both on free
ports) that the tests stop and start again; NATS and S3 are the session's.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from esp.v1 import messages_pb2

from dev.mesh import Process, forget_namespace, start_postgres, start_redis
from libs.common.db import migrate_services
from libs.common.dependency_errors import DEPENDENCY_UNAVAILABLE
from services.ingest.config import IngestSettings
from services.ingest.server import build_components, service_app
from services.ledger.config import LedgerSettings
from services.ledger.server import build_app as build_ledger
from tests.conftest import S3Server, free_port
from tests.ingest.conftest import IngestHarness, RpcFailure, RunningService, refused, send_request, start_service


class PrivateRedis:
    """A redis-server of the tests' own, which they crash (SIGKILL) and start again on the same port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_redis(self.port, self.log_dir)

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    async def down(self) -> None:
        """Crash it (its data goes with it: it is started without persistence, as a cache restarts)."""
        await asyncio.to_thread(self.stop)

    async def up(self) -> None:
        await asyncio.to_thread(self.start)


class PrivatePostgres:
    """A PostgreSQL cluster of the tests' own (initdb on first start), stopped by a fast shutdown (it ends every
    session, as a restart or a failover does) and started again on the same port."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.process: Process | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.process = start_postgres(self.data_dir, self.port, self.log_dir)

    def stop(self) -> None:
        assert self.process is not None
        # Signalled directly: under root the process started is runuser, which would turn SIGINT into SIGTERM
        # (PostgreSQL's smart shutdown, which waits for every client to leave).
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGINT)
        self.process.popen.wait(timeout=30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    async def down(self) -> None:
        await asyncio.to_thread(self.stop)

    async def up(self) -> None:
        await asyncio.to_thread(self.start)


@pytest.fixture(scope="module")
def postgres_dir() -> Iterator[Path]:
    """Where the private cluster lives. Not under pytest's tmp_path: PostgreSQL refuses to run as root, so it runs
    as the postgres user, who cannot enter pytest's root-only temporary directories."""
    parent = Path(tempfile.mkdtemp(prefix="esp-outage-pg-"))
    parent.chmod(0o755)
    yield parent / "data"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path_factory.mktemp("outage-redis"))
    redis.start()
    yield redis
    if redis.process is not None:
        redis.process.kill()


@pytest.fixture(scope="module")
def private_postgres(postgres_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    postgres = PrivatePostgres(postgres_dir, tmp_path_factory.mktemp("outage-postgres"))
    postgres.start()
    yield postgres
    if postgres.process is not None and postgres.process.popen.poll() is None:
        postgres.stop()


@pytest.fixture(scope="module")
async def outage_harness(private_redis: PrivateRedis, private_postgres: PrivatePostgres, nats_url: str,
                         s3_server: S3Server, run_id: str) -> AsyncIterator[IngestHarness]:
    """Ingest and the ledger over the private Redis and Postgres."""
    await migrate_services(private_postgres.dsn, ["ingest", "ledger", "reports"])
    namespace = f"{run_id}out{secrets.token_hex(2)}"
    settings = IngestSettings(
        postgres_dsn=private_postgres.dsn, redis_url=private_redis.url, nats_url=nats_url, namespace=namespace,
        grpc_port=free_port(), s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_bucket=f"{run_id}-outages", admin_token=secrets.token_hex(16),
        ledger_addr=f"127.0.0.1:{free_port()}", reports_addr=f"127.0.0.1:{free_port()}",
        router_addr=f"127.0.0.1:{free_port()}", api_key_cache_s=2.0, shutdown_grace_s=2.0, log_format="text")
    ledger_settings = LedgerSettings(
        postgres_dsn=private_postgres.dsn, redis_url=private_redis.url, nats_url=nats_url, namespace=namespace,
        grpc_port=int(settings.ledger_addr.rsplit(":", 1)[1]), shutdown_grace_s=2.0)
    services: list[RunningService] = []
    channel: grpc.aio.Channel | None = None
    try:
        services.append(await start_service(await build_ledger(ledger_settings), ledger_settings))
        parts = await build_components(settings)
        services.append(await start_service(service_app(parts), settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        yield IngestHarness(parts, settings, channel, s3_server, services)
    finally:
        if channel is not None:
            await channel.close()
        for service in reversed(services):
            await service.shutdown()
        await forget_namespace(namespace, nats_url, private_redis.url)


@pytest.fixture
async def redis_outage(private_redis: PrivateRedis) -> AsyncIterator[PrivateRedis]:
    """The private Redis, for the test to take down; up again after the test, whatever the test did."""
    yield private_redis
    if not private_redis.running:
        await private_redis.up()


@pytest.fixture
async def postgres_outage(private_postgres: PrivatePostgres) -> AsyncIterator[PrivatePostgres]:
    """The private Postgres, for the test to take down; up again after the test, whatever the test did."""
    yield private_postgres
    if not private_postgres.running:
        await private_postgres.up()


def assert_dependency_unavailable(failed: RpcFailure, dependency: str) -> None:
    """Refused as a client should hear an outage: UNAVAILABLE, retry in about a second, the dependency named."""
    assert failed.code == grpc.StatusCode.UNAVAILABLE, failed
    assert failed.info.reason == DEPENDENCY_UNAVAILABLE
    assert failed.info.metadata["dependency"] == dependency
    assert failed.retry is not None, "no RetryInfo"
    assert failed.retry.retry_delay.ToMilliseconds() == 1000


PAYLOAD = b"%PDF-1.7 an invoice"


def batch_of(count: int) -> messages_pb2.BatchSendEmailsRequest:
    return messages_pb2.BatchSendEmailsRequest(requests=[send_request(subject=f"n{i}") for i in range(count)])


# -- Redis -----------------------------------------------------------------------------------------------------
async def test_while_redis_is_down_a_send_is_unavailable_with_retry_info_naming_redis(
        outage_harness: IngestHarness, redis_outage: PrivateRedis):
    tenant = await outage_harness.new_tenant(credits=100)
    await redis_outage.down()
    failed = await refused(outage_harness.messages.SendEmail(send_request(request_id="r-1"), metadata=tenant.auth,
                                                             timeout=30))
    assert_dependency_unavailable(failed, "redis")
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_while_redis_is_down_a_batch_is_unavailable_as_a_whole(outage_harness: IngestHarness,
                                                                     redis_outage: PrivateRedis):
    tenant = await outage_harness.new_tenant(credits=100)
    await redis_outage.down()
    failed = await refused(outage_harness.messages.BatchSendEmails(batch_of(5), metadata=tenant.auth, timeout=30))
    assert_dependency_unavailable(failed, "redis")
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_while_redis_is_down_an_upload_is_still_stored(outage_harness: IngestHarness,
                                                             redis_outage: PrivateRedis):
    # An upload needs Postgres and S3, not Redis.
    tenant = await outage_harness.new_tenant(credits=0)
    await redis_outage.down()
    attachment = await outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf")
    assert attachment.size_bytes == len(PAYLOAD)


async def test_once_redis_is_back_the_next_send_is_accepted(outage_harness: IngestHarness,
                                                            redis_outage: PrivateRedis):
    tenant = await outage_harness.new_tenant(credits=100)
    await redis_outage.down()
    await refused(outage_harness.messages.SendEmail(send_request(), metadata=tenant.auth, timeout=30))
    await redis_outage.up()
    message = await outage_harness.send(tenant, send_request(request_id="after-redis"))
    assert message.request_id == "after-redis"
    reply = await outage_harness.messages.BatchSendEmails(batch_of(3), metadata=tenant.auth, timeout=30)
    assert all(result.HasField("message") for result in reply.results)
    assert await outage_harness.message_rows(tenant) == 4


# -- Postgres --------------------------------------------------------------------------------------------------
async def test_while_postgres_is_down_a_send_is_unavailable_with_retry_info_naming_postgres(
        outage_harness: IngestHarness, postgres_outage: PrivatePostgres):
    tenant = await outage_harness.new_tenant(credits=100)
    await postgres_outage.down()
    failed = await refused(outage_harness.messages.SendEmail(send_request(request_id="p-1"), metadata=tenant.auth,
                                                             timeout=30))
    assert_dependency_unavailable(failed, "postgres")
    await postgres_outage.up()
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_while_postgres_is_down_a_batch_is_unavailable_as_a_whole(outage_harness: IngestHarness,
                                                                        postgres_outage: PrivatePostgres):
    tenant = await outage_harness.new_tenant(credits=100)
    await postgres_outage.down()
    failed = await refused(outage_harness.messages.BatchSendEmails(batch_of(5), metadata=tenant.auth, timeout=30))
    assert_dependency_unavailable(failed, "postgres")
    await postgres_outage.up()
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_while_postgres_is_down_an_upload_is_unavailable(outage_harness: IngestHarness,
                                                               postgres_outage: PrivatePostgres):
    tenant = await outage_harness.new_tenant(credits=0)
    await postgres_outage.down()
    failed = await refused(outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))
    assert_dependency_unavailable(failed, "postgres")


async def test_once_postgres_is_back_the_next_send_is_accepted(outage_harness: IngestHarness,
                                                               postgres_outage: PrivatePostgres):
    tenant = await outage_harness.new_tenant(credits=100)
    await postgres_outage.down()
    await refused(outage_harness.messages.SendEmail(send_request(), metadata=tenant.auth, timeout=30))
    await postgres_outage.up()
    message = await outage_harness.send(tenant, send_request(request_id="after-postgres"))
    assert message.request_id == "after-postgres"
    reply = await outage_harness.messages.BatchSendEmails(batch_of(3), metadata=tenant.auth, timeout=30)
    assert all(result.HasField("message") for result in reply.results)
    assert await outage_harness.message_rows(tenant) == 4
