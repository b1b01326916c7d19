"""Attachments while S3 is down, and once it is back: an upload is refused UNAVAILABLE with a ``RetryInfo`` of about a
second and an ``ErrorInfo`` naming S3 (never INTERNAL, which a client following gRPC's retry rules gives up on), and
nothing is recorded; once S3 is back the next upload is stored.

Ingest runs in this process over a private S3 server (rclone on a free port, its objects in a directory that
outlives a restart; from tests/ingest/conftest.py) that the tests stop and start again; Postgres, Redis and NATS
are the session's.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from dev.mesh import RestartableS3
from tests.conftest import S3Server
from tests.ingest.conftest import IngestHarness, TenantHandle, private_ingest_settings, refused, serving_ingest
from tests.ingest.test_dependency_outages import PAYLOAD, assert_dependency_unavailable


@pytest.fixture(scope="module")
async def s3_outage_harness(private_s3: RestartableS3, ingest_database: str, redis_url: str, nats_url: str,
                            run_id: str) -> AsyncIterator[IngestHarness]:
    """Ingest over the private S3 (uploads need nothing else but Postgres)."""
    server = S3Server(endpoint=private_s3.url)
    settings = private_ingest_settings(
        postgres_dsn=ingest_database, redis_url=redis_url, nats_url=nats_url, s3=server,
        namespace=f"{run_id}s3o{secrets.token_hex(2)}", s3_bucket=f"{run_id}-s3-outage")
    async with serving_ingest(settings, server) as harness:
        yield harness


@pytest.fixture
async def s3_outage(private_s3: RestartableS3) -> AsyncIterator[RestartableS3]:
    """The private S3, for the test to take down; up again after the test, whatever the test did."""
    yield private_s3
    await private_s3.up()


async def attachment_rows(harness: IngestHarness, tenant: TenantHandle) -> int:
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM ingest.attachments WHERE tenant_id = %s", (tenant.id,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_while_s3_is_down_an_upload_is_unavailable_with_retry_info_naming_s3(
        s3_outage_harness: IngestHarness, s3_outage: RestartableS3):
    tenant = await s3_outage_harness.new_tenant(credits=0)
    await s3_outage.down()

    failed = await refused(s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))

    assert_dependency_unavailable(failed, "s3")
    assert await attachment_rows(s3_outage_harness, tenant) == 0


async def test_once_s3_is_back_the_next_upload_is_stored(s3_outage_harness: IngestHarness, s3_outage: RestartableS3):
    tenant = await s3_outage_harness.new_tenant(credits=0)
    await s3_outage.down()
    await refused(s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))
    await s3_outage.up()

    attachment = await s3_outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf")

    assert attachment.size_bytes == len(PAYLOAD)
    assert await attachment_rows(s3_outage_harness, tenant) == 1
