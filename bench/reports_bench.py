"""Reports analytics on this machine: events recorded per second by the real consumer, and stats query latency.

Prints the medians of ``--runs`` runs as JSON lines:

- ``reports.events_per_s``: the reports service (``python -m services.reports``, every setting its default) against
  a fresh database and a JetStream namespace of its own, per run. Before it starts, ``--events`` (200,000) events
  of a realistic mix are published onto the EVENTS stream as ingest, the sender and the webhook receiver publish
  them (``esp.internal.v1.EventEnvelope``): per message ACCEPTED (with the message: recipients, tags, campaign,
  credits), ATTEMPTED for about 6 % (a throttled or failed call on another provider), SENT (latency, price),
  then DELIVERED, a bounce (hard or soft) or a deferral; some OPENED, CLICKED, COMPLAINED and UNSUBSCRIBED; 50
  tenants (one holding most of the traffic), 4 providers, 3 classes, recipients at gmail, yahoo, outlook, apple and
  other domains, 0 to 3 tags a message and a few campaigns; events in time order, 1 % of the ACCEPTED events a
  second late (their SENT first: the rollups' before-accept path). The service then drains the stream: events
  per second from its first commit (the first timeline row seen, polled every 20 ms) until JetStream has the last
  event acked, every event counted (timeline rows, message rows and rollup sums are checked afterwards).
  ``reports.cpu_us_per_event.<process>``: CPU µs per event meanwhile of the service, Postgres, NATS and Redis.
- ``reports.stats_p50_ms`` / ``reports.stats_p99_ms``: ``StatsReader.get`` (the service's own code, over a pool like
  the service's) of a 30-day query, one tenant's figures grouped by provider and day with every metric (latency
  percentiles included), over ``--stats-events`` (10 M) events of 30 days: 50 tenants, one with ``--big-share``
  (80 %) of them. Loading them through the consumer would take an hour, so their rollup rows are made by the
  production code instead: the events as ``MessageEventRecord`` with their ``MessageFacts``, an hour of events at a
  time through ``services.reports.rollups.StatsRollup`` and its upsert statements (two worker processes, a day
  each at a time), exactly the rows the consumer would write; minute rows only for the days minute retention keeps
  (``reports.ensure_day_partition`` makes their partitions). Then ``VACUUM ANALYZE`` (this box's autovacuum is
  off). ``--queries`` (200) queries per run: half end at now minus up to an hour (minute and hour tiles at both
  edges), a quarter at a whole hour, a quarter at midnight (day rows only); start = end - 30 days.
  ``reports.stats_admin_p50_ms`` / ``reports.stats_admin_p99_ms``: the same as a platform admin (every tenant),
  ``--admin-queries`` (20) of them: each takes seconds.

Before the first run it measures the floors (:mod:`bench.floor`, the Postgres one in the benchmark's database) and
prints ``reports.events_per_s`` against the Postgres floor (Postgres is the largest CPU share per event) and the
latencies against the gRPC floor.

Run: ``make bench BENCH=reports``; options in ``BENCH_ARGS`` (``--runs 3 --events 200000 --stats-events 10000000``,
``--skip-throughput``, ``--skip-stats``). Servers: Postgres ``ESP_BENCH_POSTGRES_DSN``, NATS ``ESP_BENCH_NATS_URL``,
Redis ``ESP_BENCH_REDIS_URL`` (defaults: the local ones). Logs: ``.dev/bench-reports/``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import random
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from multiprocessing import get_context
from typing import Any

import nats
import psycopg
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2

from bench import floor
from bench.processes import SHARED_SERVERS, cpu_snapshot
from dev import mesh as m
from dev import pgtools
from libs.common.db import SESSION_OPTIONS, create_pool, migrate_services
from libs.common.jetstream import AckedPublisher, Topology, ensure_streams
from libs.common.mailbox_providers import MAILBOX_PROVIDERS, mailbox_provider_of_domain
from libs.common.message_classes import proto_of
from services.reports import rollups
from services.reports.envelopes import event_type_name
from services.reports.models import EventType, MessageEventRecord
from services.reports.rollups import MessageFacts, Resolution, StatsRollup
from services.reports.stats import StatsQuery, StatsReader

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("ESP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("ESP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
LOG_DIR = m.ROOT / ".dev" / "bench-reports"
MINUTE_RETENTION_DAYS = 3
"""``ReportsSettings.minute_rollup_retention_days``' default: the days whose minute rows are loaded."""

# -- the traffic ------------------------------------------------------------------------------------------------------
PROVIDERS = ("mailgun-eu", "sendgrid-main", "ses-us-east", "postmark-tx")
CLASS_SHARES = {"bulk": 0.65, "transactional": 0.30, "otp": 0.05}
PROVIDER_SHARES = {
    "otp": (("postmark-tx", 0.7), ("ses-us-east", 0.3)),
    "transactional": (("postmark-tx", 0.4), ("ses-us-east", 0.35), ("sendgrid-main", 0.25)),
    "bulk": (("mailgun-eu", 0.45), ("ses-us-east", 0.35), ("sendgrid-main", 0.2)),
}
"""Which providers a class of mail goes through (the router's choice, by cost and latency)."""
KINDS = {"otp": ("otp", "login"), "transactional": ("receipt", "shipping", "password-reset", "invoice", "welcome")}
"""Tags of a message by what it is: one kind, 30 % of them also a region; a campaign's messages share its 1-2 tags."""
CAMPAIGN_TAGS = (("newsletter",), ("promo", "black-friday"), ("weekly", "digest"), ("winback",), ("promo",))
DOMAINS = (("gmail.com", 0.36), ("googlemail.com", 0.02), ("yahoo.com", 0.11), ("aol.com", 0.03),
           ("outlook.com", 0.09), ("hotmail.com", 0.08), ("live.com", 0.02), ("icloud.com", 0.07),
           ("me.com", 0.01), ("*", 0.21))
"""Recipient domains and their shares; ``*``: one of 200 company domains (mailbox provider ``other``)."""
_OTHER_MAILBOXES = MAILBOX_PROVIDERS[-1]


def mailbox_provider(recipient: str) -> str:
    """As the service counts a recipient without MX lookups (its default)."""
    return mailbox_provider_of_domain(recipient.rpartition("@")[2]) or _OTHER_MAILBOXES


@dataclass(frozen=True)
class Tenants:
    """50 tenants, the first with ``big_share`` of the traffic, the rest by 1/rank."""

    names: tuple[str, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def make(cls, count: int, big_share: float, prefix: str = "t") -> Tenants:
        rest = [1 / rank for rank in range(1, count)]
        weights = [big_share, *(w / sum(rest) * (1 - big_share) for w in rest)]
        cumulative, total = [], 0.0
        for weight in weights:
            total += weight
            cumulative.append(total)
        return cls(tuple(f"{prefix}-big" if i == 0 else f"{prefix}-{i:02d}" for i in range(count)), tuple(cumulative))

    @property
    def big(self) -> str:
        return self.names[0]

    def pick(self, rng: random.Random) -> str:
        return self.names[min(len(self.names) - 1, bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1]))]


@dataclass(frozen=True)
class Message:
    """One email as accepted: what its events and its facts need."""

    tenant: str
    id: str
    message_class: str
    provider: str
    recipient: str
    tags: tuple[str, ...]
    campaign_id: str
    credits: int
    accepted_at: float


class Traffic:
    """Random messages and their events (seeded: a run's traffic is reproducible)."""

    def __init__(self, tenants: Tenants, seed: int, *, campaigns_of_big: int = 40, days: int = 30) -> None:
        self.tenants = tenants
        self.rng = random.Random(seed)
        self.campaigns_of_big = campaigns_of_big
        self.days = days
        self.classes = list(CLASS_SHARES)
        self.class_weights = list(CLASS_SHARES.values())
        self.domains = [d for d, _ in DOMAINS]
        self.domain_weights = [w for _, w in DOMAINS]
        self.providers = {c: ([p for p, _ in shares], [w for _, w in shares]) for c, shares in PROVIDER_SHARES.items()}
        self.serial = 0

    def campaign(self, tenant: str, day: int) -> str:
        """A campaign running on ``day`` (0 … days-1): the big tenant runs ``campaigns_of_big`` over the month,
        each for three days (about four at once); the others four, one at a time."""
        if tenant == self.tenants.big:
            first = math.floor(day * self.campaigns_of_big / self.days)
            return f"{tenant}-c{self.rng.randint(max(0, first - 3), first):02d}"
        return f"{tenant}-c{day * 4 // self.days}"

    def message(self, accepted_at: float, day: int) -> Message:
        rng = self.rng
        tenant = self.tenants.pick(rng)
        message_class = rng.choices(self.classes, self.class_weights)[0]
        provider = rng.choices(*self.providers[message_class])[0]
        campaign = ""
        if message_class == "bulk":
            campaign = self.campaign(tenant, day) if rng.random() < 0.9 else ""
            tags = CAMPAIGN_TAGS[sum(map(ord, campaign)) % len(CAMPAIGN_TAGS)] if campaign else ("newsletter",)
        else:
            kind = rng.choice(KINDS[message_class])
            tags = (kind, "eu") if rng.random() < 0.3 else (kind,)
        domain = rng.choices(self.domains, self.domain_weights)[0]
        if domain == "*":
            domain = f"company{rng.randrange(200)}.example"
        self.serial += 1
        return Message(tenant, f"m{self.serial:09d}-{rng.getrandbits(32):08x}", message_class, provider,
                       f"user{rng.randrange(10**7)}@{domain}", tags, campaign, 1 if message_class == "bulk" else 2,
                       accepted_at)

    def events(self, msg: Message) -> list[MessageEventRecord]:
        """The message's events: accept, maybe a failed call on another provider, the send, its outcome, and what
        recipients do."""
        rng = self.rng
        out: list[MessageEventRecord] = []

        def add(event_type: EventType, at: float, **fields: Any) -> None:
            out.append(MessageEventRecord(f"{msg.id}-{len(out)}", msg.tenant, msg.id, event_type,
                                          datetime.fromtimestamp(at, UTC), msg.message_class, **fields))

        t = msg.accepted_at
        add(EventType.ACCEPTED, t)
        t += rng.uniform(0.02, 0.3)
        chance = rng.random()
        if chance < 0.005:
            add(EventType.FAILED, t, provider=msg.provider, latency_ms=int(rng.lognormvariate(5.5, 0.5)),
                outcome="permanent", reason="550 5.7.1 rejected by policy", attempt=1)
            return out
        attempt = 1
        if chance < 0.065:
            other = PROVIDERS[(PROVIDERS.index(msg.provider) + 1) % len(PROVIDERS)]
            latency = int(rng.lognormvariate(6.0, 0.8))
            add(EventType.ATTEMPTED, t, provider=other, latency_ms=latency, attempt=1,
                outcome="throttled" if rng.random() < 0.4 else "retryable", reason="429 too many requests")
            t += latency / 1000 + rng.uniform(0.05, 2.0)
            attempt = 2
        latency = int(rng.lognormvariate(5.4, 0.6))
        t += latency / 1000
        add(EventType.SENT, t, provider=msg.provider, provider_message_id=f"<{msg.id}@{msg.provider}>",
            latency_ms=latency, attempt=attempt, outcome="accepted", provider_cost_micros=rng.choice((80, 100, 400)))
        outcome = rng.random()
        t += rng.lognormvariate(1.0, 1.0)
        if outcome < 0.03:
            add(EventType.BOUNCED, t, provider=msg.provider, recipient=msg.recipient,
                bounce_type="hard" if rng.random() < 0.6 else "soft", reason="550 5.1.1 user unknown")
            return out
        if outcome < 0.05:
            add(EventType.DEFERRED, t, provider=msg.provider, recipient=msg.recipient, reason="421 try later")
            t += rng.uniform(60, 900)
        add(EventType.DELIVERED, t, provider=msg.provider, recipient=msg.recipient)
        if rng.random() < 0.20:
            t += rng.uniform(60, 1800)
            add(EventType.OPENED, t, provider=msg.provider, recipient=msg.recipient)
            if rng.random() < 0.15:
                add(EventType.CLICKED, t + rng.uniform(1, 120), provider=msg.provider, recipient=msg.recipient,
                    url="https://shop.example/offer")
        if rng.random() < 0.001:
            add(EventType.COMPLAINED, t + rng.uniform(60, 3600), provider=msg.provider, recipient=msg.recipient)
        elif rng.random() < 0.002:
            add(EventType.UNSUBSCRIBED, t + rng.uniform(60, 3600), provider=msg.provider, recipient=msg.recipient)
        return out

    def facts(self, msg: Message) -> MessageFacts:
        return MessageFacts(msg.message_class, msg.tags, msg.campaign_id, mailbox_provider(msg.recipient),
                            msg.credits, datetime.fromtimestamp(msg.accepted_at, UTC), True)


# -- the wire format ------------------------------------------------------------------------------------------------
_EVENT_TYPES = {t: messages_pb2.MessageEventType.Value(event_type_name(t)) for t in EventType}
_OUTCOMES = {"accepted": messages_pb2.ATTEMPT_OUTCOME_ACCEPTED, "throttled": messages_pb2.ATTEMPT_OUTCOME_THROTTLED,
             "retryable": messages_pb2.ATTEMPT_OUTCOME_RETRYABLE, "permanent": messages_pb2.ATTEMPT_OUTCOME_PERMANENT,
             "": messages_pb2.ATTEMPT_OUTCOME_UNSPECIFIED}
_FINAL = frozenset({EventType.SENT, EventType.FAILED})


def envelope(msg: Message, record: MessageEventRecord) -> queue_pb2.EventEnvelope:
    """The EventEnvelope its producer publishes (ingest: ACCEPTED with the message; the sender: calls; the webhook
    receiver: delivery reports)."""
    event = messages_pb2.MessageEvent(
        event_id=record.event_id, message=f"messages/{msg.id}", type=_EVENT_TYPES[record.event_type],
        provider=record.provider, provider_message_id=record.provider_message_id, recipient=record.recipient,
        reason=record.reason, attempt=record.attempt, outcome=_OUTCOMES[record.outcome], latency_ms=record.latency_ms,
        bounce_type=record.bounce_type, url=record.url)
    event.event_time.FromDatetime(record.event_time)
    env = queue_pb2.EventEnvelope(tenant_id=msg.tenant, message_id=msg.id, event=event,
                                  message_class=proto_of(msg.message_class), final=record.event_type in _FINAL,
                                  provider_cost_micros=record.provider_cost_micros)
    if record.event_type is EventType.ACCEPTED:
        message = messages_pb2.Message(
            name=f"messages/{msg.id}", id=msg.id, message_class=proto_of(msg.message_class),
            state=messages_pb2.MESSAGE_STATE_ACCEPTED,
            to=[common_pb2.EmailAddress(email=msg.recipient, name="Customer")], subject="Your weekly offers",
            tags=list(msg.tags), metadata={"order": msg.id[-6:], "source": "web"}, request_id=f"req-{msg.id}",
            credits=msg.credits, campaign=f"campaigns/{msg.campaign_id}" if msg.campaign_id else "")
        getattr(message, "from").CopyFrom(common_pb2.EmailAddress(email="news@shop.example", name="Shop"))
        message.create_time.FromDatetime(record.event_time)
        env.message.CopyFrom(message)
        env.hold_id = msg.id
    return env


@dataclass
class Backlog:
    """A run's events in publishing order, with what the store must hold once they are recorded."""

    publications: list[tuple[str, bytes, str]]
    """(subject, payload, Nats-Msg-Id)."""
    messages: int
    counts: dict[EventType, int]


def backlog(topology: Topology, events: int, seed: int) -> Backlog:
    """About ``events`` events of messages accepted at 5,000 a second two hours ago, in time order; 1 % of the
    ACCEPTED events a second late, after their SENT."""
    traffic = Traffic(Tenants.make(50, 0.8, prefix=f"r{seed}"), seed)
    start = time.time() - 7200
    timeline: list[tuple[float, int, Message, MessageEventRecord]] = []
    counts: dict[EventType, int] = {}
    messages = 0
    while len(timeline) < events:
        msg = traffic.message(start + messages / 5000, 0)
        messages += 1
        for record in traffic.events(msg):
            at = record.event_time.timestamp()
            if record.event_type is EventType.ACCEPTED and traffic.rng.random() < 0.01:
                at += 1.0
            timeline.append((at, len(timeline), msg, record))
            counts[record.event_type] = counts.get(record.event_type, 0) + 1
    timeline.sort(key=lambda item: (item[0], item[1]))
    publications = []
    for _, _, msg, record in timeline:
        subject = topology.events_subject(msg.tenant, final=record.event_type in _FINAL)
        publications.append((subject, envelope(msg, record).SerializeToString(), record.event_id))
    return Backlog(publications, messages, counts)


# -- CPU ------------------------------------------------------------------------------------------------------------
def cpu(service_pid: int) -> dict[str, float]:
    """CPU seconds so far of the service (with any children), this process and the shared servers (by name)."""
    snapshot = cpu_snapshot()
    totals = {"reports": snapshot.tree(service_pid), "bench-client": snapshot.processes[os.getpid()][2]}
    for server in SHARED_SERVERS:
        totals[server] = snapshot.named(server)
    return totals


# -- reports.events_per_s ----------------------------------------------------------------------------------------------
async def _prepare_database(dsn: str) -> None:
    await migrate_services(dsn, ["reports"])
    today = datetime.now(UTC).date()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for table, column in (("events", "event_time"), ("rollup_minute", "bucket")):
            for offset in range(-1, 4):  # yesterday (events two hours old, near midnight) .. the days the service
                await conn.execute("SELECT reports.ensure_day_partition(%s, %s, %s)",  # makes ahead
                                   (table, column, today + timedelta(days=offset)))


async def _publish(topology: Topology, work: Backlog) -> int:
    """Publish the backlog; the stream sequence of its last event."""
    nc = await nats.connect(NATS_URL)
    try:
        await ensure_streams(nc.jetstream(), topology)
        publisher = AckedPublisher(nc)
        for first in range(0, len(work.publications), 5000):
            acks = [await publisher.publish(subject, payload, msg_id)
                    for subject, payload, msg_id in work.publications[first:first + 5000]]
            await asyncio.wait_for(asyncio.gather(*acks), timeout=60)
        info = await nc.jetstream().stream_info(topology.events_stream)
        return int(info.state.last_seq)
    finally:
        await nc.close()


def _service_env(dsn: str, topology: Topology, grpc_port: int) -> dict[str, str]:
    return {"ESP_POSTGRES_DSN": dsn, "ESP_NATS_URL": NATS_URL, "ESP_REDIS_URL": REDIS_URL,
            "ESP_NAMESPACE": topology.namespace, "ESP_GRPC_PORT": str(grpc_port),
            "ESP_WEBHOOK_PORT": str(m.free_port()), "ESP_LOG_LEVEL": "WARNING", "ESP_SHUTDOWN_GRACE_S": "3",
            "PYTHONPATH": f"{m.ROOT}:{m.ROOT / 'gen'}"}


@dataclass
class Drain:
    events_per_s: float
    cpu_us: dict[str, float]
    batches_first_to_last_s: float


async def _drain(dsn: str, topology: Topology, service: m.Process, last_seq: int, total: int) -> Drain:
    """Wait for the service's first commit, then until JetStream has every event acked."""
    deadline = time.monotonic() + 120
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute("SELECT EXISTS (SELECT FROM reports.events)")).fetchone()
            if row and row[0]:
                started, before = time.time(), cpu(service.popen.pid)
                break
            if service.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reports recorded nothing\n--- reports log ---\n{service.log_tail()}")
            await asyncio.sleep(0.02)
        row = await (await conn.execute("SELECT count(*) FROM reports.events")).fetchone()
        already = int(row[0]) if row else 0
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        durable = topology.consumer("reports")
        deadline = time.monotonic() + total / 500 + 60
        while True:
            info = await js.consumer_info(topology.events_stream, durable)
            if info.ack_floor.stream_seq >= last_seq:
                ended, after = time.time(), cpu(service.popen.pid)
                break
            if service.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reports acked {info.ack_floor.stream_seq} of {last_seq} stream messages\n"
                                   f"--- reports log ---\n{service.log_tail()}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(
            "SELECT extract(epoch FROM max(recorded_at) - min(recorded_at)) FROM reports.events")).fetchone()
    counted = total - already
    return Drain(counted / (ended - started), {k: (after[k] - before[k]) / counted * 1e6 for k in after},
                 float(row[0]) if row and row[0] is not None else 0.0)


async def _check(dsn: str, work: Backlog, total: int) -> None:
    """Every event in the timeline, every message in its table, and the rollups' sums what the events add up to."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        found = {}
        for query in ("SELECT count(*) FROM reports.events", "SELECT count(*) FROM reports.messages",
                      "SELECT sum(accepted), sum(sent), sum(delivered), sum(opened) FROM reports.rollup_day "
                      "WHERE tag = ''",
                      "SELECT sum(accepted), sum(delivered) FROM reports.rollup_minute WHERE tag = ''",
                      "SELECT count(*) FROM reports.rollup_before_accept"):
            found[query] = tuple(int(v or 0) for v in (await (await conn.execute(query)).fetchone() or ()))
    c = work.counts
    expected = [(total,), (work.messages,),
                (c[EventType.ACCEPTED], c[EventType.SENT], c[EventType.DELIVERED], c.get(EventType.OPENED, 0)),
                (c[EventType.ACCEPTED], c[EventType.DELIVERED]), (0,)]
    for (query, got), wanted in zip(found.items(), expected, strict=True):
        if got != wanted:
            raise RuntimeError(f"{query}: {got}, expected {wanted}")


def events_per_s(args: argparse.Namespace, run: int) -> Drain:
    """One run: a fresh database and namespace, the backlog published, the service started, the drain timed."""
    database = pgtools.unique_database_name("esp_bench_reports")
    dsn = pgtools.create_database(ADMIN_DSN, database)
    topology = Topology(f"benchrp{secrets.token_hex(3)}")
    service: m.Process | None = None
    try:
        asyncio.run(_prepare_database(dsn))
        built = time.perf_counter()
        work = backlog(topology, args.events, seed=1000 + run)
        total = len(work.publications)
        last_seq = asyncio.run(_publish(topology, work))
        print(f"  {total:,} events of {work.messages:,} messages built and published in "
              f"{time.perf_counter() - built:.1f} s", file=sys.stderr, flush=True)
        grpc_port = m.free_port()
        service = m.spawn(f"reports-{run}", [sys.executable, "-m", "services.reports"], LOG_DIR,
                          _service_env(dsn, topology, grpc_port))
        drain = asyncio.run(_drain(dsn, topology, service, last_seq, total))
        asyncio.run(_check(dsn, work, total))
        print(f"  first → last batch start {drain.batches_first_to_last_s:.2f} s", file=sys.stderr, flush=True)
        return drain
    finally:
        if service is not None:
            service.stop()
        asyncio.run(m.forget_namespace(topology.namespace, NATS_URL, REDIS_URL))
        pgtools.drop_database(ADMIN_DSN, database)


# -- reports.stats_p99_ms ----------------------------------------------------------------------------------------------
def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def _write(conn: psycopg.AsyncConnection, rollup: StatsRollup, minutes_since: datetime) -> int:
    """``StatsRollup.write``'s statements, with the minute rows of days minute retention has dropped left out (the
    consumer writes them, retention drops their partitions days later). Returns the rows written."""
    written = 0
    async with conn.transaction(), conn.pipeline():
        for table in rollups.ROLLUP_TABLES:
            rows = rollup.rows_for(table)
            columns = ("bucket", *table.keys)
            payload = [{**dict(zip(columns, (k[0].isoformat(), *k[1:]), strict=True)),  # type: ignore[attr-defined]
                        **row.as_json()}
                       for k, row in sorted(rows.items(), key=rollups._by_table_key)
                       if table.resolution is not Resolution.MINUTE or k[0] >= minutes_since]  # type: ignore[operator]
            if payload:
                await conn.execute(rollups._ADD_ROLLUPS[table.name], (json.dumps(payload, separators=(",", ":")),))
                written += len(payload)
    return written


def load_span(dsn: str, seed: int, start: float, end: float, events: int, day: int, big_share: float,
              minutes_since: float, window_end: float, batch_s: float) -> tuple[int, int]:
    """A worker's part of the load: about ``events`` events of messages accepted in [start, end), an hour of them
    through one StatsRollup at a time. Returns (events counted, rows written)."""
    return asyncio.run(_load_span(dsn, seed, start, end, events, day, big_share, minutes_since, window_end,
                                  batch_s))


async def _load_span(dsn: str, seed: int, start: float, end: float, events: int, day: int, big_share: float,
                     minutes_since: float, window_end: float, batch_s: float) -> tuple[int, int]:
    traffic = Traffic(Tenants.make(50, big_share), seed)
    since = datetime.fromtimestamp(minutes_since, UTC)
    per_message = 3.3
    messages = max(1, round(events / per_message))
    counted = written = 0
    async with await psycopg.AsyncConnection.connect(dsn, options=SESSION_OPTIONS) as conn:
        hour = start
        while hour < end:
            upto = min(end, hour + batch_s)
            share = round(messages * (upto - hour) / (end - start))
            rollup = StatsRollup()
            for accepted_at in sorted(traffic.rng.uniform(hour, upto) for _ in range(share)):
                msg = traffic.message(accepted_at, day)
                facts = traffic.facts(msg)
                for record in traffic.events(msg):
                    if record.event_time.timestamp() < window_end:
                        rollup.add(record, facts)
                        counted += 1
            written += await _write(conn, rollup, since)
            hour = upto
    return counted, written


async def _partitions_and_vacuum(dsn: str, days: Sequence[date], vacuum: bool) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if not vacuum:
            for day in days:
                await conn.execute("SELECT reports.ensure_day_partition('rollup_minute', 'bucket', %s)", (day,))
            return {}
        for table in ("rollup_minute", "rollup_hour", "rollup_day"):
            await conn.execute(f"VACUUM ANALYZE reports.{table}")
        sizes = {}
        for table in ("rollup_minute", "rollup_hour", "rollup_day"):
            row = await (await conn.execute(f"SELECT count(*) FROM reports.{table}")).fetchone()
            sizes[table] = int(row[0]) if row else 0
        return sizes


def load_stats(dsn: str, args: argparse.Namespace, now: datetime) -> None:
    """The rollup rows of ``--stats-events`` events over the 30 days before ``now``."""
    window_start, window_end = now - timedelta(days=30), now
    today = now.date()
    minute_days = [today - timedelta(days=n) for n in range(MINUTE_RETENTION_DAYS + 1)]
    asyncio.run(_partitions_and_vacuum(dsn, minute_days, vacuum=False))
    minutes_since = _midnight(minute_days[-1]).timestamp()
    spans: list[tuple[float, float, int]] = []
    cursor = window_start
    while cursor < window_end:
        upto = min(window_end, _midnight(cursor.date() + timedelta(days=1)))
        spans.append((cursor.timestamp(), upto.timestamp(), 29 - (window_end - cursor).days))
        cursor = upto
    total_s = (window_end - window_start).total_seconds()
    started = time.perf_counter()
    counted = written = 0
    with ProcessPoolExecutor(max_workers=args.load_workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(load_span, dsn, 7 + index, low, high, round(args.stats_events * (high - low) / total_s),
                               max(0, day), args.big_share, minutes_since, window_end.timestamp(),
                               args.batch_hours * 3600)
                   for index, (low, high, day) in enumerate(spans)]
        for future in futures:
            events, rows = future.result()
            counted += events
            written += rows
            print(f"    {counted:,} events, {written:,} rollup rows upserted, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    vacuumed = time.perf_counter()
    sizes = asyncio.run(_partitions_and_vacuum(dsn, minute_days, vacuum=True))
    print(f"  loaded {counted:,} events in {vacuumed - started:.0f} s, VACUUM ANALYZE "
          f"{time.perf_counter() - vacuumed:.0f} s; rows: {sizes}", file=sys.stderr, flush=True)


def _queries(now: datetime, count: int, seed: int) -> list[tuple[str, datetime, datetime]]:
    """(shape, start, end): half end at now minus up to an hour, a quarter at a whole hour, a quarter at midnight."""
    rng = random.Random(seed)
    shapes = []
    for i in range(count):
        if i % 4 in (0, 1):
            end, shape = now - timedelta(seconds=rng.uniform(0, 3600)), "unaligned"
        elif i % 4 == 2:
            end, shape = Resolution.HOUR.floor(now) - timedelta(hours=rng.randrange(3)), "hour"
        else:
            end, shape = Resolution.DAY.floor(now), "day"
        shapes.append((shape, end - timedelta(days=30), end))
    return shapes


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(share * len(ordered))) - 1)]


async def stats_latencies(dsn: str, tenant: str, now: datetime, count: int, seed: int,
                          admin: bool) -> dict[str, list[float]]:
    """Milliseconds of each query, by shape (and ``all``), after ten unmeasured ones."""
    pool = await create_pool(dsn, name="reports-bench")
    try:
        reader = StatsReader(pool, minute_retention=timedelta(days=MINUTE_RETENTION_DAYS))
        timings: dict[str, list[float]] = {"all": []}
        groups = 0
        for index, (shape, start, end) in enumerate(_queries(now, count + (10 if not admin else 2), seed)):
            query = StatsQuery(tenant_id="" if admin else tenant, start=start, end=end, dimensions=("provider",),
                               bucket=Resolution.DAY, platform_admin=admin)
            began = time.perf_counter()
            report = await reader.get(query)
            elapsed = (time.perf_counter() - began) * 1000
            if index >= (10 if not admin else 2):
                timings["all"].append(elapsed)
                timings.setdefault(shape, []).append(elapsed)
            groups = max(groups, len(report.rows))
            if not report.total.count("delivered"):
                raise RuntimeError(f"no deliveries in {query}")
        print(f"    {'admin' if admin else 'tenant'}: up to {groups} groups; "
              + ", ".join(f"{shape} p50 {percentile(v, 0.5):.1f} p99 {percentile(v, 0.99):.1f} ms"
                          for shape, v in timings.items()), file=sys.stderr, flush=True)
        return timings
    finally:
        await pool.close()


# -- the benchmark ----------------------------------------------------------------------------------------------------
UNITS = {"reports.events_per_s": "1/s", **{f"reports.cpu_us_per_event.{p}": "us"
                                         for p in ("reports", "bench-client", *SHARED_SERVERS)},
         "reports.cpu_us_per_event": "us"}
TARGETS = {"reports.events_per_s": 20_000, "reports.stats_p99_ms": 200}
HEADLINES: dict[str, floor.FloorName] = {
    "reports.events_per_s": "pg", "reports.stats_p99_ms": "grpc", "reports.stats_admin_p99_ms": "grpc",
}


@contextmanager
def stats_database(args: argparse.Namespace, now: datetime) -> Iterator[str]:
    database = pgtools.unique_database_name("esp_bench_reports_stats")
    dsn = pgtools.create_database(ADMIN_DSN, database)
    try:
        asyncio.run(migrate_services(dsn, ["reports"]))
        if not args.skip_stats:
            load_stats(dsn, args, now)
        yield dsn
    finally:
        pgtools.drop_database(ADMIN_DSN, database)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the floors, load the stats store, then ``--runs`` runs; print the medians as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000, help="events the consumer drains per run")
    parser.add_argument("--stats-events", type=int, default=10_000_000, help="events behind the stats rollups")
    parser.add_argument("--big-share", type=float, default=0.8, help="the big tenant's share of them")
    parser.add_argument("--queries", type=int, default=200, help="a tenant's stats queries per run")
    parser.add_argument("--admin-queries", type=int, default=20, help="platform admin stats queries per run")
    parser.add_argument("--load-workers", type=int, default=2, help="processes loading the rollups")
    parser.add_argument("--batch-hours", type=float, default=6, help="hours of events per StatsRollup when loading")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-stats", action="store_true")
    args = parser.parse_args(argv)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    samples: dict[str, list[float]] = {}

    def keep(metric: str, value: float) -> None:
        samples.setdefault(metric, []).append(value)
        print(f"  {metric}: {value:,.1f}", file=sys.stderr, flush=True)

    with stats_database(args, now) as dsn:
        yardstick = floor.measure(dsn)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            if not args.skip_throughput:
                drain = events_per_s(args, run)
                keep("reports.events_per_s", drain.events_per_s)
                for name, value in drain.cpu_us.items():
                    keep(f"reports.cpu_us_per_event.{name}", value)
                keep("reports.cpu_us_per_event", sum(v for k, v in drain.cpu_us.items() if k != "bench-client"))
            if not args.skip_stats:
                big = Tenants.make(50, args.big_share).big
                tenant = asyncio.run(stats_latencies(dsn, big, now, args.queries, seed=run, admin=False))
                keep("reports.stats_p50_ms", percentile(tenant["all"], 0.50))
                keep("reports.stats_p99_ms", percentile(tenant["all"], 0.99))
                admin = asyncio.run(stats_latencies(dsn, big, now, args.admin_queries, seed=run, admin=True))
                keep("reports.stats_admin_p50_ms", percentile(admin["all"], 0.50))
                keep("reports.stats_admin_p99_ms", percentile(admin["all"], 0.99))
    floor.print_figures(floor.median_figures(samples, UNITS, TARGETS), yardstick, HEADLINES)


if __name__ == "__main__":
    main()
