"""The delivery log (every HTTP attempt) as tenants read it, and how long it and the finished queue are kept."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg_pool import AsyncConnectionPool

__all__ = ["AttemptLog", "AttemptRow", "retention_pass"]


@dataclass(frozen=True)
class AttemptRow:
    """One logged attempt."""

    id: int
    webhook_id: str
    attempt_time: datetime
    attempt: int
    status_code: int
    latency_ms: int
    response_excerpt: str
    error: str
    success: bool
    event_types: tuple[str, ...]
    next_attempt_time: datetime | None


class AttemptLog:
    """Reads an endpoint's attempts."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def list(self, endpoint_id: str, limit: int, before: int = 0) -> list[AttemptRow]:
        """Up to ``limit`` attempts, newest first, older than the attempt ``before`` (0: from the newest)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT id, webhook_id, attempt_time, attempt, status_code, latency_ms, response_excerpt, error,
                          success, event_types, next_attempt_time
                   FROM webhooks.attempts WHERE endpoint_id = %s AND (%s = 0 OR id < %s)
                   ORDER BY id DESC LIMIT %s""", (endpoint_id, before, before, limit))
            return [AttemptRow(i, w, t, a, s, lat, ex, err, ok, tuple(types), nxt)
                    for i, w, t, a, s, lat, ex, err, ok, types, nxt in await cur.fetchall()]


async def retention_pass(pool: AsyncConnectionPool, keep: timedelta) -> None:
    """Drop attempts and finished deliveries older than ``keep``."""
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM webhooks.attempts WHERE attempt_time < now() - %s", (keep,))
        await conn.execute("DELETE FROM webhooks.deliveries WHERE state <> 'pending' AND finish_time < now() - %s",
                           (keep,))
