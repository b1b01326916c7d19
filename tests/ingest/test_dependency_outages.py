"""The accept path while Redis or Postgres is down, and once it is back.

While a dependency is down every call that needs it is refused UNAVAILABLE, with a ``RetryInfo`` of about a second
and an ``ErrorInfo`` (reason ``DEPENDENCY_UNAVAILABLE``) naming the dependency, so that a client following gRPC's
retry rules tries again; nothing is accepted that is then lost, and nothing is charged. Once the dependency is back
the next call succeeds: the connection pools reconnect by themselves.

Ingest and the ledger run in this process over a private redis-server and a private PostgreSQL (both on free
ports, from tests/ingest/conftest.py) that the tests take down and start again; NATS and S3 are the session's.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from esp.v1 import messages_pb2

from dev.mesh import RestartablePostgres, RestartableRedis, RestartableServer
from libs.common.db import migrate_services
from libs.common.dependency_errors import DEPENDENCY_UNAVAILABLE
from tests.conftest import S3Server
from tests.ingest.conftest import (
    IngestHarness,
    RpcFailure,
    private_ingest_settings,
    refused,
    send_request,
    serving_ingest,
)


@pytest.fixture(scope="module")
async def outage_harness(private_redis: RestartableRedis, private_postgres: RestartablePostgres, nats_url: str,
                         s3_server: S3Server, run_id: str) -> AsyncIterator[IngestHarness]:
    """Ingest and the ledger over the private Redis and Postgres."""
    await migrate_services(private_postgres.url, ["ingest", "ledger", "reports"])
    settings = private_ingest_settings(
        postgres_dsn=private_postgres.url, redis_url=private_redis.url, nats_url=nats_url, s3=s3_server,
        namespace=f"{run_id}out{secrets.token_hex(2)}", s3_bucket=f"{run_id}-outages")
    async with serving_ingest(settings, s3_server, ledger_dsn=private_postgres.url) as harness:
        yield harness


@dataclass
class Outage:
    """A dependency the test takes down, named as refusals name it."""

    dependency: str
    server: RestartableServer
    crash: bool
    """Killed rather than stopped: Redis crashes (its data goes with it, as a cache's does); Postgres gets a fast
    shutdown, which ends every session as a restart or a failover does."""

    async def down(self) -> None:
        await self.server.down(crash=self.crash)

    async def up(self) -> None:
        await self.server.up()


@pytest.fixture(params=["redis", "postgres"])
async def outage(request: pytest.FixtureRequest, private_redis: RestartableRedis,
                 private_postgres: RestartablePostgres) -> AsyncIterator[Outage]:
    """Redis or Postgres, for the test to take down; up again after the test, whatever the test did."""
    outage = (Outage("redis", private_redis, crash=True) if request.param == "redis"
              else Outage("postgres", private_postgres, crash=False))
    yield outage
    await outage.up()


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


# -- either dependency ----------------------------------------------------------------------------------------
async def test_while_a_dependency_is_down_a_send_is_unavailable_with_retry_info_naming_it(
        outage_harness: IngestHarness, outage: Outage):
    tenant = await outage_harness.new_tenant(credits=100)
    await outage.down()
    failed = await refused(outage_harness.messages.SendEmail(send_request(request_id="r-1"), metadata=tenant.auth,
                                                             timeout=30))
    assert_dependency_unavailable(failed, outage.dependency)
    await outage.up()
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_while_a_dependency_is_down_a_batch_is_unavailable_as_a_whole(outage_harness: IngestHarness,
                                                                            outage: Outage):
    tenant = await outage_harness.new_tenant(credits=100)
    await outage.down()
    failed = await refused(outage_harness.messages.BatchSendEmails(batch_of(5), metadata=tenant.auth, timeout=30))
    assert_dependency_unavailable(failed, outage.dependency)
    await outage.up()
    assert await outage_harness.message_rows(tenant) == 0
    assert (await outage_harness.balance(tenant)).available == 100


async def test_once_a_dependency_is_back_the_next_send_is_accepted(outage_harness: IngestHarness, outage: Outage):
    tenant = await outage_harness.new_tenant(credits=100)
    await outage.down()
    await refused(outage_harness.messages.SendEmail(send_request(), metadata=tenant.auth, timeout=30))
    await outage.up()
    message = await outage_harness.send(tenant, send_request(request_id=f"after-{outage.dependency}"))
    assert message.request_id == f"after-{outage.dependency}"
    reply = await outage_harness.messages.BatchSendEmails(batch_of(3), metadata=tenant.auth, timeout=30)
    assert all(result.HasField("message") for result in reply.results)
    assert await outage_harness.message_rows(tenant) == 4


# -- what each dependency is needed for ------------------------------------------------------------------------
@pytest.mark.parametrize("outage", ["redis"], indirect=True)
async def test_while_redis_is_down_an_upload_is_still_stored(outage_harness: IngestHarness, outage: Outage):
    # An upload needs Postgres and S3, not Redis.
    tenant = await outage_harness.new_tenant(credits=0)
    await outage.down()
    attachment = await outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf")
    assert attachment.size_bytes == len(PAYLOAD)


@pytest.mark.parametrize("outage", ["postgres"], indirect=True)
async def test_while_postgres_is_down_an_upload_is_unavailable(outage_harness: IngestHarness, outage: Outage):
    tenant = await outage_harness.new_tenant(credits=0)
    await outage.down()
    failed = await refused(outage_harness.upload(tenant, PAYLOAD, filename="invoice.pdf"))
    assert_dependency_unavailable(failed, "postgres")
