"""Transactional outbox: rows committed with a change reach JetStream after the commit, at least once.

A service commits its change and its outbox rows together (ingest: a message; campaigns: a chunk of a campaign),
then hands the committed rows to
:meth:`OutboxPublisher.publish_soon`; the publisher sends them (asynchronous JetStream publishes, acks awaited
together, in a task of their own so the next rows go out meanwhile) and deletes the rows JetStream acknowledged.
Whatever is still in the table some seconds later — the replica crashed, NATS was down — is picked up by the
reconciling pass that every replica runs (``FOR UPDATE SKIP LOCKED``: replicas share the work). Each row is
published with ``Nats-Msg-Id`` = its message or event id, so JetStream's duplicate window drops a publish that had
in fact landed before a crash.

A publisher made with ``scheduled=True`` also holds rows back until a time of their own (ingest's scheduled
sends): a row committed with ``deliver_after`` set skips the direct path and stays in the table (column
``deliver_after``; tables without it, such as the campaigns outbox, keep the default) until a due pass, every
``due_interval_s``, finds it due and publishes it like a reconciling pass would. Until then deleting the row
withdraws it: a scheduled row is only ever published by a pass holding its row lock, and deleted in the same
transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool

from libs.common.db import autocommit
from libs.common.jetstream import AckedPublisher
from libs.common.stopping import pause_unless_stopped

__all__ = ["CommittedRow", "OutboxPublisher", "OutboxRow"]

log = logging.getLogger(__name__)

BATCHES_AWAITING_ACKS = 8
"""Published batches whose JetStream acks (and row deletion) ``run`` awaits at once, in tasks of their own: the next
committed rows — an OTP's — go out without waiting for the previous batch's two round trips."""


@dataclass(frozen=True)
class OutboxRow:
    """One message to publish."""

    subject: str
    msg_id: str
    payload: bytes
    deliver_after: datetime | None = None
    """Publish it no earlier than this (only for a publisher made with ``scheduled=True``); None: at once."""
    traceparent: str = ""
    """The W3C trace context of the work that wrote the row (``telemetry.current_traceparent``), published as the
    message's ``traceparent`` header so its consumers join that trace; "" for none."""


@dataclass(frozen=True)
class CommittedRow:
    """An outbox row as committed (its table id, to delete it once published)."""

    id: int
    row: OutboxRow


class OutboxPublisher:
    """Publishes committed rows at once, and reconciles leftovers every ``interval_s``; with ``scheduled``, publishes
    the rows held back until their ``deliver_after`` too, within ``due_interval_s`` of it."""

    def __init__(self, pool: AsyncConnectionPool, nc: NATS, table: str, *, batch_size: int = 1000,
                 interval_s: float = 1.0, reconcile_after_s: float = 5.0, publish_timeout_s: float = 10.0,
                 scheduled: bool = False, due_interval_s: float = 0.2) -> None:
        self.pool = pool
        self.table = table
        """The outbox table, schema-qualified (``ingest.outbox``): columns id, subject, msg_id, payload,
        traceparent, created_at, and deliver_after when ``scheduled``."""
        self.scheduled = scheduled
        """The table has a ``deliver_after`` column: rows may be held back until then (see the module docstring)."""
        self.due_interval_s = due_interval_s
        """How often the due pass looks for rows that came due: the most a scheduled row is late, when idle."""
        self.publisher = AckedPublisher(nc)
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.reconcile_after_s = reconcile_after_s
        """Rows older than this are taken as left behind (the direct path publishes within milliseconds)."""
        self.publish_timeout_s = publish_timeout_s
        self._fresh: deque[CommittedRow] = deque()
        self._urgent: deque[CommittedRow] = deque()
        self._wake = asyncio.Event()
        self._confirming: set[asyncio.Task[None]] = set()
        self._confirm_slots = asyncio.Semaphore(BATCHES_AWAITING_ACKS)

    def publish_soon(self, rows: Sequence[CommittedRow], urgent: bool = False) -> None:
        """Rows were just committed: publish them now rather than at the next reconciling pass. Urgent rows (an
        OTP's) go before every fresh row not yet published, so they never wait behind a campaign's."""
        now = [row for row in rows if row.row.deliver_after is None]
        if now:
            (self._urgent if urgent else self._fresh).extend(now)
            self._wake.set()

    async def publish_pending(self, *, min_age_s: float = 0.0) -> int:
        """One reconciling pass: publish up to ``batch_size`` rows at least ``min_age_s`` old that no other replica
        is publishing; return how many were published (and deleted). Rows held back until a time of their own are
        the due pass's (``publish_due``)."""
        unscheduled = "AND deliver_after IS NULL" if self.scheduled else ""
        return await self._publish_locked(
            f"""SELECT id, subject, msg_id, payload, traceparent FROM {self.table}
               WHERE created_at <= now() - make_interval(secs => %s) {unscheduled}
               ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
            (min_age_s, self.batch_size))

    async def publish_due(self) -> int:
        """One due pass: publish up to ``batch_size`` held-back rows whose ``deliver_after`` has come (earliest
        first) that no other replica is publishing; return how many were published (and deleted)."""
        if not self.scheduled:
            return 0
        return await self._publish_locked(
            f"""SELECT id, subject, msg_id, payload, traceparent FROM {self.table}
               WHERE deliver_after IS NOT NULL AND deliver_after <= now()
               ORDER BY deliver_after LIMIT %s FOR UPDATE SKIP LOCKED""",
            (self.batch_size,))

    async def _publish_locked(self, select: str, args: tuple[object, ...]) -> int:
        """Lock the rows ``select`` finds, publish them and delete those JetStream acknowledged, in one transaction:
        until it ends, nobody else publishes or deletes them."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(select, args)
            rows = [CommittedRow(i, OutboxRow(s, m, bytes(p), traceparent=t or ""))
                    for i, s, m, p, t in await cur.fetchall()]
            if not rows:
                return 0
            done = await self._publish(rows)
            if done:
                await conn.execute(f"DELETE FROM {self.table} WHERE id = ANY(%b)", (done,))
            return len(done)

    async def _publish(self, rows: Sequence[CommittedRow]) -> list[int]:
        """Publish ``rows`` concurrently; the ids of those JetStream acknowledged."""
        return await self._confirmed(rows, await self._send(rows))

    async def _send(self, rows: Sequence[CommittedRow]) -> list[asyncio.Future[None]]:
        """Publish ``rows`` in order without waiting for JetStream: their acks (fewer when publishing failed)."""
        acks: list[asyncio.Future[None]] = []
        try:
            for committed in rows:
                row = committed.row
                headers = {"traceparent": row.traceparent} if row.traceparent else None
                acks.append(await self.publisher.publish(row.subject, row.payload, row.msg_id, headers))
        except Exception:
            log.warning("outbox: publishing failed after %d of %d rows; the rest wait for the next pass",
                        len(acks), len(rows), exc_info=True)
        return acks

    async def _confirmed(self, rows: Sequence[CommittedRow], acks: list[asyncio.Future[None]]) -> list[int]:
        """Wait (bounded) for the acks of published ``rows``: the ids of those JetStream acknowledged."""
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

    async def _hand_over_fresh(self) -> None:
        """Publish the next just-committed rows (urgent first) and return without waiting for JetStream: a task
        of their own awaits the acks and deletes the acknowledged rows."""
        await self._confirm_slots.acquire()
        queue = self._urgent or self._fresh
        batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        try:
            acks = await self._send(batch)
        except BaseException:
            self._confirm_slots.release()
            raise
        task = asyncio.create_task(self._confirm_and_delete(batch, acks))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm_and_delete(self, rows: Sequence[CommittedRow], acks: list[asyncio.Future[None]]) -> None:
        try:
            done = await self._confirmed(rows, acks)
            if done:
                async with autocommit(self.pool) as conn:
                    await conn.execute(f"DELETE FROM {self.table} WHERE id = ANY(%b)", (done,))
        except Exception:
            # Published or not, the rows stay in the table: the reconciling pass publishes them again (JetStream's
            # duplicate window drops what had landed).
            log.warning("outbox: could not confirm or delete %d published rows", len(rows), exc_info=True)
        finally:
            self._confirm_slots.release()

    async def _reconcile(self, stop: asyncio.Event) -> None:
        """Every ``interval_s``, a reconciling pass (at once again while each finds a full batch)."""
        while not stop.is_set():
            try:
                if await self.publish_pending(min_age_s=self.reconcile_after_s) >= self.batch_size:
                    continue  # more left behind: no pause
            except Exception:
                log.exception("outbox reconciling pass failed")
            await pause_unless_stopped(stop, self.interval_s)

    async def _release_due(self, stop: asyncio.Event) -> None:
        """Every ``due_interval_s``, a due pass (at once again while each finds a full batch). Cheap when nothing is
        due: one index probe (``deliver_after`` is indexed where set)."""
        while not stop.is_set():
            try:
                if await self.publish_due() >= self.batch_size:
                    continue
            except Exception:
                log.exception("outbox due pass failed")
            await pause_unless_stopped(stop, self.due_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``: fresh rows as they come, leftovers every ``interval_s`` (a task of its own, so a
        reconciling pass never delays fresh rows); errors (NATS or Postgres down) are logged and retried."""
        passes = [asyncio.create_task(self._reconcile(stop))]
        if self.scheduled:
            passes.append(asyncio.create_task(self._release_due(stop)))
        try:
            while not stop.is_set():
                # Cleared first, so rows handed over while publishing are not missed.
                self._wake.clear()
                if self._urgent or self._fresh:
                    try:
                        await self._hand_over_fresh()
                    except Exception:
                        log.exception("outbox publish failed")
                        await asyncio.sleep(0.5)
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
                except TimeoutError:
                    pass
        finally:
            if not stop.is_set():  # cancelled rather than stopped
                for task in passes:
                    task.cancel()
            await asyncio.gather(*passes, *self._confirming, return_exceptions=True)
