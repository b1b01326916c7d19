"""Attachments while S3 is down, and once it is back: an upload is refused UNAVAILABLE with a ``RetryInfo`` of about a
second and an ``ErrorInfo`` naming S3 (never INTERNAL, which a client following gRPC's retry rules gives up on), and
nothing is recorded; once S3 is back the next upload is stored.

Ingest runs in this process over a private S3 server (rclone on a free port, its objects in a directory that
outlives a restart) that the tests stop and start again; Postgres, Redis and NATS are the session's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from dev.mesh import S3Process, forget_namespace, start_s3
from services.ingest.config import IngestSettings
from services.ingest.server import build_components, service_app
from tests.conftest import S3Server, free_port
from tests.ingest.conftest import IngestHarness, RunningService, TenantHandle, refused, start_service
from tests.ingest.test_dependency_outages import PAYLOAD, assert_dependency_unavailable


class PrivateS3:
    """An S3 server of the tests' own, stopped and started again on the same port over the same objects."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.process: S3Process | None = None

    @property
    def server(self) -> S3Server:
        return S3Server(endpoint=f"http://127.0.0.1:{self.port}")

    def start(self) -> None:
        self.process = start_s3(self.port, self.log_dir, self.data_dir)

    def stop(self) -> None:
        assert self.process is not None
        self.process.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    async def down(self) -> None:
        await asyncio.to_thread(self.stop)

    async def up(self) -> None:
        await asyncio.to_thread(self.start)


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateS3]:
    s3 = PrivateS3(tmp_path_factory.mktemp("outage-s3-data"), tmp_path_factory.mktemp("outage-s3-logs"))
    s3.start()
    yield s3
    if s3.running:
        s3.stop()


@pytest.fixture(scope="module")
async def s3_outage_harness(private_s3: PrivateS3, ingest_database: str, redis_url: str, nats_url: str,
                            run_id: str) -> AsyncIterator[IngestHarness]:
    """Ingest over the private S3 (uploads need nothing else but Postgres)."""
    namespace = f"{run_id}s3o{secrets.token_hex(2)}"
    server = private_s3.server
    settings = IngestSettings(
        postgres_dsn=ingest_database, redis_url=redis_url, nats_url=nats_url, namespace=namespace,
        grpc_port=free_port(), s3_endpoint=server.endpoint, s3_access_key=server.access_key,
        s3_secret_key=server.secret_key, s3_bucket=f"{run_id}-s3-outage", admin_token=secrets.token_hex(16),
        ledger_addr=f"127.0.0.1:{free_port()}", reports_addr=f"127.0.0.1:{free_port()}",
        router_addr=f"127.0.0.1:{free_port()}", api_key_cache_s=2.0, shutdown_grace_s=2.0, log_format="text")
    services: list[RunningService] = []
    channel: grpc.aio.Channel | None = None
    try:
        parts = await build_components(settings)
        services.append(await start_service(service_app(parts), settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        yield IngestHarness(parts, settings, channel, server, services)
    finally:
        if channel is not None:
            await channel.close()
        for service in reversed(services):
            await service.shutdown()
        await forget_namespace(namespace, nats_url, redis_url)


@pytest.fixture
async def s3_outage(private_s3: PrivateS3) -> AsyncIterator[PrivateS3]:
    """The private S3, for the test to take down; up again after the test, whatever the test did."""
    yield private_s3
    if not private_s3.running:
        await private_s3.up()


async def attachment_rows(harness: IngestHarness, tenant: TenantHandle) -> int:
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM ingest.attachments WHERE tenant_id = %s", (tenant.id,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_while_s3_is_down_an_upload_is_unavailable_with_retry_info_naming_s3(
        s3_outage_harness: IngestHarness, s3_outage: PrivateS3):
    tenant = await s3_outage_harness.new_tenant(credits=0)
    await s3_outage.down()

    failed = await refused(s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))

    assert_dependency_unavailable(failed, "s3")
    assert await attachment_rows(s3_outage_harness, tenant) == 0


async def test_once_s3_is_back_the_next_upload_is_stored(s3_outage_harness: IngestHarness, s3_outage: PrivateS3):
    tenant = await s3_outage_harness.new_tenant(credits=0)
    await s3_outage.down()
    await refused(s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))
    await s3_outage.up()

    attachment = await s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf")

    assert attachment.size_bytes == len(PAYLOAD)
    assert await attachment_rows(s3_outage_harness, tenant) == 1
