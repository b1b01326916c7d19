"""End to end through every service on this machine, against the provider simulator (zero latency knobs).

Starts its own mesh (fresh database, its own JetStream namespace and Redis keys, a private S3 and simulator),
then measures, ``--runs`` times, and prints the medians as JSON lines:

- ``e2e.sends_per_s``: emails per second from accept to provider. Many concurrent clients call ingest's
  ``BatchSendEmails``; the clock runs from the first call to the simulator's arrival of the last email.
- ``e2e.otp_p99_ms``: an OTP's accept → provider request (client call start → simulator arrival), p99
  (nearest rank), over ``--otps`` (300) OTPs sent at a steady probe rate (``--otp-rate``, 50/s) while a bulk
  backlog queued on the SEND stream drains: the backlog is topped up so that it never runs dry while the probes
  run (``e2e.otp_p50_ms`` alongside; ``e2e.otp_accept_p50_ms``/``p99`` are the SendEmail call's share of it,
  ``e2e.otp_after_reply_p99_ms`` the send side's: from the reply to the provider request).
  What the machine did meanwhile comes alongside: ``e2e.otp_phase_bulk_drain_per_s`` (backlog emails reaching
  the simulator while the OTPs were timed) and, with ``--wakeup-probe``, what a wake-up probe saw (a process at
  nice 0 in a session of its own sleeping 1 ms at a time): ``e2e.otp_phase_wakeup_p999_ms``, its p99.9
  lateness, and ``e2e.otp_phase_wakeup_stalls_per_1000``, wake-ups more than 10 ms late per 1,000. The probe
  is off by default because it loads the machine it measures (BENCHMARKS.md).
- ``e2e.otp_campaign_p99_ms``: the same OTP probes (same rate and count, ``e2e.otp_campaign_p50_ms`` and
  ``e2e.otp_campaign_accept_p99_ms`` alongside) while a campaign of the same tenant (``--campaign`` recipients)
  runs through the campaigns service, as a customer's campaign really arrives: recipients streamed in, expanded
  (rendered, credits held, queued) by the campaigns expander and drained. Unlike the backlog of
  ``e2e.otp_p99_ms``, its emails hold credit: their reserves lock the tenant's balance row that every OTP's
  reserve needs while the campaign expands, and the ledger settles their outcomes (the tenant's holds, its commit
  totals, a release on the balance row) while the probes go on.
- ``e2e.cpu_us_per_email``: CPU microseconds per email of the ``e2e.sends_per_s`` run summed over every process
  but the simulator and the load generator (the services with their workers, Postgres, NATS, Redis).
- ``sender.fallback_decision_p99_ms``: for OTPs whose first provider failed (HTTP 500, 30 % of calls), the
  sender's own measure (its ``esp_sender_fallback_decision_seconds`` histogram, read from the OTP worker's
  metrics endpoint; p99 = upper bound of the bucket holding it) from the failed answer to the next provider
  call: health bookkeeping, re-ranking and the gate (breaker, quota, rate) between two attempts.
  ``sender.fallback_gap_at_provider_p99_ms`` is the same gap seen by the simulator (failed answer written →
  next request arrived), so it adds the HTTP hop and the transport's delays.
- ``sender.sends_per_s`` (baseline): the sender alone draining a bulk backlog published straight onto the SEND
  stream — what the send side can do when ingest is not in front of it, so the two figures locate the
  bottleneck.
- ``e2e.cpu_ms_per_email.<process>``: CPU milliseconds each process spent per email during the ``e2e.sends_per_s``
  run (a service with its worker processes, the simulator, the load generator, and the shared Postgres, NATS and
  Redis servers by process name), so the figure that bounds throughput on two cores is visible, and steadier than
  throughput on a shared machine. ``sender.cpu_ms_per_email`` is the sender's during ``sender.sends_per_s``.

Before the first run, with the mesh up and idle, it measures the floors (:mod:`bench.floor`; the Postgres one in
the benchmark's database) and prints the headline figures against them as ``<metric>_vs_floor``:
``e2e.sends_per_s`` (Postgres is the largest CPU share per email) against the Postgres floor; ``sender.sends_per_s``
(no Postgres on its path) and the latencies (``e2e.otp_p99_ms``, ``e2e.otp_campaign_p99_ms``,
``sender.fallback_decision_p99_ms``) against the gRPC floor.

Run: ``make bench BENCH=e2e``; options (``--runs``, ``--emails``, ``--clients``, ``--campaign``, ...) go in
``BENCH_ARGS="--runs 5"`` or after ``--`` in ``python -m bench e2e -- --runs 5``. Servers: Postgres
``ESP_BENCH_POSTGRES_DSN``, Redis ``ESP_BENCH_REDIS_URL``, NATS ``ESP_BENCH_NATS_URL`` (defaults: the local ones).
``--nats-cluster 3`` runs the mesh on a three-node JetStream cluster of its own instead (``dev.nats_cluster``: loopback,
``sync_interval: always``, the streams at three replicas), as production runs NATS; ``--nats-sync default`` leaves
the cluster's file stores at NATS's default sync interval (2 min), to tell replication's cost from the fsyncs'.
Logs of every process: ``.dev/bench-e2e/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
from esp.internal.v1 import queue_pb2
from esp.v1 import (
    campaigns_pb2,
    campaigns_pb2_grpc,
    common_pb2,
    credits_pb2,
    credits_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)
from google.protobuf.timestamp_pb2 import Timestamp

from bench import floor
from bench.processes import SHARED_SERVERS, cpu_snapshot, run_and_report, until_idle
from dev import mesh as m
from dev import pgtools, seed
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.nats_cluster import NatsCluster
from libs.common.db import migrate_services
from libs.common.jetstream import Topology, server_urls
from libs.common.priority import lower_cpu_priority

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ESP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("ESP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
LOG_DIR = m.ROOT / ".dev" / "bench-e2e"
PERSONALITIES = {"bulk": "mailgun", "transactional": "postmark", "otp-flaky": "postmark", "otp-steady": "postmark"}
"""Simulator personality → provider type. Bulk goes to Mailgun: 1,000 recipients of one newsletter per call."""
SIMULATOR_HOSTS = {"bulk": ("bulk",), "direct": ("transactional", "otp-flaky", "otp-steady")}
"""Simulator processes → the personalities each serves. Providers are separate companies' servers: one process for
all of them would make an OTP's arrival wait while the same event loop parses a 1,000-recipient bulk call."""
SIMULATOR_NICENESS = {"bulk": 10}
"""The bulk provider's stand-in answers 2,000 calls a second while the OTPs are timed, on the mesh's two cores
(a real provider's CPU is its own): it yields the CPU as the backlog keeper does. The direct simulator stays at
the mesh's priority, since its arrival time ends every OTP's measurement. Measured, alternating: OTP p99 45.1
and 49.3 ms against 49.8 and 56.0 with the bulk simulator at nice 0 (BENCHMARKS.md, session 7)."""
TENANT = "bench"
CLASSES = {"otp": common_pb2.MESSAGE_CLASS_OTP, "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
           "bulk": common_pb2.MESSAGE_CLASS_BULK}


@dataclass
class Environment:
    """A running mesh, its simulator, and how to reach both."""

    config: m.MeshConfig
    mesh: m.Mesh
    simulator_urls: dict[str, str]
    """Personality → base URL of the simulator process serving it."""
    api_key: str
    sender_metrics_port: int
    """The sender's Prometheus port; its worker for class i (in ESP_SENDER_CLASSES order) serves on port + 1 + i."""
    simulators: list[m.Process]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.ports['ingest']}"

    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.config.admin_token}"),)


@contextmanager
def environment(nats_cluster: int = 0, sync_always: bool = True) -> Iterator[Environment]:
    """Everything up, and down again afterwards whatever happens; with ``nats_cluster`` (3 or more), NATS is a
    cluster of that many servers started here, the streams at three replicas."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    if nats_cluster:
        with tempfile.TemporaryDirectory(prefix="esp-bench-nats-") as store, \
                NatsCluster(Path(store), LOG_DIR, nats_cluster, sync_always=sync_always).running() as cluster:
            with _environment(cluster.url, 3) as env:
                yield env
    else:
        with _environment(NATS_URL, 1) as env:
            yield env


@contextmanager
def _environment(nats_url: str, stream_replicas: int) -> Iterator[Environment]:
    database = pgtools.unique_database_name("esp_bench_e2e")
    dsn = pgtools.create_database(ADMIN_DSN, database)
    processes: list[m.Process] = []
    mesh: m.Mesh | None = None
    try:
        s3_port = m.free_port()
        processes.append(m.start_s3(s3_port, LOG_DIR))
        simulator_urls: dict[str, str] = {}
        simulators: list[m.Process] = []
        for host, served in SIMULATOR_HOSTS.items():
            url, simulator = start_simulator(host, served)
            processes.append(simulator)
            simulators.append(simulator)
            simulator_urls.update(dict.fromkeys(served, url))
        namespace = f"bench{secrets.token_hex(3)}"
        config = m.MeshConfig(
            postgres_dsn=dsn, redis_url=REDIS_URL, nats_url=nats_url, s3_endpoint=f"http://127.0.0.1:{s3_port}",
            namespace=namespace, admin_token=secrets.token_hex(16), ports={n: m.free_port() for n in m.GRPC_PORTS},
            gateway_port=m.free_port(), webhook_port=m.free_port(), log_dir=LOG_DIR,
            services=tuple(s for s in m.SERVICES if s not in ("gateway", "sender")),
            extra_env={"ESP_S3_BUCKET": f"{namespace}-attachments", "ESP_LOG_LEVEL": "WARNING",
                       "ESP_SHUTDOWN_GRACE_S": "3", "ESP_STREAM_REPLICAS": str(stream_replicas)})
        asyncio.run(migrate_services(dsn, SERVICES_WITH_SCHEMAS))
        mesh = m.Mesh(config)
        mesh.start()
        metrics_port = start_sender(mesh)
        with grpc.insecure_channel(f"127.0.0.1:{config.ports['ingest']}") as channel:
            # Rates far above what one machine can do: the benchmark measures the mesh, not the tenant's limit.
            tenants_pb2_grpc.TenantServiceStub(channel).CreateTenant(tenants_pb2.CreateTenantRequest(
                tenant_id=TENANT, tenant=tenants_pb2.Tenant(
                    display_name=TENANT, otp_rate_per_second=1e6, transactional_rate_per_second=1e6,
                    bulk_rate_per_second=1e6)), metadata=(("authorization", f"Bearer {config.admin_token}"),),
                timeout=10)
            api_key = seed.create_api_key(channel, config.admin_token, TENANT)
            seed.top_up(channel, config.admin_token, TENANT, 10**12, "bench-credits")
        yield Environment(config, mesh, simulator_urls, api_key, metrics_port, simulators)
    finally:
        if mesh is not None:
            mesh.stop()
            asyncio.run(m.forget_namespace(mesh.config.namespace, nats_url, REDIS_URL))
        for process in reversed(processes):
            process.stop()
        pgtools.drop_database(ADMIN_DSN, database)


METRICS_PORTS = range(20_000, 32_000, 4)
"""Where the sender's metrics ports are picked (four in a row): below Linux's ephemeral ports (32768-60999)."""


def start_sender(mesh: m.Mesh) -> int:
    """The sender as the mesh would start it, plus a metrics port (its workers take the next ones)."""
    # Its workers listen on the next ports: none of them may be listening already or be promised to a service
    # that has not bound it yet (the sender's own gRPC port among them).
    # They bind seconds later, once each worker has started, so the ports come from below the kernel's ephemeral
    # range: there, an outgoing connection of a service already running cannot take one meanwhile (it did).
    promised = {*mesh.config.ports.values(), mesh.config.gateway_port, mesh.config.webhook_port}
    metrics_port = secrets.choice(METRICS_PORTS)
    while any(m.port_open(metrics_port + i) or metrics_port + i in promised for i in range(4)):
        metrics_port = secrets.choice(METRICS_PORTS)
    env = {**mesh.config.env(), "ESP_GRPC_PORT": str(mesh.config.ports["sender"]),
           "ESP_METRICS_PORT": str(metrics_port)}
    process = m.spawn("sender", [sys.executable, "-m", "services.sender"], LOG_DIR, env)
    mesh.processes["sender"] = process
    m.wait_grpc_serving(mesh.config.ports["sender"], 60, process.popen, "sender")
    return metrics_port


def _credentials(name: str) -> dict[str, str]:
    if PERSONALITIES[name] == "mailgun":
        return {"api_key": f"key-{name}", "domain": f"{name}.example.com", "webhook_signing_key": f"{name}-signing"}
    return {"server_token": f"{name}-token", "webhook_user": "hook", "webhook_password": "hook"}


def start_simulator(host: str, served: Sequence[str]) -> tuple[str, m.Process]:
    """A simulator process serving the ``served`` personalities, zero latency, ``SIMULATOR_NICENESS[host]`` nicer."""
    personalities = LOG_DIR / f"personalities-{host}.json"
    personalities.write_text(json.dumps({"personalities": [
        {"name": name, "type": PERSONALITIES[name], "credentials": _credentials(name)} for name in served]}))
    http_port = m.free_port()
    process = m.spawn(f"simulator-{host}", [sys.executable, "-m", "dev.simulator", "--http-port", str(http_port),
                                    "--smtp-port", str(m.free_port()), "--personalities", str(personalities),
                                    "--seed", "1", "--log-cap", "1000000",
                                    "--niceness", str(SIMULATOR_NICENESS.get(host, 0))], LOG_DIR)
    m.wait_port(http_port, 30, process.popen, f"simulator-{host}")
    return f"http://127.0.0.1:{http_port}", process


# -- talking to the mesh and the simulator ------------------------------------------------------------------------
class Simulator:
    """The simulator processes' request logs, read incrementally (they grow large) and merged."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self.clients = {url: httpx.AsyncClient(base_url=url, timeout=60) for url in dict.fromkeys(urls.values())}
        self.records: list[dict[str, Any]] = []
        self._last_seq = dict.fromkeys(self.clients, 0)

    async def reset(self) -> None:
        for client in self.clients.values():
            (await client.post("/_sim/reset")).raise_for_status()
        self.records.clear()
        self._last_seq = dict.fromkeys(self.clients, 0)

    async def knobs(self, personality: str, **values: Any) -> None:
        client = self.clients[self.urls[personality]]
        (await client.patch(f"/_sim/personalities/{personality}/knobs", json=values)).raise_for_status()

    async def read(self) -> list[dict[str, Any]]:
        for url, client in self.clients.items():
            response = await client.get("/_sim/requests", params={"since": self._last_seq[url]})
            response.raise_for_status()
            fresh = response.json()
            if fresh:
                self._last_seq[url] = fresh[-1]["seq"]
                self.records.extend(fresh)
        return self.records

    async def arrivals(self, wanted: set[str], timeout_s: float) -> dict[str, float]:
        """First arrival time of each wanted email at any provider, waiting (bounded) until all have arrived."""
        deadline = time.monotonic() + timeout_s
        found: dict[str, float] = {}
        seen = 0
        while True:
            records = await self.read()
            for record in records[seen:]:
                if not record["delivered"]:
                    continue
                for message in record["messages"]:
                    mid = message["esp_message_id"]
                    if mid in wanted and message["rejection"] is None and (mid not in found
                                                                           or record["arrived_at"] < found[mid]):
                        found[mid] = record["arrived_at"]
            seen = len(records)
            if len(found) == len(wanted):
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(found)} of {len(wanted)} emails reached the simulator")
            await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


async def set_providers(env: Environment, providers: dict[str, dict[str, Any]]) -> None:
    """Make the registry hold exactly ``providers`` (name → fields), then give the replicas time to apply it.
    Ids get a fresh suffix each time, so no measurement inherits the health (breaker, latency) of an earlier
    one."""
    async with grpc.aio.insecure_channel(env.endpoint) as channel:
        stub = providers_pb2_grpc.ProviderServiceStub(channel)
        listed = await stub.ListProviders(providers_pb2.ListProvidersRequest(page_size=1000, show_disabled=True),
                                          metadata=env.admin(), timeout=10)
        for provider in listed.providers:
            await stub.DeleteProvider(providers_pb2.DeleteProviderRequest(name=provider.name), metadata=env.admin(),
                                      timeout=10)
        suffix = secrets.token_hex(3)
        for name, fields in providers.items():
            provider_id = f"{name}-{suffix}"
            personality = fields.pop("personality")
            classes = fields.pop("classes", ())
            kind = PERSONALITIES[personality]
            secrets_ = _credentials(personality)
            if kind == "mailgun":
                credentials, options = {"api_key": secrets_["api_key"]}, {"domain": secrets_["domain"]}
            else:
                credentials, options = {"server_token": secrets_["server_token"]}, {}
            await stub.CreateProvider(providers_pb2.CreateProviderRequest(
                provider_id=provider_id, provider=providers_pb2.Provider(
                    type=kind, endpoint=f"{env.simulator_urls[personality]}/p/{personality}",
                    credentials=credentials,
                    options={"timeout_s": "5", **options}, allowed_classes=[CLASSES[c] for c in classes],
                    **fields)),
                metadata=env.admin(), timeout=10)
    await asyncio.sleep(2.5)


def send_request(message_class: str, index: int) -> messages_pb2.SendEmailRequest:
    return messages_pb2.SendEmailRequest(
        message_class=CLASSES[message_class], subject="Your receipt" if message_class != "otp" else "Your code",
        text_body="Thank you for your order.", to=[common_pb2.EmailAddress(email=f"customer{index}@example.org")],
        **{"from": common_pb2.EmailAddress(email="shop@example.com")})


# -- where the CPU goes ---------------------------------------------------------------------------------------------
def cpu_seconds(env: Environment) -> dict[str, float]:
    """CPU seconds so far of each service (with its worker processes), the simulator, and the shared servers."""
    snapshot = cpu_snapshot()
    totals = {name: snapshot.tree(process.popen.pid) for name, process in env.mesh.processes.items()}
    totals["simulator"] = sum(snapshot.tree(process.popen.pid) for process in env.simulators)
    # The load generator alone (every other process is its child).
    totals["bench-client"] = snapshot.processes[os.getpid()][2]
    for server in SHARED_SERVERS:
        totals[server] = snapshot.named(server)
    return totals


def mesh_cpu_seconds(env: Environment) -> dict[str, float]:
    """CPU seconds so far of each service (with its worker processes) and the simulator: the mesh's own processes,
    without the shared servers or this one."""
    return {name: cpu for name, cpu in cpu_seconds(env).items() if name not in (*SHARED_SERVERS, "bench-client")}


def cpu_ms_per_email(before: dict[str, float], after: dict[str, float], emails: int) -> dict[str, float]:
    return {name: round(1000 * (after[name] - before.get(name, 0.0)) / emails, 3) for name in after}


# -- the measurements ---------------------------------------------------------------------------------------------
async def sends_per_s(env: Environment, simulator: Simulator, emails: int, clients: int, batch: int) -> float:
    """Emails through BatchSendEmails from ``clients`` concurrent callers until all reached the simulator."""
    await set_providers(env, {"bulk-provider": {"personality": "bulk", "price_per_email_micros": 10}})
    await simulator.reset()
    started = time.time()
    accepted = await accept_bulk(env, emails, clients, batch)
    arrivals = await simulator.arrivals(set(accepted), timeout_s=max(120, emails / 50))
    return emails / (max(arrivals.values()) - started)


async def accept_bulk(env: Environment, emails: int, clients: int, batch: int,
                      first_reply: asyncio.Event | None = None) -> list[str]:
    """``emails`` bulk emails through BatchSendEmails, ``batch`` a call, from ``clients`` concurrent callers; the
    accepted message ids. ``first_reply`` is set as soon as one call has returned."""
    accepted: list[str] = []
    next_index = 0

    async def client(stub: messages_pb2_grpc.MessageServiceStub) -> None:
        nonlocal next_index
        while next_index < emails:
            first, next_index = next_index, min(emails, next_index + batch)
            reply = await stub.BatchSendEmails(messages_pb2.BatchSendEmailsRequest(
                requests=[send_request("bulk", i) for i in range(first, next_index)]), metadata=env.auth(),
                timeout=60)
            for result in reply.results:
                if result.HasField("error"):
                    raise RuntimeError(f"a send was refused: {result.error}")
                accepted.append(result.message.id)
            if first_reply is not None:
                first_reply.set()

    channels = [grpc.aio.insecure_channel(env.endpoint) for _ in range(min(clients, 8))]
    try:
        stubs = [messages_pb2_grpc.MessageServiceStub(c) for c in channels]
        await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(clients)))
    finally:
        for channel in channels:
            await channel.close()
    return accepted


async def sender_sends_per_s(env: Environment, simulator: Simulator, emails: int) -> float:
    """The sender alone: a bulk backlog published straight onto SEND, drained to the simulator."""
    await set_providers(env, {"bulk-provider": {"personality": "bulk", "price_per_email_micros": 10}})
    await simulator.reset()
    tasks = [bulk_task(i) for i in range(emails)]
    nc = await nats.connect(server_urls(env.config.nats_url))
    try:
        js = nc.jetstream()
        subject = Topology(env.config.namespace).send_subject("bulk")
        published = await publish_all(js, subject, tasks)
        arrivals = await simulator.arrivals({t.message_id for t in tasks}, timeout_s=max(120, emails / 50))
    finally:
        await nc.close()
    return emails / (max(arrivals.values()) - published)


def bulk_task(index: int) -> queue_pb2.SendTask:
    accepted = Timestamp()
    accepted.GetCurrentTime()
    task = queue_pb2.SendTask(
        message_id=str(uuid.uuid4()), tenant_id=TENANT, message_class=common_pb2.MESSAGE_CLASS_BULK,
        to=[common_pb2.EmailAddress(email=f"reader{index}@example.org")], subject="Our newsletter",
        text_body="News.", message_bytes=1_500, accepted_time=accepted)
    getattr(task, "from").email = "news@example.com"
    return task


async def publish_all(js: Any, subject: str, tasks: Sequence[queue_pb2.SendTask]) -> float:
    """Publish the backlog; returns when the first email went out (epoch seconds)."""
    started = time.time()
    for start in range(0, len(tasks), 2_000):
        acks = [await js.publish_async(subject, t.SerializeToString(), headers={"Nats-Msg-Id": t.message_id})
                for t in tasks[start:start + 2_000]]
        await asyncio.gather(*acks)
    return started


def otp_providers() -> dict[str, dict[str, Any]]:
    """Bulk and OTP on providers of their own, so an OTP never waits behind a bulk call at the provider."""
    return {"bulk-provider": {"personality": "bulk", "price_per_email_micros": 10, "classes": ["bulk"]},
            "otp-provider": {"personality": "otp-steady", "price_per_email_micros": 100, "classes": ["otp"]}}


async def probe_otps(env: Environment, otps: int, otp_rate: float) -> tuple[dict[str, float], dict[str, float]]:
    """``otps`` OTPs through SendEmail, ``otp_rate`` a second: each one's call start (epoch seconds) and each
    call's duration in ms (accepted: committed and on its way to the queue), by message id."""
    sent_at: dict[str, float] = {}
    accept_ms: dict[str, float] = {}
    async with grpc.aio.insecure_channel(env.endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)

        async def one(index: int) -> None:
            started = time.time()
            reply = await stub.SendEmail(send_request("otp", index), metadata=env.auth(), timeout=10)
            accept_ms[reply.message.id] = (time.time() - started) * 1000
            sent_at[reply.message.id] = started

        pending = []
        for index in range(otps):
            pending.append(asyncio.create_task(one(index)))
            await asyncio.sleep(1 / otp_rate)
        await asyncio.gather(*pending)
    return sent_at, accept_ms


BACKLOG_KEEPER_NICENESS = 10


@dataclass(frozen=True)
class BacklogJob:
    """What the backlog keeper does: queue ``backlog`` bulk emails on ``subject``, then, until told to stop, another
    ``backlog / 2`` whenever ``durable`` has fewer than that many left to deliver."""

    nats_url: str
    stream: str
    subject: str
    durable: str
    backlog: int


async def _keep_backlog(job: BacklogJob, ready: Any, stop: Any) -> tuple[list[str], int]:
    # The load, not the system measured: it yields the CPU as the mesh's own background work does.
    lower_cpu_priority(BACKLOG_KEEPER_NICENESS, own_session=True)
    queued: list[str] = []
    ran_dry = 0
    nc = await nats.connect(server_urls(job.nats_url))
    try:
        js = nc.jetstream()

        async def queue(count: int) -> None:
            tasks = [bulk_task(i) for i in range(count)]
            queued.extend(t.message_id for t in tasks)
            await publish_all(js, job.subject, tasks)

        await queue(job.backlog)
        ready.set()
        while not stop.is_set():
            info = await js.consumer_info(job.stream, job.durable)
            if not info.num_pending:
                ran_dry += 1
            if (info.num_pending or 0) < job.backlog // 2:
                await queue(job.backlog // 2)
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return queued, ran_dry


def _backlog_process(job: BacklogJob, ready: Any, stop: Any, out: Any) -> None:
    """Body of the backlog keeper's process: (queued message ids, times it found the backlog dry) or the error."""
    run_and_report(out, "the backlog keeper", _keep_backlog(job, ready, stop))


WAKEUP_STALL_MS = 10.0


def _oversleep_ms(stop: Any) -> list[float]:
    """Sleep 1 ms at a time until ``stop``: how late each wake-up came, in ms."""
    late: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        time.sleep(0.001)
        late.append((time.perf_counter() - started) * 1000 - 1.0)
    return late


async def _probe_wakeups(stop: Any) -> list[float]:
    os.setsid()  # a session, hence an autogroup, of its own at nice 0: as each mesh service runs
    return await asyncio.to_thread(_oversleep_ms, stop)


def _wakeup_probe_process(stop: Any, out: Any) -> None:
    """Body of the wake-up probe's process: its oversleeps, or the error."""
    run_and_report(out, "the wake-up probe", _probe_wakeups(stop))


def wakeup_figures(late_ms: Sequence[float]) -> dict[str, float]:
    """What the wake-up probe saw: p99.9 of the oversleeps and how many in 1,000 came more than
    ``WAKEUP_STALL_MS`` late."""
    if not late_ms:
        raise RuntimeError("the wake-up probe measured nothing")
    stalls = sum(1 for x in late_ms if x > WAKEUP_STALL_MS)
    return {"e2e.otp_phase_wakeup_p999_ms": percentile(late_ms, 0.999),
            "e2e.otp_phase_wakeup_stalls_per_1000": 1000 * stalls / len(late_ms)}


@dataclass
class OtpMeasurement:
    """One ``otp_latency_ms`` run: the OTPs' figures and what the machine was doing meanwhile."""

    latencies_ms: list[float]
    """Each OTP's accept → provider request."""
    accept_ms: list[float]
    """The SendEmail call's share of it."""
    after_reply_ms: list[float]
    """From the SendEmail reply to the provider request: the send side's share (negative when the email was on
    its way before the reply reached the client)."""
    context: dict[str, float]
    """The bulk drain rate while the OTPs were timed, and the wake-up probe's figures."""


async def otp_latency_ms(env: Environment, simulator: Simulator, backlog: int, otps: int,
                         otp_rate: float, *, wakeup_probe: bool = False) -> OtpMeasurement:
    """OTPs at a steady rate while a bulk backlog drains: each one's accept → provider request, in ms, and the
    part of it spent in the SendEmail call (accepted: committed and on its way to the queue).

    The sender drains a backlog of 10,000 in about two seconds here, so a backlog published once would leave most
    probes to a quiet machine. A process of its own (so that its publishing never delays a probe's event loop)
    therefore keeps the backlog topped up while the probes run, watching the bulk consumer's pending count, and
    the measurement fails if the backlog ever ran dry: every probe meets a bulk drain at full speed. The
    simulator's logs, which are large, are read only once the probes are done.

    The simulator's log gives the bulk drain rate while the OTPs were timed, so every figure comes with the state
    of the machine it was measured on. With ``wakeup_probe``, a wake-up probe — a process at nice 0 in a session of
    its own, as each service runs, sleeping 1 ms at a time — also records how late the scheduler let it run. It is
    off by default: its thousand wake-ups a second cost 3 % of the machine's CPU at the mesh's priority, and its
    stall rate did not follow the OTPs' p99 (BENCHMARKS.md, sessions 6 and 7)."""
    await set_providers(env, otp_providers())
    await simulator.reset()
    topology = Topology(env.config.namespace)
    job = BacklogJob(env.config.nats_url, topology.send_stream("bulk"), topology.send_subject("bulk"),
                     topology.consumer("sender-bulk"), backlog)
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    receive, send = context.Pipe(duplex=False)
    keeper = context.Process(target=_backlog_process, args=(job, ready, stop, send), daemon=True)
    probe_stop = context.Event()
    probe_receive, probe_send = context.Pipe(duplex=False)
    waker = context.Process(target=_wakeup_probe_process, args=(probe_stop, probe_send), daemon=True)
    late_ms: list[float] | Exception = []
    keeper.start()
    try:
        while not await asyncio.to_thread(ready.wait, 1):
            if not keeper.is_alive():
                raise RuntimeError(f"the backlog keeper exited with code {keeper.exitcode}")
        if wakeup_probe:
            waker.start()
        try:
            window_started = time.time()
            sent_at, accept_ms = await probe_otps(env, otps, otp_rate)
            window_ended = time.time()
        finally:
            stop.set()
            probe_stop.set()
        outcome = await asyncio.to_thread(receive.recv)
        if wakeup_probe:
            late_ms = await asyncio.to_thread(probe_receive.recv)
    finally:
        for helper in (keeper, waker):
            if helper.pid is not None:
                helper.join(10)
                if helper.is_alive():
                    helper.kill()
    if isinstance(outcome, Exception):
        raise outcome
    if isinstance(late_ms, Exception):
        raise late_ms
    queued, ran_dry = outcome
    if ran_dry:
        raise RuntimeError(f"the bulk backlog ran dry {ran_dry} times while OTPs were timed: raise --backlog")
    arrivals = await simulator.arrivals(set(sent_at), timeout_s=120)
    # Let the backlog finish before the next measurement starts on a quiet machine.
    await simulator.arrivals(set(queued), timeout_s=max(120, len(queued) / 50))
    backlog_ids = set(queued)
    drained = sum(1 for record in simulator.records if record["delivered"]
                  and window_started <= record["arrived_at"] <= window_ended
                  for message in record["messages"] if message["esp_message_id"] in backlog_ids)
    context_figures = {"e2e.otp_phase_bulk_drain_per_s": drained / (window_ended - window_started)}
    if wakeup_probe:
        context_figures.update(wakeup_figures(late_ms))
    print(f"  {len(sent_at)} OTPs timed while {len(queued):,} bulk emails drained", file=sys.stderr, flush=True)
    return OtpMeasurement([(arrivals[mid] - sent_at[mid]) * 1000 for mid in sent_at], list(accept_ms.values()),
                          [(arrivals[mid] - sent_at[mid]) * 1000 - accept_ms[mid] for mid in sent_at],
                          context_figures)


async def run_campaign(env: Environment, recipients: int, started: asyncio.Event) -> tuple[float, float]:
    """A campaign of ``recipients`` through the campaigns service, as a customer runs one: created, its recipients
    streamed in (each with its own variables), started as soon as the first are in; ``started`` is set then.
    Returns when reports counts every email sent: (when its last recipient was queued, when its last email was
    sent), epoch seconds."""
    async with grpc.aio.insecure_channel(env.endpoint) as channel:
        stub = campaigns_pb2_grpc.CampaignServiceStub(channel)
        c = campaigns_pb2.Campaign(display_name="bench", subject="Hello {{ first_name }}",
                                   text_body="Hi {{ first_name }}, your code is {{ code }}.", tags=["bench"])
        getattr(c, "from").CopyFrom(common_pb2.EmailAddress(email="news@example.com"))
        created = await stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=c), metadata=env.auth(),
                                            timeout=10)

        async def frames() -> Any:
            for first in range(0, recipients, 500):
                yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=created.name, recipients=[
                    campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email=f"member{i}@example.org"),
                                                    variables={"first_name": f"M{i}", "code": f"{i:06d}"})
                    for i in range(first, min(first + 500, recipients))])

        async def add() -> campaigns_pb2.AddCampaignRecipientsResponse:
            return await stub.AddCampaignRecipients(frames(), metadata=env.auth(), timeout=600)

        adding = asyncio.create_task(add())
        request = campaigns_pb2.GetCampaignRequest(name=created.name)
        while (await stub.GetCampaign(request, metadata=env.auth(), timeout=10)).progress.recipients == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=env.auth(),
                                 timeout=10)
        started.set()
        await adding
        queued_at = 0.0
        while True:
            progress = (await stub.GetCampaign(request, metadata=env.auth(), timeout=10)).progress
            if not queued_at and progress.pending == 0:
                queued_at = time.time()
            if progress.sent >= recipients:
                return queued_at, time.time()
            await asyncio.sleep(0.1)


async def otp_latency_during_campaign_ms(env: Environment, simulator: Simulator, campaign: int, otps: int,
                                         otp_rate: float) -> tuple[list[float], list[float]]:
    """What ``otp_latency_ms`` measures, but the bulk load is a campaign of the same tenant run through the
    campaigns service: its recipients streamed in, expanded (rendered, credits held on the same tenant's balance,
    queued) and drained while the OTPs go in, and the ledger settling the same tenant's holds. The OTPs start once
    the campaign is started; returns when every campaign email was sent and the ledger settled its credit."""
    await set_providers(env, otp_providers())
    await simulator.reset()
    started_event = asyncio.Event()
    started = time.time()
    async with asyncio.TaskGroup() as group:
        running = group.create_task(run_campaign(env, campaign, started_event))
        await started_event.wait()
        sent_at, accept_ms = await probe_otps(env, otps, otp_rate)
    queued_at, drained_at = running.result()
    arrivals = await simulator.arrivals(set(sent_at), timeout_s=120)
    await wait_settled(env, timeout_s=max(60, campaign / 100))
    latencies = {mid: (arrivals[mid] - sent_at[mid]) * 1000 for mid in sent_at}
    overlapping = sum(1 for at in sent_at.values() if at < drained_at)
    # Which part of the campaign the probes met decides what the figure means, and a busy machine moves it.
    print(f"  campaign of {campaign:,}: queued after {queued_at - started:.1f} s, sent after "
          f"{drained_at - started:.1f} s, settled by {time.time() - started:.1f} s; {overlapping} of {len(sent_at)} "
          f"OTPs were sent before its last email was", file=sys.stderr, flush=True)
    phases: tuple[tuple[str, Callable[[float], bool]], ...] = (
        ("while it was expanded", lambda at: at < queued_at), ("while it drained", lambda at: at >= queued_at))
    for phase, sent_in_phase in phases:
        phase_ms = [latencies[mid] for mid, at in sent_at.items() if sent_in_phase(at)]
        if phase_ms:
            print(f"    OTPs sent {phase}: {len(phase_ms)}, p50 {percentile(phase_ms, 0.5):,.1f} ms, "
                  f"max {max(phase_ms):,.1f} ms", file=sys.stderr, flush=True)
    return list(latencies.values()), list(accept_ms.values())


async def wait_settled(env: Environment, timeout_s: float) -> None:
    """Wait until the tenant holds no credit (the ledger settled every outcome), so the next measurement does not
    share the machine with a settlement backlog."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(env.endpoint) as channel:
        stub = credits_pb2_grpc.CreditServiceStub(channel)
        while True:
            balance = await stub.GetBalance(credits_pb2.GetBalanceRequest(tenant=f"tenants/{TENANT}"),
                                            metadata=env.auth(), timeout=10)
            if balance.held == 0:
                return
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{balance.held} credit units still held {timeout_s:.0f} s after the campaign")
            await asyncio.sleep(0.5)


FALLBACK_HISTOGRAM = "esp_sender_fallback_decision_seconds_bucket"


async def decision_buckets(env: Environment) -> dict[float, float]:
    """The OTP worker's fallback-decision histogram (cumulative counts by upper bound, seconds)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{env.sender_metrics_port + 1}/metrics")).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(FALLBACK_HISTOGRAM):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The 99th percentile of what was observed between two scrapes: the upper bound of its bucket."""
    delta = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = delta[-1][1]
    if total <= 0:
        raise RuntimeError("the sender observed no fallback decision")
    return next(bound for bound, count in delta if count >= 0.99 * total) * 1000


async def fallback_decision_ms(env: Environment, simulator: Simulator, otps: int) -> list[float]:
    """OTPs to a provider failing 30 % of its calls: failed answer → next provider's request arriving at the
    simulator (both simulator clocks), in ms. Includes the HTTP hop and the simulator's own answer time."""
    await set_providers(env, {
        "otp-flaky": {"personality": "otp-flaky", "price_per_email_micros": 10, "classes": ["otp"]},
        "otp-steady": {"personality": "otp-steady", "price_per_email_micros": 100, "classes": ["otp"],
                       "weight": 0.5}})
    await simulator.reset()
    await simulator.knobs("otp-flaky", error_rate=0.3)
    async with grpc.aio.insecure_channel(env.endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        ids = []
        for index in range(otps):  # one at a time: the decision is measured, not a queue
            reply = await stub.SendEmail(send_request("otp", index), metadata=env.auth(), timeout=10)
            ids.append(reply.message.id)
            await asyncio.sleep(0.02)
    await simulator.arrivals(set(ids), timeout_s=60)
    failed_at: dict[str, float] = {}
    gaps = []
    for record in await simulator.read():
        for message in record["messages"]:
            mid = message["esp_message_id"]
            if record["result"] == "error":
                failed_at[mid] = record["received_at"]
            elif record["delivered"] and mid in failed_at:
                gaps.append((record["arrived_at"] - failed_at.pop(mid)) * 1000)
    if not gaps:
        raise RuntimeError("no OTP fell over: the fallback was not exercised")
    return gaps


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``share`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(share * len(ordered))) - 1)]


async def measure_all(env: Environment, args: argparse.Namespace) -> dict[str, list[float]]:
    simulator = Simulator(env.simulator_urls)
    samples: dict[str, list[float]] = {}

    def keep(metric: str, value: float) -> None:
        samples.setdefault(metric, []).append(value)
        print(f"  {metric}: {value:,.1f}", file=sys.stderr, flush=True)

    try:
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            cpu_before = cpu_seconds(env)
            keep("e2e.sends_per_s", await sends_per_s(env, simulator, args.emails, args.clients, args.batch))
            await asyncio.sleep(3)  # the events of the last emails (ledger commit, reports) belong to this run
            per_email = cpu_ms_per_email(cpu_before, cpu_seconds(env), args.emails)
            for name, value in per_email.items():
                keep(f"e2e.cpu_ms_per_email.{name}", value)
            keep("e2e.cpu_us_per_email", 1000 * sum(v for k, v in per_email.items()
                                                      if k not in ("simulator", "bench-client")))
            cpu_before = cpu_seconds(env)
            keep("sender.sends_per_s", await sender_sends_per_s(env, simulator, args.emails))
            keep("sender.cpu_ms_per_email", cpu_ms_per_email(cpu_before, cpu_seconds(env), args.emails)["sender"])
            otp = await otp_latency_ms(env, simulator, args.backlog, args.otps, args.otp_rate,
                                       wakeup_probe=args.wakeup_probe)
            keep("e2e.otp_p99_ms", percentile(otp.latencies_ms, 0.99))
            keep("e2e.otp_p50_ms", percentile(otp.latencies_ms, 0.50))
            keep("e2e.otp_accept_p99_ms", percentile(otp.accept_ms, 0.99))
            keep("e2e.otp_accept_p50_ms", percentile(otp.accept_ms, 0.50))
            keep("e2e.otp_after_reply_p99_ms", percentile(otp.after_reply_ms, 0.99))
            for metric, value in otp.context.items():
                keep(metric, value)
            latencies, accepts = await otp_latency_during_campaign_ms(env, simulator, args.campaign, args.otps,
                                                                      args.otp_rate)
            keep("e2e.otp_campaign_p99_ms", percentile(latencies, 0.99))
            keep("e2e.otp_campaign_p50_ms", percentile(latencies, 0.50))
            keep("e2e.otp_campaign_accept_p99_ms", percentile(accepts, 0.99))
            before = await decision_buckets(env)
            gaps = await fallback_decision_ms(env, simulator, 200)
            keep("sender.fallback_decision_p99_ms", histogram_p99_ms(before, await decision_buckets(env)))
            keep("sender.fallback_gap_at_provider_p99_ms", percentile(gaps, 0.99))
    finally:
        await simulator.aclose()
    return samples


UNITS = {"e2e.cpu_us_per_email": "us", "e2e.sends_per_s": "1/s", "sender.sends_per_s": "1/s",
         "e2e.otp_phase_bulk_drain_per_s": "1/s", "e2e.otp_phase_wakeup_stalls_per_1000": "1"}
"""Units other than ms."""
TARGETS = {"e2e.sends_per_s": 1750, "e2e.otp_p99_ms": 50, "e2e.otp_campaign_p99_ms": 50,
           "sender.fallback_decision_p99_ms": 10}
HEADLINES: dict[str, floor.FloorName] = {
    "e2e.sends_per_s": "pg",
    "sender.sends_per_s": "grpc",
    "e2e.otp_p99_ms": "grpc",
    "e2e.otp_campaign_p99_ms": "grpc",
    "sender.fallback_decision_p99_ms": "grpc",
}
"""The figures printed against a floor too, and which (:mod:`bench.floor`)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Start the mesh, measure the floors, then ``--runs`` times the mesh, print the medians as JSON lines, stop
    everything."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--emails", type=int, default=10_000, help="emails per throughput run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent BatchSendEmails callers")
    parser.add_argument("--batch", type=int, default=250, help="emails per BatchSendEmails call")
    parser.add_argument("--backlog", type=int, default=20_000,
                        help="bulk emails queued while OTPs are timed (topped up by half of it as it drains)")
    parser.add_argument("--otps", type=int, default=300, help="OTPs timed per measurement")
    parser.add_argument("--otp-rate", type=float, default=50.0,
                        help="OTPs per second while the backlog drains (a latency probe, not a load)")
    parser.add_argument("--wakeup-probe", action="store_true",
                        help="time a nice-0 process's wake-ups while the OTPs are timed (it costs the mesh CPU)")
    parser.add_argument("--campaign", type=int, default=10_000,
                        help="recipients of the same tenant's campaign run while OTPs are timed")
    parser.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                        help="run NATS as a cluster of N (3 or more) servers with the streams at 3 replicas")
    parser.add_argument("--nats-sync", choices=("always", "default"), default="always",
                        help="the cluster's sync_interval: always (production) or NATS's default")
    args = parser.parse_args(argv)
    if args.nats_cluster and args.nats_cluster < 3:
        parser.error("--nats-cluster needs at least 3 servers (streams at three replicas)")
    if args.campaign < 1:
        parser.error("--campaign must be at least 1: the OTPs start once its first batch is accepted")
    with environment(args.nats_cluster, sync_always=args.nats_sync == "always") as env:
        waited = asyncio.run(until_idle(lambda: sum(mesh_cpu_seconds(env).values()), timeout_s=30, busy_share=0.1))
        print(f"mesh idle after {waited:.1f} s", file=sys.stderr, flush=True)
        yardstick = floor.measure(env.config.postgres_dsn)
        samples = asyncio.run(measure_all(env, args))
    results = floor.median_figures(samples, UNITS, TARGETS,
                                   digits={metric: 3 for metric in samples if "cpu_ms" in metric})
    floor.print_figures(results, yardstick, HEADLINES)


if __name__ == "__main__":
    main()
