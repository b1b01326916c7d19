"""The EVENTS stream consumer: a durable pull consumer whose batches are recorded in one transaction each.

A batch is acked only after its transaction committed (at-least-once); a failure leaves it unacked, so JetStream
redelivers it after ``ack_wait`` and the dedupe on ``event_id`` makes the retry harmless. Suppressions found in a
batch reach Redis before the commit: if the commit then fails, the redelivered batch writes them to Postgres
again, so the mirror never lags behind the truth. The batch's customer events (numbered per message) are queued in
the reports outbox in the same transaction and published to ``esp.notify.<tenant>`` after the commit, for the
webhook dispatcher.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common.consumer_lag import watch_consumer_lag
from libs.common.jetstream import Topology, ensure_pull_consumer, pull_loop
from libs.common.outbox import OutboxPublisher
from libs.common.stopping import pause_unless_stopped
from services.reports.customer_events import queue_recorded_events
from services.reports.envelopes import UndecodableEvent, decode_envelope
from services.reports.models import MessageEventRecord
from services.reports.recorder import RecordOutcome, claim_parked_events, record_events
from services.reports.rollups import forget_early_counts
from services.reports.suppressions import add_to_redis

log = logging.getLogger(__name__)

CONSUMER_NAME = "reports"
_MIN_EVENTS_TO_SPLIT = 200
"""Smaller batches go in one transaction: a transaction's fixed cost matters more than overlap for them."""
EARLY_COUNTS_RETENTION = timedelta(days=7)
"""How long stats counts made before their message's ACCEPTED event wait for it (``rollups.forget_early_counts``)."""

EVENTS_RECORDED = Counter(
    "esp_reports_events_recorded_total", "Message events recorded by the reports consumer", ["event_type"]
)
EVENTS_SKIPPED = Counter(
    "esp_reports_events_skipped_total", "Stream messages the reports consumer did not record", ["why"]
)


@dataclass(frozen=True)
class ConsumerOptions:
    """How the reports consumer pulls."""

    batch_size: int = 2000
    """Most messages fetched and recorded per transaction (a batch takes what is pending, up to this)."""
    max_ack_pending: int = 5000
    """Unacked messages JetStream lets this consumer hold (across replicas)."""
    ack_wait_s: float = 30.0
    """How long a fetched, unacked batch waits before redelivery."""
    parked_sweep_interval_s: float = 5.0
    """How often parked webhook events (message unknown when they came) are matched again."""
    linger_s: float = 0.05
    """After a small batch taken from a busy stream, how long to let the next one gather before fetching it."""
    batches_in_flight: int = 2
    """Batches recorded at once, each in its own transaction: while one waits for Postgres, the next is decoded and
    sent (with one, Python and Postgres take turns). Safe because every statement takes its row locks in key order,
    as concurrent replicas already require."""
    lanes: int = 2
    """Transactions each batch is recorded in at once, its events split between them by message. Consecutive
    batches share most of their messages, whose rows the merge locks until the commit, so batches in flight mostly
    wait for each other; lanes share no message row and wait only for the rollup rows, which are written last."""


class EventConsumer:
    """Turns EVENTS stream messages into timeline rows, message state, stats and suppressions."""

    def __init__(self, pool: AsyncConnectionPool, redis: Redis, nc: NATS, topology: Topology,
                 notifications: OutboxPublisher, options: ConsumerOptions | None = None, *,
                 mailbox_provider_of: Callable[[str], str] | None = None) -> None:
        """``mailbox_provider_of`` maps a recipient to its mailbox provider for the rollups (default: well-known
        domains only, see ``record_events``)."""
        self._pool = pool
        self._record_options: dict[str, Any] = (
            {"mailbox_provider_of": mailbox_provider_of} if mailbox_provider_of else {})
        self._notifications = notifications
        self._redis = redis
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._topology = topology
        self._options = options or ConsumerOptions()

    @property
    def durable_name(self) -> str:
        """The JetStream durable consumer's name."""
        return self._topology.consumer(CONSUMER_NAME)

    async def ensure(self) -> None:
        """Create or update the durable consumer on the EVENTS stream."""
        await ensure_pull_consumer(
            self._js, self._topology.events_stream, self.durable_name, self._topology.events_wildcard,
            ack_wait_s=self._options.ack_wait_s, max_ack_pending=self._options.max_ack_pending,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (a ``ServiceApp`` background task)."""
        await self.ensure()
        await asyncio.gather(*(
            pull_loop(self._nc, self._topology.events_stream, self.durable_name, self._handle_and_linger, stop,
                      batch=self._options.batch_size)
            for _ in range(self._options.batches_in_flight)))

    async def report_lag(self, stop: asyncio.Event) -> None:
        """Export the consumer's backlog (``esp_jetstream_consumer_pending``) until ``stop`` (a service task): the
        platform's consumer-lag alert covers reports like every other consumer."""
        await watch_consumer_lag(self._js, [(self._topology.events_stream, self.durable_name)], stop)

    async def _handle_and_linger(self, msgs: list[Msg]) -> None:
        """Record a batch; after a small one from a busy stream, wait a moment so the next batch is larger.

        Much of a batch's cost is per batch (the transaction, each statement, one stats row per tenant, hour,
        provider and tag touched), so a stream that trickles in fast costs far more per event in batches of a
        few dozen than in batches of hundreds. A lone message (an idle stream) is recorded, and the next one
        fetched, at once; the batch is acked before the wait.
        """
        await self.handle_batch(msgs)
        if self._options.linger_s > 0 and 1 < len(msgs) < self._options.batch_size // 4:
            await asyncio.sleep(self._options.linger_s)

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Record one fetched batch, then ack it."""
        records: list[MessageEventRecord] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                headers = msg.headers or {}
                records.append(decode_envelope(msg.data, headers.get("Nats-Msg-Id", "")))
                good.append(msg)
            except UndecodableEvent as exc:
                # Redelivery cannot fix a payload: terminate it so it does not block the consumer forever.
                log.error("dropping an undecodable event", extra={"subject": msg.subject, "error": str(exc)})
                EVENTS_SKIPPED.labels("undecodable").inc()
                await msg.term()
        if records:
            await self.record_in_lanes(records)
        for msg in good:
            await msg.ack()

    async def sweep_parked(self) -> int:
        """Apply parked webhook events whose message is known by now; returns how many were applied. Also drops
        stats counts that waited too long for their message's ACCEPTED event."""
        async with self._pool.connection() as conn, conn.transaction():
            await forget_early_counts(conn, EARLY_COUNTS_RETENTION)
            claimed = await claim_parked_events(conn, min_age=timedelta(seconds=self._options.parked_sweep_interval_s))
            if not claimed:
                return 0
            outcome = await record_events(conn, claimed, **self._record_options)
            if outcome.suppressed:
                await add_to_redis(self._redis, self._topology.namespace, outcome.suppressed)
            queued = await queue_recorded_events(conn, self._topology, outcome.recorded)
        self._notifications.publish_soon(queued)
        return len(outcome.new_events)

    async def sweep_loop(self, stop: asyncio.Event) -> None:
        """Run :meth:`sweep_parked` every ``parked_sweep_interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            await pause_unless_stopped(stop, self._options.parked_sweep_interval_s)
            if stop.is_set():
                return
            try:
                applied = await self.sweep_parked()
                if applied:
                    log.info("applied parked webhook events", extra={"events": applied})
            except Exception:
                log.exception("sweeping parked webhook events failed; will retry")

    async def record_in_lanes(self, records: list[MessageEventRecord]) -> None:
        """Record a batch in ``lanes`` transactions at once, its events split by message (see ``ConsumerOptions``);
        a lane that fails fails the batch, which is then redelivered whole (what other lanes committed is found
        recorded and not counted again)."""
        lanes = self._options.lanes
        if lanes == 1 or len(records) < _MIN_EVENTS_TO_SPLIT:
            await self.record(records)
            return
        split: list[list[MessageEventRecord]] = [[] for _ in range(lanes)]
        for record in records:
            split[hash((record.tenant_id, record.message_id)) % lanes].append(record)
        results = await asyncio.gather(*(self.record(part) for part in split if part), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def record(self, records: list[MessageEventRecord]) -> RecordOutcome:
        """Record decoded events in one transaction (Redis suppression mirror updated before the commit)."""
        async with self._pool.connection() as conn, conn.transaction():
            outcome = await record_events(conn, records, defer_rollups=True, **self._record_options)
            if outcome.suppressed:
                await add_to_redis(self._redis, self._topology.namespace, outcome.suppressed)
            queued = await queue_recorded_events(conn, self._topology, outcome.recorded)
            if outcome.rollup is not None:
                # Last: concurrent batches (and lanes) wait for each other's rollup rows until the commit.
                await outcome.rollup.write(conn)
        self._notifications.publish_soon(queued)
        for event_type, count in collections.Counter(e.event_type for e in outcome.new_events).items():
            EVENTS_RECORDED.labels(event_type.value).inc(count)
        if outcome.duplicates:
            EVENTS_SKIPPED.labels("duplicate").inc(outcome.duplicates)
        return outcome
