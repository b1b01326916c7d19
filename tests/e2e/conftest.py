"""A whole mesh as separate processes, on free loopback ports, with its own database and JetStream namespace.

Waits on the mesh are on progress (``tests.progress``): they fail when what they watch stops moving for ``STALL_S``,
not when a fixed deadline passes on a machine slower today than it was yesterday.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import grpc
import pytest
from esp.v1 import messages_pb2, messages_pb2_grpc

from dev import mesh as m
from dev import seed
from dev.migrate import SERVICES_WITH_SCHEMAS
from libs.common.db import migrate_services
from tests.conftest import S3Server, stop_after_last_user
from tests.progress import wait_for_progress

STALL_S = 30.0
"""A wait on the mesh fails when what it watches has not moved for this long."""


@dataclass
class RunningMesh:
    """A started mesh plus what tests need to talk to it."""

    mesh: m.Mesh
    config: m.MeshConfig
    maildir: Path
    tenant: str
    api_key: str

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.ports['ingest']}"

    def stop(self) -> None:
        """Stop every process, then remove what the mesh left on the shared servers (its streams and its Redis
        keys: the sent markers of a test run alone are tens of thousands, kept for days)."""
        self.mesh.stop()
        try:
            asyncio.run(m.forget_namespace(self.config.namespace, self.config.nats_url, self.config.redis_url))
        except Exception as exc:  # a test that cut NATS for good: its own store goes with its temporary directory
            warnings.warn(f"could not remove the mesh's namespace {self.config.namespace}: {exc}", stacklevel=2)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.endpoint)

    def auth(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.api_key}"),)

    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.config.admin_token}"),)

    def wait_state(self, name: str, state: int, stall_s: float = STALL_S) -> messages_pb2.Message:
        """The message once it is in ``state``; AssertionError naming the last message seen when it stayed as it
        was (or unknown) for ``stall_s``."""

        def look(stub: messages_pb2_grpc.MessageServiceStub) -> messages_pb2.Message | None:
            try:
                return stub.GetMessage(messages_pb2.GetMessageRequest(name=name), metadata=self.auth(), timeout=5)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # reports has not recorded it yet
                    raise
                return None

        with self.channel() as channel:
            stub = messages_pb2_grpc.MessageServiceStub(channel)
            found = wait_for_progress(lambda: look(stub), lambda m: m is not None and m.state == state,
                                      what=f"{name} in state {messages_pb2.MessageState.Name(state)}", stall_s=stall_s,
                                      progress=_message_progress)
        assert found is not None
        return found

    def delivered(self) -> list[EmailMessage]:
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
                for p in sorted(self.maildir.glob("*.eml"))]

    def wait_for_mail(self, predicate: Callable[[EmailMessage], bool], stall_s: float = STALL_S) -> EmailMessage:
        """The first email in the SMTP sink that ``predicate`` matches; fails when none does and no new email
        reached the sink for ``stall_s``."""

        def matching() -> tuple[int, EmailMessage | None]:
            mail = self.delivered()
            return len(mail), next((message for message in mail if predicate(message)), None)

        _, found = wait_for_progress(matching, lambda seen: seen[1] is not None,
                                     what="a matching email in the SMTP sink", stall_s=stall_s,
                                     progress=lambda seen: seen[0],
                                     describe=lambda seen: f"{seen[0]} email(s) in the sink, none matching")
        assert found is not None
        return found

    def new_tenant(self, credits: int) -> str:
        """A fresh tenant with ``credits`` and an API key for it."""
        tenant = f"t-{secrets.token_hex(4)}"
        with self.channel() as channel:
            seed.ensure_tenant(channel, self.config.admin_token, tenant)
            key = seed.create_api_key(channel, self.config.admin_token, tenant)
            if credits:
                seed.top_up(channel, self.config.admin_token, tenant, credits, f"{tenant}-initial")
        return key


def _message_progress(message: messages_pb2.Message | None) -> object:
    """What of a message moves while the mesh works on it: its state, its attempts, its last update."""
    if message is None:
        return None
    return message.state, message.attempts, message.update_time.ToNanoseconds()


def build_mesh_config(database: str, redis_url: str, nats_url: str, s3: S3Server, namespace: str,
                      log_dir: Path) -> m.MeshConfig:
    ports = {name: m.free_port() for name in m.GRPC_PORTS}
    return m.MeshConfig(postgres_dsn=database, redis_url=redis_url, nats_url=nats_url, s3_endpoint=s3.endpoint,
                        namespace=namespace, admin_token=secrets.token_hex(16), ports=ports,
                        gateway_port=m.free_port(), webhook_port=m.free_port(), log_dir=log_dir,
                        extra_env={"ESP_S3_BUCKET": f"{namespace}-attachments", "ESP_SHUTDOWN_GRACE_S": "3"})


def start_mesh(config: m.MeshConfig, maildir: Path, smtp_port: int, tenant_credits: int = 1_000_000) -> RunningMesh:
    asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
    mesh = m.Mesh(config)
    try:
        mesh.start()
        with grpc.insecure_channel(f"127.0.0.1:{config.ports['ingest']}") as channel:
            seed.ensure_tenant(channel, config.admin_token, "acme")
            api_key = seed.create_api_key(channel, config.admin_token, "acme")
            seed.top_up(channel, config.admin_token, "acme", tenant_credits, "acme-initial")
            seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                id="sink", type="smtp", endpoint=f"127.0.0.1:{smtp_port}", options={"tls": "none"}))
    except BaseException:
        mesh.stop()
        raise
    return RunningMesh(mesh, config, maildir, "acme", api_key)


@pytest.fixture(scope="session")
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    maildir = tmp_path_factory.mktemp("mail")
    port = m.free_port()
    proc = m.start_smtp_sink(port, maildir, tmp_path_factory.mktemp("sink-logs"))
    yield port, maildir
    proc.stop()


@pytest.fixture(scope="session")
def running_mesh(request: pytest.FixtureRequest, new_database: Callable[[], str], redis_url: str, nats_url: str,
                 s3_server: S3Server, run_id: str, smtp_sink: tuple[int, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    port, maildir = smtp_sink
    config = build_mesh_config(new_database(), redis_url, nats_url, s3_server, f"{run_id}e2e",
                               tmp_path_factory.mktemp("mesh-logs"))
    running = start_mesh(config, maildir, port)
    stopping = stop_after_last_user(request, running.stop)
    yield running
    stopping()
