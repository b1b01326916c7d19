"""A batch whose emails are committed in more than one transaction, with Postgres going down between them: the
emails already committed keep their answers, and only the others are refused, each on its own, UNAVAILABLE naming
Postgres. Failing the whole call would lose the committed emails' answers, and a client retrying it would send them
twice.

Ingest runs over a private PostgreSQL that a test stops right after the first commit of its batch (from the store's
commit hook, so no later transaction can start before it is down): the next transaction meets a real outage. Ingest
commits at most two emails per transaction, one transaction at a time, so a batch of four takes two. The ledger
keeps the session's Postgres: it stays up, and holds of the refused emails are released.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from esp.v1 import common_pb2, messages_pb2

from dev.mesh import RestartablePostgres
from libs.common.db import migrate_services
from libs.common.dependency_errors import DEPENDENCY_UNAVAILABLE
from libs.common.outbox import CommittedRow
from tests.conftest import S3Server
from tests.ingest.conftest import IngestHarness, TenantHandle, private_ingest_settings, send_request, serving_ingest

CREDITS = 1000


@pytest.fixture(scope="module")
async def two_commit_harness(private_postgres: RestartablePostgres, new_database: Callable[[], str], redis_url: str,
                             nats_url: str, s3_server: S3Server, run_id: str) -> AsyncIterator[IngestHarness]:
    """Ingest over the private Postgres, committing two emails per transaction one transaction at a time; the
    ledger over a database of the session's Postgres."""
    await migrate_services(private_postgres.url, ["ingest"])
    ledger_dsn = new_database()
    await migrate_services(ledger_dsn, ["ledger"])
    settings = private_ingest_settings(
        postgres_dsn=private_postgres.url, redis_url=redis_url, nats_url=nats_url, s3=s3_server,
        namespace=f"{run_id}bpo{secrets.token_hex(2)}", s3_bucket=f"{run_id}-batch-outage", api_key_cache_s=30.0,
        accept_batch_size=2, accept_batch_workers=1)
    async with serving_ingest(settings, s3_server, ledger_dsn=ledger_dsn) as harness:
        yield harness


@dataclass
class StopPostgresAfterFirstCommit:
    """The store's commit hook (the outbox publisher's), and then, once, Postgres stopped. The hook runs as soon as
    a transaction committed, before the store starts its next one, and the stop blocks until Postgres is down."""

    postgres: RestartablePostgres
    publish: Callable[[list[CommittedRow], bool], None]
    armed: bool = True

    def __call__(self, rows: list[CommittedRow], urgent: bool) -> None:
        self.publish(rows, urgent)
        if self.armed:
            self.armed = False
            self.postgres.stop()


@pytest.fixture
async def postgres_stops_after_the_first_commit(two_commit_harness: IngestHarness,
                                                private_postgres: RestartablePostgres) -> AsyncIterator[None]:
    store = two_commit_harness.parts.store
    publish = store.on_commit
    assert publish is not None
    store.on_commit = StopPostgresAfterFirstCommit(private_postgres, publish)
    yield
    store.on_commit = publish
    await private_postgres.up()


@pytest.fixture
async def tenant(two_commit_harness: IngestHarness) -> TenantHandle:
    """Made (and its key checked once, then cached) while Postgres is up."""
    tenant = await two_commit_harness.new_tenant(credits=CREDITS)
    await two_commit_harness.balance(tenant)
    return tenant


async def stored_ids(harness: IngestHarness, tenant: TenantHandle) -> set[str]:
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT id::text FROM ingest.messages WHERE tenant_id = %s", (tenant.id,))
        return {row[0] for row in await cur.fetchall()}


def assert_refused_for_postgres(error: common_pb2.BatchError) -> None:
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0], error
    assert error.reason == DEPENDENCY_UNAVAILABLE
    assert error.metadata["dependency"] == "postgres"


def four_emails(**fields: str) -> messages_pb2.BatchSendEmailsRequest:
    return messages_pb2.BatchSendEmailsRequest(requests=[
        send_request(subject=f"n{i}", **{k: f"{v}-{i}" for k, v in fields.items()}) for i in range(4)])


async def test_emails_committed_before_postgres_went_down_keep_their_answers_and_the_rest_are_unavailable(
        two_commit_harness: IngestHarness, tenant: TenantHandle, private_postgres: RestartablePostgres,
        postgres_stops_after_the_first_commit: None):
    reply = await two_commit_harness.messages.BatchSendEmails(four_emails(), metadata=tenant.auth, timeout=60)

    answered = [result.message for result in reply.results if result.HasField("message")]
    refused = [result.error for result in reply.results if result.HasField("error")]
    assert [result.message.subject for result in reply.results[:len(answered)]] == ["n0", "n1"][:len(answered)]
    assert 1 <= len(answered) <= 2 and len(answered) + len(refused) == 4
    for error in refused:
        assert_refused_for_postgres(error)
    await private_postgres.up()
    assert await stored_ids(two_commit_harness, tenant) == {message.id for message in answered}
    balance = await two_commit_harness.balance(tenant)
    assert balance.held == sum(message.credits for message in answered)
    assert balance.available + balance.held == CREDITS


async def test_a_retry_of_the_refused_emails_sends_each_email_of_the_batch_once(
        two_commit_harness: IngestHarness, tenant: TenantHandle, private_postgres: RestartablePostgres,
        postgres_stops_after_the_first_commit: None):
    batch = four_emails()
    first = await two_commit_harness.messages.BatchSendEmails(batch, metadata=tenant.auth, timeout=60)
    await private_postgres.up()

    again = [i for i, result in enumerate(first.results) if result.HasField("error")]
    retry = await two_commit_harness.messages.BatchSendEmails(
        messages_pb2.BatchSendEmailsRequest(requests=[batch.requests[i] for i in again]), metadata=tenant.auth,
        timeout=60)

    assert again and all(result.HasField("message") for result in retry.results)
    answered = [r.message.id for r in first.results if r.HasField("message")] + [r.message.id for r in retry.results]
    assert await stored_ids(two_commit_harness, tenant) == set(answered)
    assert len(answered) == 4


async def test_emails_with_request_ids_committed_before_postgres_went_down_keep_their_answers(
        two_commit_harness: IngestHarness, tenant: TenantHandle, private_postgres: RestartablePostgres,
        postgres_stops_after_the_first_commit: None):
    # Emails with a request_id are accepted one by one (in the pools of single sends), not in the batch's own pass.
    batch = four_emails(request_id=f"r-{secrets.token_hex(3)}")

    reply = await two_commit_harness.messages.BatchSendEmails(batch, metadata=tenant.auth, timeout=60)

    answered = {result.message.request_id: result.message for result in reply.results if result.HasField("message")}
    refused = [result.error for result in reply.results if result.HasField("error")]
    assert answered and refused and len(answered) + len(refused) == 4
    for error in refused:
        assert_refused_for_postgres(error)
    await private_postgres.up()
    assert await stored_ids(two_commit_harness, tenant) == {message.id for message in answered.values()}
    retried = await two_commit_harness.messages.BatchSendEmails(batch, metadata=tenant.auth, timeout=60)
    assert all(result.HasField("message") for result in retried.results)
    for result in retried.results:
        if result.message.request_id in answered:
            assert result.message.id == answered[result.message.request_id].id
    assert len(await stored_ids(two_commit_harness, tenant)) == 4
