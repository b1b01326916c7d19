"""The delivery queue's backlog as Prometheus gauges: how many deliveries are due and how late the oldest is.

The queue is the ``webhooks.deliveries`` table, so no counter can tell its depth (replicas queue and deliver
concurrently, and a restart forgets counts); a query a few times a minute can. Only deliveries that are *due*
count — pending, their next attempt time passed, their endpoint enabled (or a test event, sent regardless): a
delivery waiting out its retry backoff is on schedule, and a disabled endpoint's are parked on purpose. Both
queries walk the ``deliveries_due`` partial index. Every replica reports the same numbers: aggregate with ``max``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import Gauge
from psycopg_pool import AsyncConnectionPool

from libs.common.stopping import pause_unless_stopped

__all__ = ["COUNT_CAP", "DEFAULT_INTERVAL_S", "DELIVERIES_DUE", "OLDEST_DUE_SECONDS", "Backlog", "measure_backlog",
           "watch_backlog"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 15.0
COUNT_CAP = 1_000_000
"""The count stops here: past it the alert fires anyway, and counting further would only cost the database more."""

DELIVERIES_DUE = Gauge("esp_webhook_deliveries_due",
                       f"Webhook deliveries due now and not yet delivered (counted up to {COUNT_CAP})")
OLDEST_DUE_SECONDS = Gauge("esp_webhook_oldest_due_seconds",
                           "How long the longest-waiting due webhook delivery has been due (0: none due)")

_DUE = """
    FROM webhooks.deliveries d JOIN webhooks.endpoints e ON e.id = d.endpoint_id
    WHERE d.state = 'pending' AND d.next_attempt_time <= now() AND (e.enabled OR d.ignore_disabled)"""


@dataclass(frozen=True)
class Backlog:
    """The delivery queue's backlog at one moment."""

    due: int
    """Deliveries due now (at most :data:`COUNT_CAP`)."""
    oldest_due_s: float
    """Seconds since the longest-waiting one came due; 0 when none is."""


async def measure_backlog(pool: AsyncConnectionPool) -> Backlog:
    """Read the backlog and set the gauges to it."""
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) FROM (SELECT 1 {_DUE} LIMIT %s) due", (COUNT_CAP,))
        counted = await cur.fetchone()
        cur = await conn.execute(
            f"SELECT coalesce(extract(epoch FROM now() - min(d.next_attempt_time)), 0)::float8 {_DUE}")
        oldest = await cur.fetchone()
    backlog = Backlog(int(counted[0]) if counted else 0, max(0.0, float(oldest[0])) if oldest else 0.0)
    DELIVERIES_DUE.set(backlog.due)
    OLDEST_DUE_SECONDS.set(backlog.oldest_due_s)
    return backlog


async def watch_backlog(pool: AsyncConnectionPool, stop: asyncio.Event,
                        interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """:func:`measure_backlog` every ``interval_s`` until ``stop``; a failed query keeps the last values."""
    while not stop.is_set():
        try:
            await measure_backlog(pool)
        except Exception:
            log.warning("could not measure the webhook delivery backlog", exc_info=True)
        await pause_unless_stopped(stop, interval_s)
