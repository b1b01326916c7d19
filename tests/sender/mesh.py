"""The mesh for the sender's end-to-end tests: every service as a process, the provider simulator as a process.

``sim_process`` starts ``python -m dev.simulator`` on free ports with personalities of its own (all Postmark
flavoured: JSON, batch API); ``provider_mesh`` starts the services (tests/e2e helpers) with a short breaker
cool-down, removes the SMTP provider the e2e seeding adds, and offers the admin, sending and simulator calls
the tests need. Providers are created per test through the admin API — the registry under test.

Every wait here is on progress (``tests.progress``): it fails when what it watches stops moving for ``STALL_S``,
never because a shared, loaded machine is slower than a fixed deadline assumed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from esp.v1 import common_pb2, messages_pb2, messages_pb2_grpc, providers_pb2, providers_pb2_grpc
from google.protobuf import field_mask_pb2

from dev import mesh as m
from dev.simulator.client import SimulatorClient
from tests.conftest import S3Server, stop_after_last_user
from tests.e2e.conftest import RunningMesh, build_mesh_config, start_mesh
from tests.progress import wait_for_progress_async

T = TypeVar("T")

PERSONALITIES = {name: "postmark" for name in ("primary", "secondary", "throttled", "paced", "quota-cheap",
                                               "quota-spare", "fast", "slow", "kept", "added", "otp-fast")}
# A newsletter goes to Mailgun: 1,000 recipients of the same content per call.
PERSONALITIES["bulk-cheap"] = "mailgun"
CLASSES = {"otp": common_pb2.MESSAGE_CLASS_OTP, "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
           "bulk": common_pb2.MESSAGE_CLASS_BULK}
BREAKER_THRESHOLD = 3
BREAKER_OPEN_S = 1.5
STALL_S = 30.0
"""A wait fails when what it watches (emails delivered, a breaker's state) has not moved for this long."""
MESH_ENV = {"ESP_BREAKER_CONSECUTIVE_FAILURES": str(BREAKER_THRESHOLD), "ESP_BREAKER_OPEN_S": str(BREAKER_OPEN_S),
            "ESP_BREAKER_PROBE_TIMEOUT_S": "5", "ESP_LOG_LEVEL": "WARNING"}


def simulator_credentials(personality: str) -> dict[str, str]:
    """What the simulator's personality expects (and signs its webhooks with)."""
    if PERSONALITIES[personality] == "mailgun":
        return {"api_key": f"key-{personality}", "domain": f"{personality}.example.com",
                "webhook_signing_key": f"{personality}-signing"}
    return {"server_token": f"{personality}-token", "webhook_user": "hook", "webhook_password": "hook"}


def provider_access(personality: str) -> tuple[dict[str, str], dict[str, str]]:
    """The credentials and options of a provider reaching ``personality``."""
    secrets_ = simulator_credentials(personality)
    if PERSONALITIES[personality] == "mailgun":
        return {"api_key": secrets_["api_key"]}, {"domain": secrets_["domain"]}
    return {"server_token": secrets_["server_token"]}, {}


@dataclass
class SimProcess:
    """The simulator process and where it listens."""

    http_url: str
    process: m.Process

    def endpoint(self, personality: str) -> str:
        return f"{self.http_url}/p/{personality}"


@pytest.fixture(scope="session")
def sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """``python -m dev.simulator`` on free loopback ports; stopped at the end of the session."""
    folder = tmp_path_factory.mktemp("simulator")
    personalities = folder / "personalities.json"
    personalities.write_text(json.dumps({"personalities": [
        {"name": name, "type": kind, "credentials": simulator_credentials(name)}
        for name, kind in PERSONALITIES.items()]}))
    http_port, smtp_port = m.free_port(), m.free_port()
    process = m.spawn("simulator", [sys.executable, "-m", "dev.simulator", "--http-port", str(http_port),
                                    "--smtp-port", str(smtp_port), "--personalities", str(personalities),
                                    "--seed", "7", "--log-cap", "100000"], folder)
    try:
        m.wait_port(http_port, 30, process.popen, "simulator")
    except RuntimeError as exc:
        process.kill()
        pytest.fail(f"the simulator did not start: {exc}\n{process.log_tail()}")
    yield SimProcess(f"http://127.0.0.1:{http_port}", process)
    process.stop()


@dataclass
class Delivered:
    """One email as the simulator took it."""

    message_id: str
    personality: str
    arrived_at: float


@dataclass
class ProviderMesh:
    """The running mesh plus the calls the tests make."""

    running: RunningMesh
    sim: SimProcess
    created: list[str] = field(default_factory=list)
    _client: SimulatorClient | None = None
    _records: list[dict[str, Any]] = field(default_factory=list)
    """Requests read from the simulator so far (read incrementally: the log of a big test is large)."""

    # -- simulator ------------------------------------------------------------------------------------------------
    @property
    def simulator(self) -> SimulatorClient:
        if self._client is None:
            self._client = SimulatorClient(self.sim.http_url)
        return self._client

    async def requests(self, personality: str) -> list[dict[str, Any]]:
        return [r for r in await self.all_requests() if r["personality"] == personality]

    async def all_requests(self) -> list[dict[str, Any]]:
        """Every request the simulator recorded since the test began."""
        since = self._records[-1]["seq"] if self._records else 0
        self._records.extend(await self.simulator.requests(since=since))
        return self._records

    async def delivered(self, personalities: Iterable[str] = PERSONALITIES) -> list[Delivered]:
        """Every email the simulator took for delivery, across ``personalities``."""
        found = []
        for record in await self.all_requests():
            if record["personality"] in personalities and record["delivered"]:
                found.extend(Delivered(msg["esp_message_id"], record["personality"], record["arrived_at"])
                             for msg in record["messages"] if msg["rejection"] is None)
        return found

    async def wait_delivered(self, message_ids: Iterable[str],
                             stall_s: float = STALL_S) -> dict[str, list[Delivered]]:
        """Where each email went, once every one of them reached the simulator; fails when no more of them
        arrived for ``stall_s``."""
        wanted = set(message_ids)

        async def arrived() -> dict[str, list[Delivered]]:
            seen: dict[str, list[Delivered]] = {}
            for item in await self.delivered():
                if item.message_id in wanted:
                    seen.setdefault(item.message_id, []).append(item)
            return seen

        return await wait_for_progress_async(
            arrived, lambda seen: len(seen) == len(wanted), what=f"{len(wanted)} emails reaching a provider",
            stall_s=stall_s, every_s=0.2, progress=len,
            describe=lambda seen: f"{len(seen)} of {len(wanted)} arrived, missing e.g. "
                                  f"{sorted(wanted - set(seen))[:3]}")

    # -- admin -----------------------------------------------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.running.endpoint)

    async def create_provider(self, personality: str, *, price: int = 100, rate: float = 0.0, daily_quota: int = 0,
                              classes: Sequence[str] = (), weight: float = 1.0) -> str:
        """A provider for a simulator personality, through the admin API; removed when the test ends."""
        provider_id = f"{personality}-{secrets.token_hex(3)}"
        credentials, options = provider_access(personality)
        provider = providers_pb2.Provider(
            type=PERSONALITIES[personality], display_name=personality, endpoint=self.sim.endpoint(personality),
            credentials=credentials, price_per_email_micros=price, rate_limit_per_second=rate,
            daily_quota=daily_quota, allowed_classes=[CLASSES[c] for c in classes], weight=weight,
            options={"timeout_s": "5", **options})
        async with self._channel() as channel:
            await providers_pb2_grpc.ProviderServiceStub(channel).CreateProvider(
                providers_pb2.CreateProviderRequest(provider_id=provider_id, provider=provider),
                metadata=self.running.admin(), timeout=10)
        self.created.append(provider_id)
        await self.wait_router_view(provider_id, lambda score: score is not None, "in the router's catalog")
        return provider_id

    async def update_provider(self, provider_id: str, **fields: Any) -> None:
        async with self._channel() as channel:
            await providers_pb2_grpc.ProviderServiceStub(channel).UpdateProvider(
                providers_pb2.UpdateProviderRequest(
                    provider=providers_pb2.Provider(name=f"providers/{provider_id}", **fields),
                    update_mask=field_mask_pb2.FieldMask(paths=list(fields))),
                metadata=self.running.admin(), timeout=10)

    async def delete_provider(self, provider_id: str) -> None:
        async with self._channel() as channel:
            await providers_pb2_grpc.ProviderServiceStub(channel).DeleteProvider(
                providers_pb2.DeleteProviderRequest(name=f"providers/{provider_id}"), metadata=self.running.admin(),
                timeout=10)
        if provider_id in self.created:
            self.created.remove(provider_id)
        await self.wait_router_view(provider_id, lambda score: score is None, "gone from the router's catalog")

    async def route(self, message_class: str, message_bytes: int = 2_000) -> providers_pb2.RouteEmailResponse:
        """The router's ranking and its breakdown."""
        async with self._channel() as channel:
            return await providers_pb2_grpc.ProviderServiceStub(channel).RouteEmail(
                providers_pb2.RouteEmailRequest(message_class=CLASSES[message_class], message_bytes=message_bytes,
                                                recipient_count=1), metadata=self.running.admin(), timeout=10)

    async def router_view(self, provider_id: str,
                          message_class: str = "transactional") -> providers_pb2.ProviderScore | None:
        """The provider as the router's RouteEmail shows it (ranked or excluded, with why), None when its catalog
        does not hold it."""
        decision = await self.route(message_class)
        return next((s for s in (*decision.ranked, *decision.excluded) if s.provider == f"providers/{provider_id}"),
                    None)

    async def wait_router_view(self, provider_id: str, done: Callable[[providers_pb2.ProviderScore | None], bool],
                               what: str, message_class: str = "transactional") -> None:
        """Until the router's RouteEmail shows ``provider_id`` as ``done`` wants it.

        A registry change reaches every router and sender through the same JetStream KV watch
        (``libs.routing.catalog``), and RouteEmail ranks on that catalog as senders do: it is the mesh's one
        observable of a change having been applied (a sender exposes no view of its catalog)."""
        await self.wait_for(lambda: self.router_view(provider_id, message_class), done,
                            f"providers/{provider_id} {what}")

    async def breaker(self, provider_id: str, message_class: str = "transactional") -> str:
        score = await self.router_view(provider_id, message_class)
        if score is None:
            raise AssertionError(f"{provider_id} is not in the router's catalog")
        return str(score.breaker_state)

    async def wait_for(self, observe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str,
                       stall_s: float = STALL_S) -> T:
        """``observe()`` once it is ``done``; fails naming ``what`` and the last value when the observation has
        not changed for ``stall_s``."""
        return await wait_for_progress_async(observe, done, what=what, stall_s=stall_s)

    # -- sending ---------------------------------------------------------------------------------------------------
    async def send(self, message_class: str, *, subject: str = "Hello", to: str = "rcpt@example.net") -> str:
        """SendEmail through ingest; returns the message id."""
        async with self._channel() as channel:
            reply = await messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
                messages_pb2.SendEmailRequest(
                    message_class=CLASSES[message_class], subject=subject, text_body="Your code is 123456.",
                    to=[common_pb2.EmailAddress(email=to)],
                    **{"from": common_pb2.EmailAddress(email="shop@example.com")}),
                metadata=self.running.auth(), timeout=10)
        return str(reply.message.id)

    async def send_many(self, message_class: str, count: int, **fields: Any) -> list[str]:
        return list(await asyncio.gather(*(self.send(message_class, **fields) for _ in range(count))))

    async def states(self, message_ids: Iterable[str]) -> dict[str, int]:
        """Each message's state as the status API reports it."""
        async with self._channel() as channel:
            stub = messages_pb2_grpc.MessageServiceStub(channel)
            replies = await asyncio.gather(*(stub.GetMessage(
                messages_pb2.GetMessageRequest(name=f"messages/{mid}"), metadata=self.running.auth(), timeout=10)
                for mid in message_ids))
        return {reply.id: int(reply.state) for reply in replies}

    async def wait_all_sent(self, message_ids: Sequence[str], stall_s: float = STALL_S) -> None:
        """Every message reaches state SENT (or a later one) in the status API."""
        final = {messages_pb2.MESSAGE_STATE_SENT, messages_pb2.MESSAGE_STATE_DELIVERED}

        async def sent() -> int:
            try:
                return sum(s in final for s in (await self.states(message_ids)).values())
            except grpc.aio.AioRpcError:  # reports has not recorded one of them yet: none counted this time
                return 0

        await self.wait_for(sent, lambda count: count == len(message_ids),
                            f"SENT (or later) for all {len(message_ids)} emails", stall_s)

    async def reset_simulator(self) -> None:
        await self.simulator.reset()
        self._records.clear()

    async def cleanup(self) -> None:
        for provider_id in list(self.created):
            await self.delete_provider(provider_id)
        await self.reset_simulator()


@pytest.fixture(scope="session")
def provider_mesh(request: pytest.FixtureRequest, new_database: Callable[[], str], redis_url: str, nats_url: str,
                  s3_server: S3Server, run_id: str, smtp_sink: tuple[int, Path], sim_process: SimProcess,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderMesh]:
    """Every service but the REST gateway, as processes, with a short breaker cool-down."""
    smtp_port, maildir = smtp_sink
    config = build_mesh_config(new_database(), redis_url, nats_url, s3_server, f"{run_id}snd",
                               tmp_path_factory.mktemp("sender-mesh-logs"))
    config.services = tuple(s for s in config.services if s != "gateway")
    config.extra_env.update(MESH_ENV)
    running = start_mesh(config, maildir, smtp_port)
    try:
        with grpc.insecure_channel(running.endpoint) as channel:
            # The e2e seeding adds an SMTP provider for every class; these tests choose their own providers.
            providers_pb2_grpc.ProviderServiceStub(channel).DeleteProvider(
                providers_pb2.DeleteProviderRequest(name="providers/sink"), metadata=running.admin(), timeout=10)
    except BaseException:
        running.mesh.stop()
        raise
    stopping = stop_after_last_user(request, running.stop)
    yield ProviderMesh(running, sim_process)
    stopping()


@pytest.fixture
async def mesh(provider_mesh: ProviderMesh) -> AsyncIterator[ProviderMesh]:
    """The session's mesh with a clean simulator; the providers a test creates are deleted after it."""
    provider_mesh._client = SimulatorClient(provider_mesh.sim.http_url)
    await provider_mesh.reset_simulator()
    yield provider_mesh
    await provider_mesh.cleanup()
    await provider_mesh.simulator.aclose()
    provider_mesh._client = None
