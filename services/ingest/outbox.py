"""Transactional outbox: rows committed with each message reach JetStream after the commit, at least once.

The accept path commits message + outbox rows together, then hands the committed rows to :meth:`OutboxPublisher.
publish_soon`; the publisher sends them (asynchronous JetStream publishes, acks awaited together) and deletes the
rows JetStream acknowledged. Whatever is still in the table some seconds later — the replica crashed, NATS was down
— is picked up by the reconciling pass that every replica runs (``FOR UPDATE SKIP LOCKED``: replicas share the
work). Each row is published with ``Nats-Msg-Id`` = its message or event id, so JetStream's duplicate window drops
a publish that had in fact landed before a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool

from libs.common.jetstream import AckedPublisher
from services.ingest.pg import autocommit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxRow:
    """One message to publish."""

    subject: str
    msg_id: str
    payload: bytes


@dataclass(frozen=True)
class CommittedRow:
    """An outbox row as committed (its table id, to delete it once published)."""

    id: int
    row: OutboxRow


class OutboxPublisher:
    """Publishes committed rows at once, and reconciles leftovers every ``interval_s``."""

    def __init__(self, pool: AsyncConnectionPool, nc: NATS, *, batch_size: int = 1000,
                 interval_s: float = 1.0, reconcile_after_s: float = 5.0, publish_timeout_s: float = 10.0) -> None:
        self.pool = pool
        self.publisher = AckedPublisher(nc)
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.reconcile_after_s = reconcile_after_s
        """Rows older than this are taken as left behind (the direct path publishes within milliseconds)."""
        self.publish_timeout_s = publish_timeout_s
        self._fresh: deque[CommittedRow] = deque()
        self._urgent: deque[CommittedRow] = deque()
        self._wake = asyncio.Event()

    def publish_soon(self, rows: Sequence[CommittedRow], urgent: bool = False) -> None:
        """Rows were just committed: publish them now rather than at the next reconciling pass. Urgent rows (an
        OTP's) go before every fresh row not yet published, so they never wait behind a campaign's."""
        (self._urgent if urgent else self._fresh).extend(rows)
        self._wake.set()

    def notify(self) -> None:
        """Something may be waiting in the table: look now."""
        self._wake.set()

    async def publish_fresh(self) -> int:
        """Publish up to ``batch_size`` just-committed rows; return how many JetStream acknowledged."""
        queue = self._urgent or self._fresh
        batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        if not batch:
            return 0
        done = await self._publish(batch)
        if done:
            async with autocommit(self.pool) as conn:
                await conn.execute("DELETE FROM ingest.outbox WHERE id = ANY(%s)", (done,))
        return len(done)

    async def publish_pending(self, *, min_age_s: float = 0.0) -> int:
        """One reconciling pass: publish up to ``batch_size`` rows at least ``min_age_s`` old that no other replica
        is publishing; return how many were published (and deleted)."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """SELECT id, subject, msg_id, payload FROM ingest.outbox
                   WHERE created_at <= now() - make_interval(secs => %s)
                   ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
                (min_age_s, self.batch_size),
            )
            rows = [CommittedRow(i, OutboxRow(s, m, bytes(p))) for i, s, m, p in await cur.fetchall()]
            if not rows:
                return 0
            done = await self._publish(rows)
            if done:
                await conn.execute("DELETE FROM ingest.outbox WHERE id = ANY(%s)", (done,))
            return len(done)

    async def _publish(self, rows: Sequence[CommittedRow]) -> list[int]:
        """Publish ``rows`` concurrently; the ids of those JetStream acknowledged."""
        acks: list[asyncio.Future[None]] = []
        try:
            for committed in rows:
                acks.append(await self.publisher.publish(committed.row.subject, committed.row.payload,
                                                         committed.row.msg_id))
        except Exception:
            log.warning("outbox: publishing failed after %d of %d rows; the rest wait for the next pass",
                        len(acks), len(rows), exc_info=True)
        if acks:
            await asyncio.wait(acks, timeout=self.publish_timeout_s)
        done: list[int] = []
        for committed, ack in zip(rows, acks, strict=False):
            if ack.done() and not ack.cancelled() and ack.exception() is None:
                done.append(committed.id)
        self.publisher.forget([ack for ack in acks if not ack.done()])
        if len(done) < len(rows):
            log.warning("outbox: %d of %d publishes unconfirmed; they stay for the next pass",
                        len(rows) - len(done), len(rows))
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``: fresh rows as they come, leftovers every ``interval_s``; errors (NATS or
        Postgres down) are logged and retried."""
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        while not stop.is_set():
            # Cleared first, so rows handed over while publishing are not missed.
            self._wake.clear()
            try:
                if self._urgent or self._fresh:
                    await self.publish_fresh()
                    continue
                if loop.time() >= next_pass:
                    next_pass = loop.time() + self.interval_s
                    if await self.publish_pending(min_age_s=self.reconcile_after_s) >= self.batch_size:
                        next_pass = loop.time()  # more left behind: no pause
                        continue
            except Exception:
                log.exception("outbox pass failed")
                await asyncio.sleep(0.5)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, next_pass - loop.time()))
            except TimeoutError:
                pass
