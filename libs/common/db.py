"""Postgres plumbing: connection pools and per-service SQL migrations.

Every service owns a Postgres schema named after it (``ledger``, ``ingest`` ...) and the ordered SQL files in its
``migrations/`` folder. Migrations are applied under an advisory lock so several replicas starting at once apply
each file exactly once.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

__all__ = [
    "CHECKOUT_TIMEOUT_S",
    "RECONNECT_TIMEOUT_S",
    "SESSION_OPTIONS",
    "Migration",
    "autocommit",
    "create_pool",
    "load_migrations",
    "migrate",
    "migrate_services",
    "service_migrations",
]

_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
# Arbitrary constant: one advisory lock serialises all migrators of this deployment.
_MIGRATION_LOCK_ID = 0x45_53_50_4D


@dataclass(frozen=True)
class Migration:
    """One SQL file of a service's migrations folder."""

    service: str
    version: int
    name: str
    sql: str


def load_migrations(service: str, folder: Path) -> list[Migration]:
    """Read ``NNN_name.sql`` files from ``folder`` in version order; reject duplicates and bad names."""
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations of {service} have version {version}")
        found[version] = Migration(service, version, path.stem, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(conn: psycopg.AsyncConnection, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply the migrations not applied yet, each in its own transaction; return those applied now."""
    applied_now: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS public.schema_migrations (
                   service text NOT NULL,
                   version integer NOT NULL,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (service, version))"""
        )
        await conn.commit()
        for migration in migrations:
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT 1 FROM public.schema_migrations WHERE service = %s AND version = %s",
                    (migration.service, migration.version),
                )
                if await cur.fetchone() is not None:
                    continue
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO public.schema_migrations (service, version, name) VALUES (%s, %s, %s)",
                    (migration.service, migration.version, migration.name),
                )
            applied_now.append(migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
        await conn.commit()
    return applied_now


def service_migrations(service: str) -> list[Migration]:
    """The migrations of ``services/<service>/migrations``."""
    folder = Path(__file__).resolve().parents[2] / "services" / service / "migrations"
    return load_migrations(service, folder)


async def migrate_services(dsn: str, services: Sequence[str]) -> list[Migration]:
    """Apply the migrations of the named services to the database at ``dsn``."""
    applied: list[Migration] = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for service in services:
            applied += await migrate(conn, service_migrations(service))
    return applied


SESSION_OPTIONS = "-c jit=off"
"""Every service connection runs without JIT compilation. Our statements are short (array batches of a few
hundred rows); when the planner misjudges one as expensive, compiling it costs milliseconds that land on whoever
waits for that batch (an OTP's credit hold among them). In two alternating pairs of runs here, 500 OTPs each
while a backlog drained, the accept's p99 went from 35.9 / 34.8 ms to 28.5 / 33.4 ms without JIT."""


CHECKOUT_TIMEOUT_S = 5.0
"""How long a caller waits for a pooled connection before ``PoolTimeout`` (which callers hear as UNAVAILABLE:
:mod:`libs.common.dependency_errors`). psycopg_pool's default, 30 s, outlives most callers' deadlines: while
Postgres is down they would hear DEADLINE_EXCEEDED, without the RetryInfo that tells them when to come back. Our
pools hold a few connections more than their batching workers use, so a healthy service never waits this long."""

RECONNECT_TIMEOUT_S = 10.0
"""How long a pool keeps replacing a lost connection in the background, with psycopg_pool's backoff (1, 2, 4, 8 s),
before it leaves reconnecting to the next caller that needs a connection. psycopg_pool's default (5 minutes) lets
the backoff grow past a minute: a Postgres back from a long outage would wait that long to be used again."""


class _ProbingPool(AsyncConnectionPool):
    """A pool that never hands out a connection the server has already closed.

    When Postgres restarts (or fails over) it ends every session; the pooled connections do not notice until
    they are used, so without a probe the first call on each of them after the restart fails. Each connection is
    probed as it leaves the pool by reading whatever its socket holds, without blocking and without a round trip
    (psycopg's own check, ``check_connection``, costs one query per checkout): a server that ended the session
    has sent its FATAL error and closed the socket, and the connection reads as broken. A broken one goes back to
    the pool, which replaces it, and the next one is tried."""

    # The base's signature (its connection() calls getconn(timeout=...)), hence the timeout parameter.
    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:  # noqa: ASYNC109
        """A live connection, waiting at most ``timeout`` (the pool's timeout when None) in all."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolTimeout(f"couldn't get a live connection from {self.name!r} in time")
            conn = await super().getconn(remaining)
            if not _closed_by_server(conn):
                return conn
            await self.putconn(conn)  # the pool sees it is broken, closes it and opens a replacement


def _closed_by_server(conn: AsyncConnection[Any]) -> bool:
    """Whether the server has ended ``conn``'s session, read from its socket without blocking. An idle connection
    has nothing to read but a notice (kept in libpq's buffer for later) or the server's goodbye: its FATAL error
    and then the end of the stream. libpq stops reading once it got some bytes, so the first read takes the FATAL
    message and the second finds the end (and marks the connection broken); on a live connection both find
    nothing, two system calls in all."""
    pgconn = conn.pgconn
    try:
        for _ in range(2):
            if pgconn.status != ConnStatus.OK:
                return True
            pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return bool(pgconn.status != ConnStatus.OK)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, name: str = "esp",
                      checkout_timeout_s: float = CHECKOUT_TIMEOUT_S) -> AsyncConnectionPool:
    """Open a pool and wait until its first connections are up, so start-up fails fast on a bad DSN.

    The pool survives Postgres restarts by itself: it hands out no connection the server closed, replaces lost
    ones, and once Postgres is back the next caller gets a connection (see :class:`_ProbingPool`,
    ``RECONNECT_TIMEOUT_S``). While Postgres is down a caller waits ``checkout_timeout_s`` at most."""
    pool = _ProbingPool(dsn, min_size=min_size, max_size=max_size, name=name, open=False,
                        kwargs={"options": SESSION_OPTIONS}, timeout=checkout_timeout_s,
                        reconnect_timeout=RECONNECT_TIMEOUT_S)
    await pool.open(wait=True, timeout=15)
    return pool


@asynccontextmanager
async def autocommit(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection]:
    """A pooled connection in autocommit mode: a lone statement is atomic by itself and costs one round trip
    instead of three (BEGIN, statement, COMMIT). The connection goes back to the pool in its usual mode."""
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            await conn.set_autocommit(False)
