"""The mesh a chaos run breaks: private Postgres, Redis, NATS, S3 and provider simulator on free loopback ports (so
each can be killed and restarted on the same port with the same data), every service as its own process, and a
supervisor that restarts a service whose process died, as Kubernetes would."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from dev import mesh as m
from dev import pgtools, seed
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.simulator.model import default_personalities
from libs.common.db import migrate_services

log = logging.getLogger("chaos")

TENANT = "chaos"
#: Cheapest first: the cheapest provider carries most mail, so a fault there moves it to the others.
PROVIDER_PRICES = {"mailgun-us": 80, "sendgrid-1": 90, "postmark-1": 120}
CHEAPEST_PROVIDER = "mailgun-us"
DEPENDENCIES = ("postgres", "redis", "nats")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)

SERVICE_ENV = {
    # JetStream hands a killed sender's emails to another delivery after this long (production: 60 s). Shorter
    # here so a run of many faults finishes; the order of events it allows is the same.
    "ESP_ACK_WAIT_S": "10",
    "ESP_SHUTDOWN_GRACE_S": "3",
}


@dataclass
class ChaosCluster:
    """Everything a chaos run starts, and the handles to break it."""

    work_dir: Path
    pg_port: int = field(default_factory=m.free_port)
    redis_port: int = field(default_factory=m.free_port)
    nats_port: int = field(default_factory=m.free_port)
    s3_port: int = field(default_factory=m.free_port)
    sim_http_port: int = field(default_factory=m.free_port)
    sim_smtp_port: int = field(default_factory=m.free_port)
    dependencies: dict[str, m.RestartableServer] = field(default_factory=dict)
    simulator: m.Process | None = None
    simulator_url: str = ""
    mesh: m.Mesh | None = None
    api_key: str = ""
    _supervisor: asyncio.Task[None] | None = None

    @property
    def config(self) -> m.MeshConfig:
        assert self.mesh is not None, "the cluster is not started"
        return self.mesh.config

    @property
    def database_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/esp"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.ports['ingest']}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.config.gateway_port}"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    # -- start and stop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Dependencies, schema, services, tenant and providers; raises (having stopped what it started) on
        failure."""
        try:
            self._start_dependencies()
            config = m.MeshConfig(
                postgres_dsn=self.database_dsn, redis_url=f"redis://127.0.0.1:{self.redis_port}/0",
                nats_url=f"nats://127.0.0.1:{self.nats_port}", s3_endpoint=f"http://127.0.0.1:{self.s3_port}",
                namespace="chaos", admin_token=secrets.token_hex(16),
                ports={name: m.free_port() for name in m.GRPC_PORTS}, gateway_port=m.free_port(),
                webhook_port=m.free_port(), log_dir=self.log_dir,
                extra_env={"ESP_S3_BUCKET": "chaos-attachments", **SERVICE_ENV})
            asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
            self.mesh = m.Mesh(config)
            self.mesh.start()
            self._seed()
        except BaseException:
            self.stop()
            raise

    def _start_dependencies(self) -> None:
        self.dependencies = {
            "postgres": m.RestartablePostgres(self.work_dir / "pg", self.log_dir, self.pg_port),
            "redis": m.RestartableRedis(self.log_dir, self.redis_port),
            "nats": m.RestartableNats(self.work_dir / "nats", self.log_dir, self.nats_port),
            "s3": m.RestartableS3(self.work_dir / "s3", self.log_dir, self.s3_port),
        }
        # stop() stops those that started when a later one fails to.
        for server in self.dependencies.values():
            server.start()
        pgtools.create_database(self.dependencies["postgres"].url, "esp")
        self.simulator, description = m.start_simulator(
            self.sim_http_port, self.sim_smtp_port, self.log_dir, extra_args=("--log-cap", "1000000", "--seed", "7"))
        self.simulator_url = str(description["http_url"])

    def _seed(self) -> None:
        config = self.config
        with grpc.insecure_channel(self.endpoint) as channel, httpx.Client(base_url=self.simulator_url,
                                                                            timeout=10) as sim:
            seed.ensure_tenant(channel, config.admin_token, TENANT, "Chaos tenant")
            self.api_key = seed.create_api_key(channel, config.admin_token, TENANT)
            seed.top_up(channel, config.admin_token, TENANT, 10_000_000_000, "chaos-initial-credits")
            for personality in default_personalities():
                if personality.name not in PROVIDER_PRICES:
                    continue
                provider = personality.provider_config(self.simulator_url, "127.0.0.1", self.sim_smtp_port)
                url = f"http://127.0.0.1:{config.webhook_port}/webhooks/{personality.name}"
                secrets_ = sim.get(f"/_sim/personalities/{personality.name}").json()["webhooks"]["receiver_secrets"]
                seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                    id=personality.name, type=personality.type, endpoint=provider.endpoint,
                    credentials=dict(provider.credentials), options=dict(provider.options),
                    region=provider.region, price_per_email_micros=PROVIDER_PRICES[personality.name],
                    webhook_secrets=secrets_))
                sim.patch(f"/_sim/personalities/{personality.name}/knobs",
                          json={"latency_ms": 20, "jitter_ms": 20, "webhook_url": url,
                                "webhook_delay_ms": 200, "webhook_jitter_ms": 200}).raise_for_status()

    def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.stop()
        if self.simulator is not None:
            self.simulator.stop()
        for server in reversed(list(self.dependencies.values())):
            server.stop()

    # -- the supervisor ----------------------------------------------------------------------------------------
    def start_supervisor(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop_supervisor(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    async def _supervise(self) -> None:
        """Restart any service whose process has exited, with backoff while it cannot start (its dependencies
        may be down)."""
        failures: dict[str, int] = {}
        while True:
            assert self.mesh is not None
            for name in list(self.mesh.processes):
                proc = self.mesh.processes[name]
                if proc.popen.poll() is None:
                    continue
                try:
                    await asyncio.to_thread(self.mesh.start_service, name)
                    failures.pop(name, None)
                except RuntimeError as exc:
                    count = failures[name] = failures.get(name, 0) + 1
                    log.warning("restart of %s failed (%s); retrying", name, str(exc).splitlines()[0])
                    await asyncio.sleep(RESTART_BACKOFF_S[min(count, len(RESTART_BACKOFF_S)) - 1])
            await asyncio.sleep(0.2)

    async def wait_serving(self, timeout_s: float = 120) -> None:
        """Until every service process is up (the supervisor restarts dead ones)."""
        deadline = time.monotonic() + timeout_s
        assert self.mesh is not None
        while time.monotonic() < deadline:
            if all(p.popen.poll() is None for p in self.mesh.processes.values()):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("services did not come back within the timeout")

    # -- faults ---------------------------------------------------------------------------------------------------
    def kill_service(self, name: str) -> None:
        """SIGKILL a service's process (its workers notice the parent is gone and stop)."""
        assert self.mesh is not None
        proc = self.mesh.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()

    def kill_worker(self, service: str, worker_module: str) -> None:
        """SIGKILL one worker process of ``service`` (found by its module on the command line) and wait until the
        service's parent has exited, as it does when a worker dies; the supervisor restarts the replica."""
        assert self.mesh is not None
        parent = self.mesh.processes[service].popen
        for pid in _children(parent.pid):
            if worker_module in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                # The fault is the replica going down: it has, once the parent has noticed and exited.
                parent.wait(timeout=30)
                return
        raise RuntimeError(f"{service} has no worker running {worker_module}")

    def kill_dependency(self, name: str) -> None:
        """Crash a dependency (Postgres by an immediate shutdown, so the next start runs crash recovery)."""
        self._dependency(name).crash()

    def start_dependency(self, name: str) -> None:
        """Start a crashed dependency again, on its port and over its data."""
        self._dependency(name).start()

    def _dependency(self, name: str) -> m.RestartableServer:
        if name not in DEPENDENCIES:
            raise ValueError(f"no such dependency: {name}")
        return self.dependencies[name]

    async def set_knobs(self, personality: str, **knobs: Any) -> None:
        async with httpx.AsyncClient(base_url=self.simulator_url, timeout=10) as sim:
            response = await sim.patch(f"/_sim/personalities/{personality}/knobs", json=knobs)
            response.raise_for_status()

    async def simulator_requests(self, since_seq: int = 0) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.simulator_url, timeout=60) as sim:
            response = await sim.get("/_sim/requests", params={"since": since_seq})
            response.raise_for_status()
            records: list[dict[str, Any]] = response.json()
            return records


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def new_work_dir() -> Path:
    """A private directory for one run's data and logs (Postgres wants its data owned by its user)."""
    path = Path(tempfile.mkdtemp(prefix="esp-chaos-"))
    if os.geteuid() == 0:
        os.chmod(path, 0o755)
    return path
