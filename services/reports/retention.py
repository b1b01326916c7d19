"""Day partitions made ahead and retention by dropping them: ``reports.events`` and ``reports.rollup_minute``.

At 150 M emails a day the timeline takes ~600 M rows a day; deleting expired rows one by one would cost as much as
writing them (and leave the table bloated), so both tables are partitioned by day and a whole day is dropped at once
when it leaves retention. The hour and day rollups are small (rows per tenant and bucket, not per event): their old
rows are deleted.

Partitions for today and the next ``days_ahead`` days are made in advance; an event of a day without a partition
(far ahead, or a late event older than every partition) lands in the default partition, and
``reports.ensure_day_partition`` moves such rows out when it makes their day's partition. Rows of the default
partition older than retention are deleted with the rest. Every replica may run this loop: the SQL function takes
an advisory lock per partition and a drop waits at most ``LOCK_TIMEOUT`` for its lock, retrying at the next round.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from libs.common.stopping import pause_unless_stopped
from services.reports.rollups import ROLLUP_TABLES, Resolution

__all__ = ["PARTITIONED_TABLES", "PartitionedTable", "RetentionPolicy", "RetentionWorker"]

log = logging.getLogger(__name__)

LOCK_TIMEOUT = "5s"
_DAY_SUFFIX = re.compile(r"_p(\d{8})$")


@dataclass(frozen=True)
class PartitionedTable:
    """A table of the reports schema partitioned by day."""

    name: str
    time_column: str


EVENTS = PartitionedTable("events", "event_time")
ROLLUP_MINUTE = PartitionedTable("rollup_minute", "bucket")
PARTITIONED_TABLES = (EVENTS, ROLLUP_MINUTE)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of row is kept."""

    events: timedelta = timedelta(days=30)
    minute_rollups: timedelta = timedelta(days=3)
    hour_rollups: timedelta = timedelta(days=400)
    day_rollups: timedelta = timedelta(days=1100)
    days_ahead: int = 3

    def keep(self, table: PartitionedTable) -> timedelta:
        """The retention of a partitioned table."""
        return self.events if table is EVENTS else self.minute_rollups


async def ensure_partitions(conn: psycopg.AsyncConnection, table: PartitionedTable, days: Sequence[date]) -> int:
    """Make the day partitions of ``days`` that do not exist yet; return how many were made."""
    made = 0
    for day in days:
        cur = await conn.execute("SELECT reports.ensure_day_partition(%s, %s, %s)",
                                 (table.name, table.time_column, day))
        row = await cur.fetchone()
        made += bool(row and row[0])
    return made


async def partition_days(conn: psycopg.AsyncConnection, table: PartitionedTable) -> dict[date, str]:
    """The table's day partitions: day → partition name."""
    cur = await conn.execute(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = %s::regclass""", (f"reports.{table.name}",))
    days: dict[date, str] = {}
    for (name,) in await cur.fetchall():
        match = _DAY_SUFFIX.search(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC).date()] = name
    return days


class RetentionWorker:
    """Makes partitions ahead and drops or deletes what left retention, every ``interval_s`` (a service task)."""

    def __init__(self, pool: AsyncConnectionPool, policy: RetentionPolicy, *, interval_s: float = 3600.0) -> None:
        self._pool = pool
        self._policy = policy
        self._interval_s = interval_s

    async def run(self, stop: asyncio.Event) -> None:
        """Run a round at start, then every ``interval_s`` until ``stop``; a failed round is logged and retried."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("partition maintenance failed; retrying at the next round")
            await pause_unless_stopped(stop, self._interval_s)

    async def run_once(self, *, today: date | None = None) -> None:
        """One round: partitions for today and the days ahead, then retention."""
        today = today or datetime.now(UTC).date()
        ahead = [today + timedelta(days=n) for n in range(self._policy.days_ahead + 1)]
        async with self._pool.connection() as conn:
            for table in PARTITIONED_TABLES:
                async with conn.transaction():
                    made = await ensure_partitions(conn, table, ahead)
                if made:
                    log.info("made day partitions", extra={"table": table.name, "partitions": made})
                await self._drop_expired(conn, table, today)
            async with conn.transaction():
                for rollups in ROLLUP_TABLES:
                    if rollups.resolution is not Resolution.MINUTE:  # minutes go by whole partitions, above
                        keep = self._policy.hour_rollups if rollups.resolution is Resolution.HOUR else (
                            self._policy.day_rollups)
                        await conn.execute(sql.SQL("DELETE FROM {} WHERE bucket < %s").format(
                            sql.Identifier(*rollups.name.split("."))), (_midnight(today) - keep,))

    async def _drop_expired(self, conn: psycopg.AsyncConnection, table: PartitionedTable, today: date) -> None:
        """Drop the day partitions wholly older than the table's retention, and such rows of its default."""
        oldest_kept = _midnight(today) - self._policy.keep(table)
        for day, name in sorted((await partition_days(conn, table)).items()):
            if _midnight(day) + timedelta(days=1) > oldest_kept:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    await conn.execute(sql.SQL("DROP TABLE reports.{}").format(sql.Identifier(name)))
                log.info("dropped a day partition past retention", extra={"partition": name})
            except psycopg.errors.LockNotAvailable:
                log.warning("a partition past retention is busy; dropping it at the next round",
                            extra={"partition": name})
        async with conn.transaction():
            await conn.execute(
                f"DELETE FROM reports.{table.name}_default WHERE {table.time_column} < %s", (oldest_kept,))


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
