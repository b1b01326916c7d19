"""Webhook deliveries on this machine: batched throughput, and a healthy endpoint's latency while others time out.

Starts a fresh database (the webhooks schema only), its own JetStream namespace on the local NATS, the webhooks
service as a process (``ESP_WEBHOOK_TIMEOUT_S`` = ``--timeout-s``, 5 s; every other setting its default) and the
receivers as one process of their own (``--serve-receivers``: a minimal asyncio HTTP/1.1 server on uvloop that
answers 200 at once and counts the distinct events in each body, plus a "dead" port that accepts connections
and never answers). Reports is not started: the benchmark publishes ``esp.internal.v1.RecordedEvents`` itself
straight onto ``Topology.notify_subject(tenant)`` of the EVENTS stream, as reports' outbox does. Endpoints are
created through ``esp.v1.WebhookService`` on the service's own port with the edge's trusted metadata.
Then, ``--runs`` times, it prints the medians as JSON lines:

- ``webhooks.events_per_s``: ``--events`` (100,000) events of one tenant, ``--per-message`` (100) to a
  ``RecordedEvents``, published as fast as JetStream takes them, to ``--endpoints`` (4) endpoints with
  ``max_batch_size`` 100: events per second from the first publish until every endpoint's receiver has every
  event (each event reaches every endpoint: ``webhooks.event_deliveries_per_s`` counts each event once per endpoint).
  ``webhooks.cpu_us_per_event.<process>``: CPU µs per event of each process meanwhile (the service, the
  receivers, this client as publisher, and the shared Postgres and NATS servers by process name).
- ``webhooks.healthy_baseline_p99_ms``: a tenant's one endpoint (``max_batch_size`` 1), one event per
  ``RecordedEvents`` at ``--probe-rate`` (200/s) for ``--probe-seconds`` (20 s): publish → the receiver's
  arrival, p99 (nearest rank; ``…_p50_ms`` alongside), with no other endpoint busy.
- ``webhooks.healthy_p99_ms``: the same probes while ``--dead`` (100) endpoints of other tenants (50 to a tenant,
  the service's limit) time out: each gets a backlog, published just before the probes, long enough to keep its
  lane's four attempts hanging on the dead port through the probes (``webhooks.dead_connections_min``: the
  fewest connections held open on it while the probes ran). ``webhooks.healthy_p99_ratio`` is the run's
  ``healthy_p99_ms`` over its ``healthy_baseline_p99_ms`` (target ≤ 2). The dead endpoints are created per run,
  then disabled, drained and deleted, so no run inherits another's backlog.

Before the first run, with the service idle, it measures the floors (:mod:`bench.floor`, the Postgres one in the
benchmark's database) and prints ``webhooks.events_per_s`` against the Postgres floor (Postgres is the largest CPU
share per event: 371 µs against the service's 234 in BENCHMARKS.md) and the latencies against the gRPC floor.

Run: ``make bench BENCH=webhooks``; options in ``BENCH_ARGS`` (``--runs 3 --events 100000``). Servers: Postgres
``ESP_BENCH_POSTGRES_DSN``, NATS ``ESP_BENCH_NATS_URL`` (defaults: the local ones). Logs: ``.dev/bench-webhooks/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
from esp.internal.v1 import queue_pb2
from esp.v1 import events_pb2, webhooks_pb2, webhooks_pb2_grpc
from google.protobuf import field_mask_pb2

from bench import floor
from bench.processes import cpu_seconds, until_idle
from dev import mesh as m
from dev import pgtools
from libs.common.auth import Principal
from libs.common.db import migrate_services
from libs.common.jetstream import AckedPublisher, Topology
from libs.common.secret_box import generate_key_setting

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("ESP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
LOG_DIR = m.ROOT / ".dev" / "bench-webhooks"
BULK_TENANT, PROBE_TENANT = "wh-bulk", "wh-probe"
ENDPOINTS_PER_TENANT = 50
"""The service's limit (``services.webhooks.endpoints.MAX_ENDPOINTS_PER_TENANT``): dead endpoints span tenants."""
LANE = 4
"""``ESP_WEBHOOK_ENDPOINT_CONCURRENCY``'s default: attempts in flight per endpoint."""
SHARED_SERVERS = ("postgres", "nats-server")


# -- the receivers (their own process) ------------------------------------------------------------------------------
class _Tally:
    """What the receivers saw: distinct event names per path, when each probe event first arrived."""

    def __init__(self) -> None:
        self.events: dict[str, set[str]] = defaultdict(set)
        self.last: dict[str, float] = {}
        self.arrivals: dict[str, dict[str, float]] = defaultdict(dict)
        self.requests = 0
        self.dead_open = 0

    def record(self, path: str, body: bytes) -> None:
        now = time.time()
        document = json.loads(body)
        documents = document["data"] if document.get("type") == "batch" else [document]
        seen = self.events[path]
        arrivals = self.arrivals[path] if path.startswith("/probe") else None
        for event in documents:
            name = event["data"]["name"]
            if name not in seen:
                seen.add(name)
                if arrivals is not None:
                    arrivals[name] = now
        self.last[path] = now
        self.requests += 1

    def answer(self, method: str, target: str) -> bytes:
        if method == "POST" and target == "/_reset":
            self.events.clear()
            self.last.clear()
            self.arrivals.clear()
            self.requests = 0  # dead_open stays: connections outlive a reset
            return b"{}"
        if target == "/_stats":
            return json.dumps({"events": {p: len(s) for p, s in self.events.items()}, "last": self.last,
                               "requests": self.requests, "dead_open": self.dead_open}).encode()
        if target.startswith("/_arrivals/"):
            return json.dumps(self.arrivals.get("/" + target.removeprefix("/_arrivals/"), {})).encode()
        return b"{}"


_OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


class _Http(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: all the webhooks transport sends."""

    def __init__(self, tally: _Tally) -> None:
        self.tally = tally
        self.buffer = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "transfer-encoding":
                    raise RuntimeError("chunked bodies are not expected")
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            if method == "POST" and not target.startswith("/_"):
                self.tally.record(target, body)
                self.transport.write(_OK)
            else:
                payload = self.tally.answer(method, target)
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                     + str(len(payload)).encode() + b"\r\n\r\n" + payload)


class _Dead(asyncio.Protocol):
    """Accepts the connection, reads what comes, never answers."""

    def __init__(self, tally: _Tally) -> None:
        self.tally = tally

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tally.dead_open += 1

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.dead_open -= 1


async def _serve_receivers(port: int, dead_port: int) -> None:
    tally = _Tally()
    loop = asyncio.get_running_loop()
    healthy = await loop.create_server(lambda: _Http(tally), "127.0.0.1", port, backlog=1024)
    dead = await loop.create_server(lambda: _Dead(tally), "127.0.0.1", dead_port, backlog=1024)
    async with healthy, dead:
        await asyncio.gather(healthy.serve_forever(), dead.serve_forever())


def serve_receivers(port: int, dead_port: int) -> None:
    """The receivers' process (``python -m bench.webhooks_bench --serve-receivers PORT DEAD_PORT``)."""
    import uvloop

    uvloop.run(_serve_receivers(port, dead_port))


# -- the environment --------------------------------------------------------------------------------------------------
@dataclass
class Environment:
    """The service, the receivers, and how to reach them."""

    dsn: str
    topology: Topology
    grpc_port: int
    receiver_url: str
    dead_url: str
    service: m.Process
    receivers: m.Process
    bulk_paths: list[str] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the service, the receivers, this process and the shared servers (by name)."""
        totals = {"webhooks": cpu_seconds(self.service.popen.pid), "receivers": cpu_seconds(self.receivers.popen.pid),
                  "bench-client": cpu_seconds(os.getpid())}
        for server in SHARED_SERVERS:
            totals[server] = 0.0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    raw = (entry / "stat").read_text()
                except OSError:
                    continue
                name = raw[raw.index("(") + 1:raw.rindex(")")]
                if name in SHARED_SERVERS:
                    with contextlib.suppress(OSError, ValueError):
                        totals[name] += cpu_seconds(int(entry.name))
        return totals

    def own_cpu(self) -> float:
        return cpu_seconds(self.service.popen.pid) + cpu_seconds(self.receivers.popen.pid)


@contextmanager
def environment(timeout_s: float) -> Iterator[Environment]:
    """Database, receivers and service up, and down again afterwards whatever happens."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    database = pgtools.unique_database_name("esp_bench_webhooks")
    dsn = pgtools.create_database(ADMIN_DSN, database)
    topology = Topology(f"benchwh{secrets.token_hex(3)}")
    started: list[m.Process] = []
    try:
        asyncio.run(migrate_services(dsn, ["webhooks"]))
        port, dead_port, grpc_port = m.free_port(), m.free_port(), m.free_port()
        receivers = m.spawn("receivers", [sys.executable, "-m", "bench.webhooks_bench", "--serve-receivers",
                                          str(port), str(dead_port)], LOG_DIR,
                            {"PYTHONPATH": f"{m.ROOT}:{m.ROOT / 'gen'}"})
        started.append(receivers)
        m.wait_port(port, 30, receivers.popen, "receivers")
        m.wait_port(dead_port, 30, receivers.popen, "receivers")
        env = {"ESP_POSTGRES_DSN": dsn, "ESP_NATS_URL": NATS_URL, "ESP_NAMESPACE": topology.namespace,
               "ESP_SECRETS_KEYS": generate_key_setting("bench"), "ESP_WEBHOOK_ALLOW_INTERNAL": "true",
               "ESP_WEBHOOK_TIMEOUT_S": str(timeout_s), "ESP_REPORTS_ADDR": f"127.0.0.1:{m.free_port()}",
               "ESP_GRPC_PORT": str(grpc_port), "ESP_LOG_LEVEL": "WARNING", "ESP_SHUTDOWN_GRACE_S": "3",
               "PYTHONPATH": f"{m.ROOT}:{m.ROOT / 'gen'}"}
        service = m.spawn("webhooks", [sys.executable, "-m", "services.webhooks"], LOG_DIR, env)
        started.append(service)
        try:
            m.wait_grpc_serving(grpc_port, 60, service.popen, "webhooks")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- webhooks log ---\n{service.log_tail()}") from exc
        yield Environment(dsn, topology, grpc_port, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dead_port}",
                          service, receivers)
    finally:
        for process in reversed(started):
            process.stop()
        asyncio.run(_forget(topology))
        pgtools.drop_database(ADMIN_DSN, database)


async def _forget(topology: Topology) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        for stream in topology.streams:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


# -- talking to the service, the receivers and JetStream ------------------------------------------------------------
class Endpoints:
    """WebhookService on the service's own port, as the edge calls it (trusted tenant metadata)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = webhooks_pb2_grpc.WebhookServiceStub(channel)

    @staticmethod
    def _as(tenant: str) -> tuple[tuple[str, str], ...]:
        return Principal(tenant_id=tenant, scopes=frozenset({"admin", "read"})).as_metadata()

    async def create(self, tenant: str, url: str, max_batch_size: int) -> str:
        created = await self.stub.CreateWebhookEndpoint(webhooks_pb2.CreateWebhookEndpointRequest(
            webhook_endpoint=webhooks_pb2.WebhookEndpoint(url=url, max_batch_size=max_batch_size)),
            metadata=self._as(tenant), timeout=10)
        return str(created.name)

    async def disable(self, tenant: str, name: str) -> None:
        await self.stub.UpdateWebhookEndpoint(webhooks_pb2.UpdateWebhookEndpointRequest(
            webhook_endpoint=webhooks_pb2.WebhookEndpoint(name=name, enabled=False),
            update_mask=field_mask_pb2.FieldMask(paths=["enabled"])), metadata=self._as(tenant), timeout=10)

    async def delete(self, tenant: str, name: str) -> None:
        await self.stub.DeleteWebhookEndpoint(webhooks_pb2.DeleteWebhookEndpointRequest(name=name),
                                              metadata=self._as(tenant), timeout=10)


class Receivers:
    """The receivers' process, read over its control paths."""

    def __init__(self, url: str) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=30)

    async def reset(self) -> None:
        (await self.client.post("/_reset")).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.client.get("/_stats")
        response.raise_for_status()
        return dict(response.json())

    async def arrivals(self, path: str) -> dict[str, float]:
        response = await self.client.get(f"/_arrivals{path}")
        response.raise_for_status()
        return dict(response.json())

    async def aclose(self) -> None:
        await self.client.aclose()


def _event(event_id: str, index: int) -> events_pb2.Event:
    """A delivery report as reports records it (the fields a real one carries)."""
    event = events_pb2.Event(name=f"events/{event_id}", type="message.delivered", message=f"messages/m-{event_id}",
                             sequence=3, recipient=f"customer{index}@example.org", provider="bench-provider",
                             tags=["receipts"], metadata={"order": str(index)}, message_class=2)
    event.event_time.GetCurrentTime()
    return event


def _recorded(tenant: str, events: Sequence[events_pb2.Event]) -> bytes:
    return bytes(queue_pb2.RecordedEvents(tenant_id=tenant, events=events).SerializeToString())


class Publisher:
    """Publishes RecordedEvents onto a tenant's notify subject, as reports' outbox does."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.nc: Any = None
        self.acks: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> Publisher:
        self.nc = await nats.connect(NATS_URL)
        self.publisher = AckedPublisher(self.nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def publish(self, tenant: str, payload: bytes, msg_id: str) -> None:
        self.acks.append(await self.publisher.publish(self.topology.notify_subject(tenant), payload,
                                                      f"recorded-{msg_id}"))

    async def flush(self) -> None:
        await self.nc.flush()
        await asyncio.wait_for(asyncio.gather(*self.acks), timeout=60)
        self.acks.clear()


# -- the measurements -----------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``share`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(share * len(ordered))) - 1)]


async def events_per_s(env: Environment, receivers: Receivers, args: argparse.Namespace,
                       run: int) -> tuple[float, dict[str, float]]:
    """(events per second, first publish → every endpoint has every event; CPU µs per event by process)."""
    messages = [_recorded(BULK_TENANT, [_event(f"b{run}-{i}", i)
                                        for i in range(start, min(args.events, start + args.per_message))])
                for start in range(0, args.events, args.per_message)]
    await receivers.reset()
    before = env.cpu()
    async with Publisher(env.topology) as publisher:
        started = time.time()
        for index, payload in enumerate(messages):
            await publisher.publish(BULK_TENANT, payload, f"b{run}-{index}")
        await publisher.flush()
        published = time.time()
    deadline = time.monotonic() + args.events / 200 + 60
    while True:
        stats = await receivers.stats()
        if all(stats["events"].get(p, 0) >= args.events for p in env.bulk_paths):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"receivers have {stats['events']} of {args.events} events each")
        await asyncio.sleep(0.1)
    elapsed = max(stats["last"][p] for p in env.bulk_paths) - started
    after = env.cpu()
    print(f"    published in {published - started:.2f} s, {stats['requests']:,} requests", file=sys.stderr)
    return args.events / elapsed, {k: (after[k] - before[k]) / args.events * 1e6 for k in after}


async def _dead_endpoints(api: Endpoints, env: Environment, count: int, run: int) -> dict[str, list[str]]:
    """``count`` endpoints pointing at the dead port, 50 to a tenant: tenant → endpoint names."""
    made: dict[str, list[str]] = defaultdict(list)
    for i in range(count):
        tenant = f"wh-dead{run}-{i // ENDPOINTS_PER_TENANT}"
        made[tenant].append(await api.create(tenant, f"{env.dead_url}/dead/{i}", 1))
    return made


async def _retire(api: Endpoints, receivers: Receivers, dead: dict[str, list[str]], drain_s: float) -> None:
    """Disable the dead endpoints, wait for the attempts in flight to time out, delete them."""
    for tenant, names in dead.items():
        for name in names:
            await api.disable(tenant, name)
    deadline = time.monotonic() + drain_s
    while (await receivers.stats())["dead_open"] and time.monotonic() < deadline:  # noqa: ASYNC110 — another process
        await asyncio.sleep(0.5)
    for tenant, names in dead.items():
        for name in names:
            await api.delete(tenant, name)


@dataclass
class Probes:
    latencies_ms: list[float]
    dead_connections_min: int


async def probe_latency(env: Environment, receivers: Receivers, args: argparse.Namespace, tag: str,
                        dead: dict[str, list[str]]) -> Probes:
    """Publish → arrival of one event a message at the probe endpoint, at a steady rate."""
    await receivers.reset()
    count = int(args.probe_rate * args.probe_seconds)
    fewest = 0
    async with Publisher(env.topology) as publisher:
        if dead:
            rounds = math.ceil((args.probe_seconds + 10) / args.timeout_s) + 1
            for tenant in dead:
                await publisher.publish(tenant, _recorded(tenant, [_event(f"{tag}-{tenant}-{i}", i)
                                                                   for i in range(LANE * rounds)]), f"{tag}-{tenant}")
            await publisher.flush()
            wanted = LANE * sum(len(names) for names in dead.values())
            deadline = time.monotonic() + 30
            while (await receivers.stats())["dead_open"] < wanted:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the dead endpoints hold {(await receivers.stats())['dead_open']} "
                                       f"connections, not {wanted}")
                await asyncio.sleep(0.2)
            fewest = wanted
        published: dict[str, float] = {}
        started = time.monotonic()
        for i in range(count):
            pause = started + i / args.probe_rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            event_id = f"{tag}-p{i}"
            published[f"events/{event_id}"] = time.time()
            await publisher.publish(PROBE_TENANT, _recorded(PROBE_TENANT, [_event(event_id, i)]), event_id)
            if dead and i % int(args.probe_rate) == 0:
                fewest = min(fewest, (await receivers.stats())["dead_open"])
        await publisher.flush()
    deadline = time.monotonic() + 60
    while len(arrived := await receivers.arrivals("/probe")) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(arrived)} of {count} probe events arrived")
        await asyncio.sleep(0.2)
    if dead:
        fewest = min(fewest, (await receivers.stats())["dead_open"])
    first = min(published.values())
    slowest = sorted(((arrived[name] - at) * 1000, at - first) for name, at in published.items())[-5:]
    print("    slowest probes (ms at s into the probes): "
          + ", ".join(f"{ms:,.0f} at {s:.1f}" for ms, s in reversed(slowest)), file=sys.stderr, flush=True)
    return Probes([(arrived[name] - at) * 1000 for name, at in published.items()], fewest)


async def measure_all(env: Environment, args: argparse.Namespace) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}

    def keep(metric: str, value: float) -> None:
        samples.setdefault(metric, []).append(value)
        print(f"  {metric}: {value:,.1f}", file=sys.stderr, flush=True)

    async def settle() -> None:
        await until_idle(env.own_cpu, timeout_s=60, busy_share=0.05)

    receivers = Receivers(env.receiver_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{env.grpc_port}") as channel:
            api = Endpoints(channel)
            for i in range(args.endpoints):
                await api.create(BULK_TENANT, f"{env.receiver_url}/bulk/{i}", 100)
                env.bulk_paths.append(f"/bulk/{i}")
            await api.create(PROBE_TENANT, f"{env.receiver_url}/probe", 1)
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                rate, cpu = await events_per_s(env, receivers, args, run)
                keep("webhooks.events_per_s", rate)
                keep("webhooks.event_deliveries_per_s", rate * args.endpoints)
                for name, value in cpu.items():
                    keep(f"webhooks.cpu_us_per_event.{name}", value)
                await settle()
                baseline = await probe_latency(env, receivers, args, f"base{run}", {})
                keep("webhooks.healthy_baseline_p99_ms", percentile(baseline.latencies_ms, 0.99))
                keep("webhooks.healthy_baseline_p50_ms", percentile(baseline.latencies_ms, 0.50))
                await settle()
                dead = await _dead_endpoints(api, env, args.dead, run)
                loaded = await probe_latency(env, receivers, args, f"dead{run}", dead)
                keep("webhooks.healthy_p99_ms", percentile(loaded.latencies_ms, 0.99))
                keep("webhooks.healthy_p50_ms", percentile(loaded.latencies_ms, 0.50))
                keep("webhooks.healthy_p99_ratio", samples["webhooks.healthy_p99_ms"][-1]
                     / samples["webhooks.healthy_baseline_p99_ms"][-1])
                keep("webhooks.dead_connections_min", loaded.dead_connections_min)
                await _retire(api, receivers, dead, drain_s=args.timeout_s * 12)
                await settle()
    finally:
        await receivers.aclose()
    return samples


UNITS = {"webhooks.events_per_s": "1/s", "webhooks.event_deliveries_per_s": "1/s", "webhooks.healthy_p99_ratio": "1",
         "webhooks.dead_connections_min": "1", **{f"webhooks.cpu_us_per_event.{name}": "us" for name in (
             "webhooks", "receivers", "bench-client", *SHARED_SERVERS)}}
TARGETS = {"webhooks.events_per_s": 5000, "webhooks.healthy_p99_ratio": 2}
HEADLINES: dict[str, floor.FloorName] = {
    "webhooks.events_per_s": "pg", "webhooks.healthy_p99_ms": "grpc", "webhooks.healthy_baseline_p99_ms": "grpc",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Start the service and receivers, measure the floors, then ``--runs`` runs, print the medians as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000, help="events of the throughput run")
    parser.add_argument("--per-message", type=int, default=100, help="events per RecordedEvents (throughput)")
    parser.add_argument("--endpoints", type=int, default=4, help="endpoints (max_batch_size 100) of the throughput")
    parser.add_argument("--probe-rate", type=float, default=200.0, help="probe events per second")
    parser.add_argument("--probe-seconds", type=float, default=20.0, help="how long the probes run")
    parser.add_argument("--dead", type=int, default=100, help="endpoints that time out meanwhile")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="ESP_WEBHOOK_TIMEOUT_S of the service")
    parser.add_argument("--serve-receivers", type=int, nargs=2, metavar=("PORT", "DEAD_PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_receivers:
        serve_receivers(*args.serve_receivers)
        return
    with environment(args.timeout_s) as env:
        waited = asyncio.run(until_idle(env.own_cpu, timeout_s=30, busy_share=0.05))
        print(f"service idle after {waited:.1f} s", file=sys.stderr, flush=True)
        yardstick = floor.measure(env.dsn)
        samples = asyncio.run(measure_all(env, args))
    digits = {metric: 3 for metric in samples if metric.endswith("_ratio")}
    floor.print_figures(floor.median_figures(samples, UNITS, TARGETS, digits=digits), yardstick, HEADLINES)


if __name__ == "__main__":
    main()
