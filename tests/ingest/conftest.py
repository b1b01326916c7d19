"""Fixtures of the ingest tests: the ledger, reports and ingest services running in this process (each a real
``serve()`` on a free loopback port) over real Postgres, Redis, NATS JetStream and S3 (rclone).

One mesh serves the whole session (starting it is the slow part); every test makes its own tenants, so tests do
not see each other's messages, limits or credits.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    common_pb2,
    credits_pb2,
    credits_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dev.mesh import TEST_SANDBOX_DOMAINS, RestartablePostgres, RestartableRedis, RestartableS3, forget_namespace
from libs.common.db import migrate_services
from libs.common.grpc_server import ServiceApp, serve
from libs.common.settings import CommonSettings
from libs.routing.catalog import ProviderSpec, open_bucket
from services.ingest.config import IngestSettings
from services.ingest.server import IngestComponents, build_components, service_app
from services.ledger.config import LedgerSettings
from services.ledger.server import build_app as build_ledger
from services.reports.app import build_app as build_reports
from services.reports.config import ReportsSettings
from tests.conftest import S3Server, free_port

ALL_SCOPES = (tenants_pb2.API_KEY_SCOPE_SEND, tenants_pb2.API_KEY_SCOPE_READ, tenants_pb2.API_KEY_SCOPE_ADMIN)


@dataclass
class RunningService:
    """A service served in this process."""

    port: int
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


async def start_service(app: ServiceApp, settings: CommonSettings) -> RunningService:
    """Serve ``app`` on ``settings.grpc_port`` until ``shutdown()``; fails when it does not come up."""
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(app, settings, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait([waiter, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        stop.set()
        if task.done() and task.exception():
            raise RuntimeError(f"{app.name} failed to start") from task.exception()
        raise RuntimeError(f"{app.name} did not start within 30s")
    # serve() takes over SIGINT/SIGTERM for its drain; give them back to pytest.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return RunningService(settings.grpc_port, stop, task)


@dataclass(frozen=True)
class TenantHandle:
    """A tenant made for one test, with a key holding every scope."""

    id: str
    key: str

    @property
    def name(self) -> str:
        return f"tenants/{self.id}"

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass
class IngestHarness:
    """The in-process mesh and helpers to talk to it as a customer would."""

    parts: IngestComponents
    settings: IngestSettings
    channel: grpc.aio.Channel
    s3: S3Server
    services: list[RunningService] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.settings.admin_token}"),)

    @property
    def messages(self) -> messages_pb2_grpc.MessageServiceStub:
        return messages_pb2_grpc.MessageServiceStub(self.channel)

    @property
    def tenants(self) -> tenants_pb2_grpc.TenantServiceStub:
        return tenants_pb2_grpc.TenantServiceStub(self.channel)

    @property
    def attachments(self) -> attachments_pb2_grpc.AttachmentServiceStub:
        return attachments_pb2_grpc.AttachmentServiceStub(self.channel)

    @property
    def credits(self) -> credits_pb2_grpc.CreditServiceStub:
        return credits_pb2_grpc.CreditServiceStub(self.channel)

    async def new_tenant(self, *, credits: int = 1_000_000, **policy: Any) -> TenantHandle:
        """A fresh tenant (``policy``: fields of esp.v1.Tenant) with ``credits`` and an all-scopes key."""
        tenant_id = f"t-{secrets.token_hex(5)}"
        await self.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(
            tenant_id=tenant_id, tenant=tenants_pb2.Tenant(display_name=tenant_id, **policy)), metadata=self.admin)
        key = await self.new_key(tenant_id, ALL_SCOPES)
        if credits:
            await self.credits.TopUp(credits_pb2.TopUpRequest(tenant=f"tenants/{tenant_id}", amount=credits,
                                                              request_id=f"{tenant_id}-start"), metadata=self.admin)
        return TenantHandle(tenant_id, key)

    async def new_key(self, tenant_id: str, scopes: Sequence[int]) -> str:
        reply = await self.tenants.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
            parent=f"tenants/{tenant_id}", api_key=tenants_pb2.ApiKey(display_name="test", scopes=list(scopes))),
            metadata=self.admin)
        return str(reply.secret)

    async def send(self, tenant: TenantHandle, request: messages_pb2.SendEmailRequest) -> messages_pb2.Message:
        reply = await self.messages.SendEmail(request, metadata=tenant.auth, timeout=30)
        return reply.message

    async def balance(self, tenant: TenantHandle) -> credits_pb2.Balance:
        return await self.credits.GetBalance(credits_pb2.GetBalanceRequest(tenant=tenant.name),
                                             metadata=tenant.auth, timeout=10)

    async def upload(self, tenant: TenantHandle, payload: bytes, *, filename: str = "file.bin",
                     content_type: str = "", sha256: str = "", request_id: str = "") -> attachments_pb2.Attachment:
        frames = [attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename=filename, content_type=content_type, size_bytes=len(payload), sha256=sha256,
            request_id=request_id))]
        frames += [attachments_pb2.UploadAttachmentRequest(chunk=payload[i:i + 256 * 1024])
                   for i in range(0, len(payload), 256 * 1024)]
        return await self.attachments.UploadAttachment(_frames(frames), metadata=tenant.auth, timeout=60)

    async def message_rows(self, tenant: TenantHandle) -> int:
        """Messages Postgres holds for the tenant."""
        async with self.parts.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM ingest.messages WHERE tenant_id = %s", (tenant.id,))
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def set_providers(self, specs: Iterable[ProviderSpec]) -> None:
        """Make the provider catalog hold exactly ``specs`` and wait until ingest sees that."""
        kv = await open_bucket(self.parts.js, self.namespace)
        wanted = {s.id: s for s in specs}
        for key in list(self.parts.catalog.providers):
            if key not in wanted:
                await kv.delete(key)
        for spec in wanted.values():
            await kv.put(spec.id, spec.to_json())
        for _ in range(200):
            if dict(self.parts.catalog.providers) == wanted:
                return
            await asyncio.sleep(0.025)
        seen = sorted(self.parts.catalog.providers)
        raise AssertionError(f"the catalog did not converge to {sorted(wanted)}: {seen}")


async def _frames(frames: list[Any]) -> AsyncIterator[Any]:
    for frame in frames:
        yield frame


def count_passes(acceptor: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every accept pass the acceptor runs from now on (its ``_accept_together`` calls), in order."""
    accept_together = acceptor._accept_together
    passes: list[int] = []

    async def counted(tenant: Any, drafts: Any, *args: Any) -> Any:
        passes.append(len(drafts))
        return await accept_together(tenant, drafts, *args)

    monkeypatch.setattr(acceptor, "_accept_together", counted)
    return passes


def send_request(**overrides: Any) -> messages_pb2.SendEmailRequest:
    """A valid transactional email; ``overrides`` replace fields."""
    fields: dict[str, Any] = {
        "message_class": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        "to": [common_pb2.EmailAddress(email="rcpt@example.net", name="Zoë Rcpt")],
        "subject": "Your receipt", "text_body": "Thanks for your order.", "html_body": "<p>Thanks!</p>",
        "from": common_pb2.EmailAddress(email="shop@example.com", name="Shop"),
    }
    fields.update(overrides)
    return messages_pb2.SendEmailRequest(**fields)


@dataclass(frozen=True)
class RpcFailure:
    """A failed call as the client sees it: code, message and the google.rpc.Status details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None
    retry: error_details_pb2.RetryInfo | None
    quota: error_details_pb2.QuotaFailure | None

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []

    def violation(self, field_name: str) -> error_details_pb2.BadRequest.FieldViolation:
        assert self.bad_request is not None, "no BadRequest detail"
        return next(v for v in self.bad_request.field_violations if v.field == field_name)


def failure(exc: grpc.aio.AioRpcError) -> RpcFailure:
    """Unpack the rich error of a failed call (fails the test when it carries no google.rpc.Status)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in {exc!r}"
    found: dict[type, Any] = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
                    error_details_pb2.QuotaFailure):
            if detail.Is(cls.DESCRIPTOR):
                value = cls()
                detail.Unpack(value)
                found[cls] = value
    assert error_details_pb2.ErrorInfo in found, "no ErrorInfo detail"
    return RpcFailure(exc.code(), status.message, found[error_details_pb2.ErrorInfo],
                      found.get(error_details_pb2.BadRequest), found.get(error_details_pb2.RetryInfo),
                      found.get(error_details_pb2.QuotaFailure))


async def refused(call: Any) -> RpcFailure:
    """Await ``call`` (an RPC), which must fail; its failure."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return failure(caught.value)


# -- the mesh --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def ingest_database(new_database: Callable[[], str]) -> str:
    dsn = new_database()
    await migrate_services(dsn, ["ingest", "ledger", "reports"])
    return dsn


@pytest.fixture(scope="session")
def ingest_settings(ingest_database: str, redis_url: str, nats_url: str, s3_server: S3Server,
                    run_id: str) -> IngestSettings:
    return IngestSettings(
        postgres_dsn=ingest_database, redis_url=redis_url, nats_url=nats_url, namespace=f"{run_id}ing",
        grpc_port=free_port(), s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_bucket=f"{run_id}-ingest", admin_token=secrets.token_hex(16),
        ledger_addr=f"127.0.0.1:{free_port()}", reports_addr=f"127.0.0.1:{free_port()}",
        router_addr=f"127.0.0.1:{free_port()}", api_key_cache_s=2.0, shutdown_grace_s=2.0, log_format="text",
        sandbox_domains=TEST_SANDBOX_DOMAINS)


@pytest.fixture(scope="session")
async def harness(ingest_settings: IngestSettings, s3_server: S3Server) -> AsyncIterator[IngestHarness]:
    common = {"postgres_dsn": ingest_settings.postgres_dsn, "redis_url": ingest_settings.redis_url,
              "nats_url": ingest_settings.nats_url, "namespace": ingest_settings.namespace,
              "shutdown_grace_s": 2.0}
    ledger_settings = LedgerSettings(**common, grpc_port=int(ingest_settings.ledger_addr.rsplit(":", 1)[1]))
    reports_settings = ReportsSettings(**common, grpc_port=int(ingest_settings.reports_addr.rsplit(":", 1)[1]),
                                       webhook_port=0, migrate_on_start=False)
    services: list[RunningService] = []
    channel: grpc.aio.Channel | None = None
    try:
        services.append(await start_service(await build_ledger(ledger_settings), ledger_settings))
        services.append(await start_service(await build_reports(reports_settings), reports_settings))
        parts = await build_components(ingest_settings)
        services.append(await start_service(service_app(parts), ingest_settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ingest_settings.grpc_port}",
                                            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
        yield IngestHarness(parts, ingest_settings, channel, s3_server, services)
    finally:
        if channel is not None:
            await channel.close()
        for service in reversed(services):
            await service.shutdown()
        await _forget_namespace(ingest_settings)


async def _forget_namespace(settings: IngestSettings) -> None:
    """Drop what the session left in the shared servers: streams, the provider bucket, Redis keys."""
    await forget_namespace(settings.namespace, settings.nats_url, settings.redis_url)


@pytest.fixture
async def no_providers(harness: IngestHarness) -> AsyncIterator[None]:
    """The provider catalog is empty during the test, and again after it."""
    await harness.set_providers([])
    yield
    await harness.set_providers([])


@pytest.fixture
async def replica(harness: IngestHarness) -> AsyncIterator[IngestComponents]:
    """A second ingest replica (not serving: tests call its parts) over the same Postgres, Redis and ledger."""
    parts = await build_components(replace(harness.settings, grpc_port=free_port()))
    yield parts
    await parts.close()


# -- ingest over servers of a module's own, which its tests take down --------------------------------------------
def private_ingest_settings(*, postgres_dsn: str, redis_url: str, nats_url: str, s3: S3Server, namespace: str,
                            s3_bucket: str, **overrides: Any) -> IngestSettings:
    """Settings of an ingest served in this process on free ports (``overrides``: other fields)."""
    fields: dict[str, Any] = {
        "api_key_cache_s": 2.0, "shutdown_grace_s": 2.0, "log_format": "text", "sandbox_domains": TEST_SANDBOX_DOMAINS,
        **overrides}
    return IngestSettings(
        postgres_dsn=postgres_dsn, redis_url=redis_url, nats_url=nats_url, namespace=namespace,
        grpc_port=free_port(), s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
        s3_bucket=s3_bucket, admin_token=secrets.token_hex(16), ledger_addr=f"127.0.0.1:{free_port()}",
        reports_addr=f"127.0.0.1:{free_port()}", router_addr=f"127.0.0.1:{free_port()}", **fields)


@contextlib.asynccontextmanager
async def serving_ingest(settings: IngestSettings, s3: S3Server,
                         ledger_dsn: str | None = None) -> AsyncIterator[IngestHarness]:
    """Ingest served in this process, with the ledger over ``ledger_dsn`` (already migrated) when it is given; on
    exit both stop and what the namespace left in NATS and Redis is removed."""
    services: list[RunningService] = []
    channel: grpc.aio.Channel | None = None
    try:
        if ledger_dsn is not None:
            ledger_settings = LedgerSettings(
                postgres_dsn=ledger_dsn, redis_url=settings.redis_url, nats_url=settings.nats_url,
                namespace=settings.namespace, grpc_port=int(settings.ledger_addr.rsplit(":", 1)[1]),
                shutdown_grace_s=2.0)
            services.append(await start_service(await build_ledger(ledger_settings), ledger_settings))
        parts = await build_components(settings)
        services.append(await start_service(service_app(parts), settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        yield IngestHarness(parts, settings, channel, s3, services)
    finally:
        if channel is not None:
            await channel.close()
        for service in reversed(services):
            await service.shutdown()
        await _forget_namespace(settings)


@pytest.fixture(scope="module")
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartablePostgres]:
    """A PostgreSQL cluster of the module's own, which its tests stop and start again. Its data is not under
    pytest's tmp_path: PostgreSQL refuses to run as root, so it runs as the postgres user, who cannot enter pytest's
    root-only temporary directories."""
    parent = Path(tempfile.mkdtemp(prefix="esp-outage-pg-"))
    parent.chmod(0o755)
    postgres = RestartablePostgres(parent / "data", tmp_path_factory.mktemp("outage-postgres"))
    try:
        postgres.start()
        yield postgres
    finally:
        postgres.stop()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableRedis]:
    """A redis-server of the module's own, which its tests crash and start again."""
    redis = RestartableRedis(tmp_path_factory.mktemp("outage-redis"))
    redis.start()
    yield redis
    redis.crash()


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableS3]:
    """An S3 server of the module's own, which its tests stop and start again over the same objects."""
    s3 = RestartableS3(tmp_path_factory.mktemp("outage-s3-data"), tmp_path_factory.mktemp("outage-s3-logs"))
    s3.start()
    yield s3
    s3.stop()
