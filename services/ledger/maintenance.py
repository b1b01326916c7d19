"""Maintenance the ledger runs in the background: the expiry sweeper, which returns the credits of holds nobody
resolved in time, forgets outcome event ids past the EVENTS stream's retention, and keeps the planner's statistics
fresh where autovacuum does not."""

from __future__ import annotations

import asyncio
import logging

import psycopg
from psycopg import AsyncConnection, sql

from libs.common.stopping import pause_unless_stopped
from services.ledger.database import Database
from services.ledger.errors import InvalidLedgerArgument
from services.ledger.holds import expire_holds

log = logging.getLogger(__name__)


async def prune_processed_events(db: Database, older_than_s: float, limit: int) -> int:
    """Forget up to ``limit`` applied outcome events processed more than ``older_than_s`` ago; returns how many.
    Past the EVENTS stream's retention no redelivery can bring one back, and a late duplicate of a forgotten
    event still finds its hold resolved (``HOLD_ALREADY_RESOLVED``), so nothing is charged twice."""
    if older_than_s <= 0 or limit < 1:
        raise InvalidLedgerArgument("older_than_s", "the age and the limit must be positive")

    async def work(conn: AsyncConnection) -> int:
        cur = await conn.execute(
            """DELETE FROM ledger.processed_events WHERE event_id IN (
                   SELECT event_id FROM ledger.processed_events
                   WHERE processed_at < now() - make_interval(secs => %s) LIMIT %s)""",
            (older_than_s, limit),
        )
        return cur.rowcount

    return await db.transaction(work)


async def refresh_planner_statistics(db: Database) -> list[str]:
    """ANALYZE the ledger's tables whose statistics are stale by autovacuum's own rule (more than 50 rows +
    10 % changed since the last analyze), when the server does not run autovacuum; returns the tables analyzed.

    Without statistics the planner takes a young, fast-growing table for a small one, and the batch lookups by
    id (``hold_id = ANY(...)``, ``event_id = ANY(...)``) become sequential scans whose cost grows with the
    table: measured here, 165 scans reading 1.5 M rows for 20,000 settled emails. Where autovacuum runs it
    keeps the statistics fresh, and this does nothing."""
    async with db.pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            setting = await (await conn.execute("SELECT current_setting('autovacuum')")).fetchone()
            if setting is not None and setting[0] == "on":
                return []
            rows = await (await conn.execute(
                """SELECT relname FROM pg_stat_user_tables
                   WHERE schemaname = 'ledger' AND n_mod_since_analyze > 50 + 0.1 * n_live_tup
                   ORDER BY relname""")).fetchall()
            tables = [row[0] for row in rows]
            for table in tables:
                await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("ledger", table)))
            return tables
        finally:
            await conn.set_autocommit(False)


async def run_expiry_sweeper(db: Database, stop: asyncio.Event, *, interval_s: float, limit: int,
                             statistics_every_s: float, processed_event_retention_s: float,
                             prune_every_s: float) -> None:
    """Expire due holds until ``stop`` is set: back to back while a step finds a full batch, else every
    ``interval_s``; every ``statistics_every_s`` also refresh stale planner statistics, and every
    ``prune_every_s`` forget applied outcome events older than ``processed_event_retention_s``. A failing step
    is logged and retried at the next interval."""
    loop = asyncio.get_running_loop()
    statistics_due = loop.time()
    prune_due = loop.time()
    while not stop.is_set():
        expired = 0
        try:
            expired = await expire_holds(db, None, limit)
        except (psycopg.Error, OSError):
            log.exception("hold expiry sweep failed")
        if loop.time() >= statistics_due:
            statistics_due = loop.time() + statistics_every_s
            try:
                await refresh_planner_statistics(db)
            except (psycopg.Error, OSError):
                log.exception("refreshing the ledger's planner statistics failed")
        if loop.time() >= prune_due:
            prune_due = loop.time() + prune_every_s
            try:
                pruned = step = 10_000  # a backlog goes in steps, each its own short transaction
                while pruned >= step and not stop.is_set():
                    pruned = await prune_processed_events(db, processed_event_retention_s, step)
            except (psycopg.Error, OSError):
                log.exception("pruning the ledger's processed events failed")
        if expired >= limit:
            continue
        await pause_unless_stopped(stop, interval_s)
