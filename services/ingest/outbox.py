"""Transactional outbox: rows written with the message are published to JetStream after commit.

The accept path commits message + hold reference + outbox rows together, then wakes the publisher. The publisher
takes rows with ``FOR UPDATE SKIP LOCKED`` (several replicas share the work), publishes each with its
``Nats-Msg-Id`` and deletes them in the same transaction. A crash anywhere leaves the rows in place; the next pass
(of any replica) publishes them again, and JetStream's duplicate window drops a publish that had in fact landed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from libs.common.jetstream import publish

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxRow:
    """One message to publish."""

    subject: str
    msg_id: str
    payload: bytes


async def write_outbox(conn: AsyncConnection, rows: list[OutboxRow]) -> None:
    """Add rows inside the caller's transaction."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO ingest.outbox (subject, msg_id, payload) VALUES (%s, %s, %s)",
            [(r.subject, r.msg_id, r.payload) for r in rows],
        )


class OutboxPublisher:
    """Publishes outbox rows; woken after each commit, and every ``interval_s`` as the crash reconciler."""

    def __init__(self, pool: AsyncConnectionPool, js: JetStreamContext, *, batch_size: int = 500,
                 interval_s: float = 1.0) -> None:
        self.pool = pool
        self.js = js
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Something was committed: publish it now rather than at the next interval."""
        self._wake.set()

    async def publish_pending(self) -> int:
        """One pass: publish up to ``batch_size`` rows; return how many were published."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """SELECT id, subject, msg_id, payload FROM ingest.outbox ORDER BY id LIMIT %s
                   FOR UPDATE SKIP LOCKED""",
                (self.batch_size,),
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
            results = await asyncio.gather(
                *(publish(self.js, subject, bytes(payload), msg_id=msg_id) for _id, subject, msg_id, payload in rows),
                return_exceptions=True,
            )
            done = [row[0] for row, result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
            failed = len(rows) - len(done)
            if failed:
                log.warning("outbox: %d of %d publishes failed; they stay for the next pass", failed, len(rows))
            if done:
                await conn.execute("DELETE FROM ingest.outbox WHERE id = ANY(%s)", (done,))
            return len(done)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; errors (NATS or Postgres down) are logged and retried."""
        while not stop.is_set():
            # Cleared before the pass, so a commit notified during the pass is not missed.
            self._wake.clear()
            try:
                published = await self.publish_pending()
            except Exception:
                log.exception("outbox pass failed")
                published = 0
                await asyncio.sleep(0.5)
            if published >= self.batch_size:
                continue  # more waiting: don't sleep
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
