"""Bulk yields to urgent mail: while OTPs flow, the bulk pool keeps fewer emails in flight.

Separate pools, consumers and worker processes keep a bulk backlog from taking an OTP's slots, but not from
taking the CPU and the shared servers (Postgres, Redis, NATS) the OTP's path crosses: a campaign draining at full
speed keeps them all busy, and every OTP then waits a little at each of the twenty-odd wake-ups on its way
(ingest, the ledger and its Postgres backend, JetStream, the OTP worker). So while urgent mail flows, the bulk
pool lowers its concurrency (``bulk_concurrency_while_urgent``), and restores it once none was delivered for a
window. Measured on the e2e bench (two cores, every service and server on them, 50 OTPs a second over a bulk
drain), yielding against never yielding, alternately: OTP p99 30-42 ms per set instead of 34-56, for a bulk drain
of 1,450-1,990 emails/s instead of 1,980-2,710 while the OTPs flowed (BENCHMARKS.md, session 8). A campaign alone
still drains at full concurrency.

The signal is one Redis key with an expiry, so every replica's bulk pool yields to every replica's urgent mail:
an urgent pool renews it after its deliveries (at most every quarter window, so an OTP worker writes it a few
times a second however many OTPs it sends), and a bulk pool looks at it every ``refresh_s``. The renewal runs
after the delivery, off the OTP's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.exceptions import RedisError

from libs.common.stopping import pause_unless_stopped
from libs.common.workers import StopEvent
from services.sender.pool import ClassPool

log = logging.getLogger(__name__)

YIELDING = Gauge("esp_sender_bulk_yielding", "1 while the bulk pool runs at its lower concurrency for urgent mail")


class UrgentTraffic:
    """Whether urgent mail (OTPs, by default) was delivered recently by any sender replica."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.redis = redis
        self.key = f"{namespace}:sender:urgent-flowing"
        self.window_s = window_s
        self._clock = clock
        self._renewed_at = -float("inf")
        self._renewing: asyncio.Task[None] | None = None

    def note_delivery(self) -> None:
        """An urgent delivery just happened here: renew the signal in the background, unless this process did
        less than a quarter window ago (or a renewal is still under way)."""
        now = self._clock()
        if now - self._renewed_at < self.window_s / 4 or (self._renewing is not None and not self._renewing.done()):
            return
        self._renewed_at = now
        self._renewing = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        try:
            await self.redis.set(self.key, b"1", px=max(1, round(self.window_s * 1000)))
        except RedisError:
            # Bulk then yields a little later or not at all: no email depends on it.
            log.debug("could not renew the urgent-mail signal", exc_info=True)

    async def flowing(self) -> bool:
        """True while urgent mail was delivered within the window."""
        return bool(await self.redis.exists(self.key))

    async def aclose(self) -> None:
        """Wait for a renewal under way (so that the client can be closed after it)."""
        if self._renewing is not None:
            await asyncio.gather(self._renewing, return_exceptions=True)


async def yield_to_urgent_mail(pool: ClassPool, urgent: UrgentTraffic, concurrency_while_urgent: int,
                               stop: StopEvent, *, refresh_s: float = 0.1) -> None:
    """Keep ``pool`` at ``concurrency_while_urgent`` emails in flight while urgent mail flows, at its full
    concurrency otherwise; looks every ``refresh_s``. When Redis cannot answer, the capacity stays as it was."""
    lowered = False
    while not stop.is_set():
        try:
            flowing = await urgent.flowing()
        except RedisError:
            log.debug("could not read the urgent-mail signal", exc_info=True)
        else:
            if flowing != lowered:
                lowered = flowing
                capacity = min(concurrency_while_urgent, pool.concurrency) if lowered else pool.concurrency
                pool.resize(capacity)
                YIELDING.set(1 if lowered else 0)
                log.info("bulk %s: %d emails in flight at most", "yields to urgent mail" if lowered else "resumes",
                         capacity)
        await pause_unless_stopped(stop, refresh_s)
    if lowered:
        pool.resize(pool.concurrency)
        YIELDING.set(0)
