"""``python -m services.campaigns.expander``: the campaigns' expander (started by the campaigns service; see
``libs.common.workers``), and what it does besides expanding.

Expansion (:mod:`services.campaigns.expansion`) is CPU work in bursts — a million recipients rendered and queued —
so it runs in a process of its own at a lower CPU priority: the same tenant's OTPs, accepted by ingest meanwhile,
get the CPU first. Besides expanding, every ``poll_interval_s`` the expander:

- starts scheduled campaigns whose send_time has come (the scheduler);
- pauses running campaigns whose daily send window closed, and resumes those whose window opened;
- keeps the Redis mirror of halted campaigns (``libs.common.campaign_halts``) equal to Postgres, so a halt whose
  Redis write failed after its commit still reaches the senders;
- puts emails the senders parked while a campaign was paused back in the send stream after a resume or cancel
  (senders then send them, or drop them as cancelled);
- completes running campaigns whose every email reached a final outcome (reports' counts).

A pause (window closed) or a completion writes its notification for the customer (``notifications``) to the
campaigns outbox in the transaction of the transition.

Several expanders may run: each chunk and each campaign row is taken with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from esp.internal.v1 import queue_pb2
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common import db
from libs.common.campaign_halts import Halt, clear_halt, read_halts, set_halt
from libs.common.grpc_client import open_channel
from libs.common.jetstream import AckedPublisher, Topology, connect, ensure_streams
from libs.common.outbox import CommittedRow, OutboxPublisher
from libs.common.redis import create_redis
from libs.common.stopping import pause_unless_stopped
from libs.common.timestamps import to_timestamp
from libs.common.unsubscribe import UnsubscribeTokens
from libs.common.workers import StopEvent, WorkerParts, run_worker
from services.campaigns.clients import LedgerHolds, ReportsStats
from services.campaigns.config import CampaignsSettings
from services.campaigns.expansion import Expansion, UnsubscribeLinks
from services.campaigns.model import CampaignSpec, PauseReason
from services.campaigns.notifications import completed_event, paused_event, queue_event

__all__ = ["CANCELLED_HALT_KEPT_S", "Expander", "build_expander", "main"]

log = logging.getLogger(__name__)

CANCELLED_HALT_KEPT_S = 7 * 86_400
"""How long a cancelled campaign stays in the halted mirror: as long as one of its emails could still be queued
(a hold lives ``hold_ttl_s``)."""
HOUSEKEEPING_S = 1.0
"""How often the slower duties (windows, mirror, completion) run."""


class Expander:
    """The expander's loops over the campaigns schema."""

    def __init__(self, pool: AsyncConnectionPool, redis: Redis, nc: NATS, topology: Topology,
                 expansion: Expansion, stats: ReportsStats, *, namespace: str, poll_interval_s: float,
                 unpark_window_s: float,
                 on_commit: Callable[[Sequence[CommittedRow]], None] = lambda rows: None) -> None:
        self.pool = pool
        self.redis = redis
        self.nc = nc
        self.js = nc.jetstream()
        self.topology = topology
        self.expansion = expansion
        self.stats = stats
        self.namespace = namespace
        self.poll_interval_s = poll_interval_s
        self.unpark_window_s = unpark_window_s
        self.publisher = AckedPublisher(nc)
        self.on_commit = on_commit
        """Receives the outbox rows (campaign notifications) a duty committed: the outbox publisher's
        ``publish_soon``."""

    async def run(self, stop: StopEvent) -> None:
        """Expand while there is work, and run the duties above between chunks, until ``stop``."""
        next_duties = 0.0
        next_housekeeping = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_duties:
                next_duties = now + self.poll_interval_s
                await self._guarded(self.start_due)
                await self._guarded(self.unpark)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_S
                await self._guarded(self.apply_send_windows)
                await self._guarded(self.sync_halts)
                await self._guarded(self.complete_finished)
            try:
                result = await self.expansion.expand_next()
            except Exception:
                log.exception("campaign expansion failed; retrying")
                result = None
            if result is None:
                await pause_unless_stopped(stop, min(self.poll_interval_s, max(0.0, next_duties - time.monotonic())))

    @staticmethod
    async def _guarded(duty: Callable[[], Coroutine[Any, Any, object]]) -> None:
        try:
            await duty()
        except Exception:
            log.exception("campaign duty %s failed", duty.__name__)

    async def start_due(self) -> list[str]:
        """Scheduled campaigns whose send_time has come start running; their ids."""
        async with db.autocommit(self.pool) as conn:
            cur = await conn.execute(
                """UPDATE campaigns.campaigns SET state = 'running', started_at = coalesce(started_at, now()),
                       updated_at = now()
                   WHERE state = 'scheduled' AND send_time <= now() RETURNING id""")
            started = [r[0] for r in await cur.fetchall()]
        for campaign_id in started:
            log.info("campaign %s started (its send_time came)", campaign_id)
        return started

    async def apply_send_windows(self) -> None:
        """Pause running campaigns outside their daily window; resume those paused by it once it opens."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT id, spec, state FROM campaigns.campaigns
                   WHERE (state = 'running' OR (state = 'paused' AND pause_reason = 'send_window_closed'))
                     AND jsonb_typeof(spec->'send_window') = 'object'""")
            rows = await cur.fetchall()
        now = datetime.now(UTC)
        for campaign_id, spec_json, state in rows:
            window = CampaignSpec.from_json(spec_json).send_window
            assert window is not None
            is_open = window.is_open(now)
            if state == "running" and not is_open:
                notices: list[CommittedRow] = []
                async with self.pool.connection() as conn, conn.transaction():
                    cur = await conn.execute(
                        """UPDATE campaigns.campaigns SET state = 'paused', pause_reason = %s, updated_at = now(),
                               pauses = pauses + 1
                           WHERE id = %s AND state = 'running' RETURNING tenant_id, pauses""",
                        (PauseReason.SEND_WINDOW_CLOSED.value, campaign_id))
                    paused = await cur.fetchone()
                    if paused is not None:
                        notices.append(await queue_event(conn, paused_event(
                            self.topology, paused[0], campaign_id, PauseReason.SEND_WINDOW_CLOSED, paused[1], at=now)))
                if notices:
                    self.on_commit(notices)
                    await set_halt(self.redis, campaign_id, Halt.PAUSED, namespace=self.namespace)
                    log.info("campaign %s paused: its send window closed", campaign_id)
            elif state == "paused" and is_open:
                async with db.autocommit(self.pool) as conn:
                    cur = await conn.execute(
                        """UPDATE campaigns.campaigns SET state = 'running', pause_reason = '', updated_at = now(),
                               unpark_until = %s
                           WHERE id = %s AND state = 'paused' AND pause_reason = %s RETURNING id""",
                        (now + timedelta(seconds=self.unpark_window_s), campaign_id,
                         PauseReason.SEND_WINDOW_CLOSED.value))
                    if await cur.fetchone() is not None:
                        await clear_halt(self.redis, campaign_id, namespace=self.namespace)
                        log.info("campaign %s resumed: its send window opened", campaign_id)

    async def _halted_in_postgres(self, ids: list[str] | None = None) -> dict[str, Halt]:
        query = """SELECT id, state FROM campaigns.campaigns
                   WHERE ((state = 'paused' AND pause_reason <> 'insufficient_credits')
                          OR (state = 'cancelled' AND ended_at > now() - make_interval(secs => %s)))"""
        args: list[Any] = [CANCELLED_HALT_KEPT_S]
        if ids is not None:
            query += " AND id = ANY(%s)"
            args.append(ids)
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, args)
            return {r[0]: Halt.CANCELLED if r[1] == "cancelled" else Halt.PAUSED for r in await cur.fetchall()}

    async def sync_halts(self) -> None:
        """Make the Redis mirror of halted campaigns equal to Postgres."""
        wanted = await self._halted_in_postgres()
        mirrored = await read_halts(self.redis, namespace=self.namespace)
        for campaign_id, halt in wanted.items():
            if mirrored.get(campaign_id) is not halt:
                await set_halt(self.redis, campaign_id, halt, namespace=self.namespace)
        extra = [c for c in mirrored if c not in wanted]
        if extra:
            # Read again just before removing: a halt committed since the first read must stay.
            still = await self._halted_in_postgres(extra)
            for campaign_id in extra:
                if campaign_id not in still:
                    await clear_halt(self.redis, campaign_id, namespace=self.namespace)

    async def unpark(self) -> int:
        """Put emails parked by senders back in their send stream, for campaigns resumed or cancelled lately;
        how many were put back."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT id, spec->>'message_class' FROM campaigns.campaigns
                   WHERE unpark_until > now() AND state IN ('running', 'cancelled', 'completed')""")
            campaigns = await cur.fetchall()
        moved = 0
        for campaign_id, message_class in campaigns:
            moved += await self._unpark_campaign(campaign_id, message_class)
        return moved

    async def _unpark_campaign(self, campaign_id: str, message_class: str) -> int:
        durable = self.topology.consumer(f"unpark-{campaign_id}")
        subject = self.topology.held_subject(campaign_id)
        config = ConsumerConfig(durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=30, inactive_threshold=300)
        sub = await self.js.pull_subscribe(subject, durable=durable, stream=self.topology.held_stream,
                                           config=config)
        moved = 0
        try:
            while True:
                try:
                    msgs = await sub.fetch(500, timeout=0.2)
                except NatsTimeoutError:
                    break
                send_subject = self.topology.send_subject(message_class)
                acks = [await self.publisher.publish(send_subject, _requeued(msg.data),
                                                     f"unparked.{campaign_id}.{msg.metadata.sequence.stream}")
                        for msg in msgs]
                await asyncio.gather(*acks)
                for msg in msgs:
                    await msg.ack()
                moved += len(msgs)
        finally:
            await sub.unsubscribe()
        if moved:
            log.info("campaign %s: %d parked emails back in the send stream", campaign_id, moved)
        return moved

    async def complete_finished(self) -> list[str]:
        """Running campaigns with every recipient expanded and every queued email final are completed."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT id, tenant_id, queued + render_failed FROM campaigns.campaigns
                   WHERE state = 'running' AND next_row > last_row""")
            candidates = await cur.fetchall()
        completed: list[str] = []
        for campaign_id, tenant_id, queued in candidates:
            stats = await self.stats.of_campaign(tenant_id, campaign_id)
            if stats.final < queued:
                continue
            notices: list[CommittedRow] = []
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    """UPDATE campaigns.campaigns SET state = 'completed', ended_at = now(), updated_at = now()
                       WHERE id = %s AND state = 'running' AND next_row > last_row
                         AND queued + render_failed <= %s RETURNING recipients, suppressed, ended_at""",
                    (campaign_id, stats.final))
                done = await cur.fetchone()
                if done is not None:
                    recipients, suppressed, ended_at = done
                    counts = {"recipients": recipients, "sent": stats.sent, "delivered": stats.delivered,
                              "bounced": stats.bounced, "complained": stats.complained, "failed": stats.failed,
                              "cancelled": stats.cancelled, "suppressed": suppressed}
                    notices.append(await queue_event(conn, completed_event(self.topology, tenant_id, campaign_id,
                                                                           counts, at=ended_at)))
            if notices:
                self.on_commit(notices)
                completed.append(campaign_id)
                log.info("campaign %s completed", campaign_id)
        return completed


def _requeued(payload: bytes) -> bytes:
    """A parked task as it goes back to the send stream: queued anew now, so a pause longer than the class's
    maximum age does not make the sender give its emails up as too old."""
    task = queue_pb2.SendTask.FromString(payload)
    task.accepted_time.CopyFrom(to_timestamp(datetime.now(UTC)))
    requeued: bytes = task.SerializeToString()
    return requeued


def unsubscribe_links(settings: CampaignsSettings) -> UnsubscribeLinks | None:
    """The one-click link maker, when the settings have keys and a public base URL."""
    if not settings.unsubscribe_keys or not settings.public_base_url:
        return None
    return UnsubscribeLinks(UnsubscribeTokens.from_entries(settings.unsubscribe_keys), settings.public_base_url)


async def build_expander(settings: CampaignsSettings) -> WorkerParts:
    """The expander with its own pool, Redis, NATS, ledger and reports channels, and its outbox publisher."""
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    pool = await db.create_pool(settings.postgres_dsn, min_size=1, max_size=4, name="campaigns-expander")
    redis = create_redis(settings.redis_url)
    nc = await connect(settings.nats_url, "esp-campaigns-expander")
    await ensure_streams(nc.jetstream(), topology)
    ledger, reports = open_channel(settings.ledger_addr), open_channel(settings.reports_addr)
    outbox = OutboxPublisher(pool, nc, "campaigns.outbox")
    expansion = Expansion(pool, redis, LedgerHolds(ledger), topology, namespace=settings.namespace,
                          on_commit=outbox.publish_soon, unsubscribe=unsubscribe_links(settings),
                          chunk_size=settings.chunk_size, hold_ttl_s=settings.hold_ttl_s)
    expander = Expander(pool, redis, nc, topology, expansion, ReportsStats(reports), namespace=settings.namespace,
                        poll_interval_s=settings.poll_interval_s, unpark_window_s=settings.unpark_window_s,
                        on_commit=outbox.publish_soon)

    async def close_all() -> None:
        await ledger.close()
        await reports.close()
        await nc.drain()
        await redis.aclose()
        await pool.close()

    return WorkerParts(tasks=[outbox.run, expander.run], closers=[close_all])


def main() -> None:
    """Run the expander process (``python -m services.campaigns.expander``)."""
    run_worker(CampaignsSettings, build_expander, name=lambda _settings: "campaigns-expander",
               niceness=lambda settings: settings.expander_niceness)


if __name__ == "__main__":
    main()
