"""Provider health shared by every sender and router replica, in Redis: circuit breakers, latency and error
EWMAs, global rate limits (GCRA) and daily/monthly quota counters.

Writes happen per attempt (one pipelined round trip); routing reads a snapshot that each process refreshes a few
times a second, so a decision costs no Redis round trip and every replica converges within the refresh interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from libs.common.redis import GCRA_SCRIPT

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a provider's breaker opens and how it recovers."""

    consecutive_failures: int = 5
    """Open after this many failures in a row."""
    failure_rate: float = 0.5
    """... or when the failure EWMA exceeds this, once ``min_samples`` attempts were seen."""
    min_samples: int = 20
    open_seconds: float = 5.0
    """How long an open breaker refuses traffic before letting one probe through (half-open)."""
    probe_timeout_s: float = 30.0
    """A probe that never reports back frees the half-open slot after this long."""


@dataclass(frozen=True)
class ProviderHealth:
    """What routing knows about one provider right now."""

    breaker: str = CLOSED
    latency_ms_ewma: float = 0.0
    """0 means no observation yet."""
    error_rate: float = 0.0
    samples: int = 0
    daily_used: int = 0
    monthly_used: int = 0


# KEYS[1] = health hash. ARGV: ok(1/0), latency_ms, alpha, consecutive_threshold, rate_threshold, min_samples,
# open_ms, now_ms. Keeps EWMAs and the breaker state in one atomic step so replicas never disagree on transitions.
_RECORD_SCRIPT = """
local h = KEYS[1]
local ok = tonumber(ARGV[1])
local latency = tonumber(ARGV[2])
local alpha = tonumber(ARGV[3])
local now = tonumber(ARGV[8])
local samples = tonumber(redis.call('HGET', h, 'samples') or '0') + 1
local err = tonumber(redis.call('HGET', h, 'err') or '0')
local fail = 1 - ok
err = err + alpha * (fail - err)
local consecutive = tonumber(redis.call('HGET', h, 'consecutive') or '0')
local state = redis.call('HGET', h, 'state') or 'closed'
if ok == 1 then
  consecutive = 0
  if latency >= 0 then
    local lat = tonumber(redis.call('HGET', h, 'lat') or '-1')
    if lat < 0 then lat = latency else lat = lat + alpha * (latency - lat) end
    redis.call('HSET', h, 'lat', lat)
  end
  if state ~= 'closed' then
    state = 'closed'
    redis.call('HDEL', h, 'open_until', 'probe_until')
  end
else
  consecutive = consecutive + 1
  if state == 'half_open' or consecutive >= tonumber(ARGV[4])
     or (samples >= tonumber(ARGV[6]) and err >= tonumber(ARGV[5])) then
    if state ~= 'open' then redis.call('HINCRBY', h, 'opened_total', 1) end
    state = 'open'
    redis.call('HSET', h, 'open_until', now + tonumber(ARGV[7]))
    redis.call('HDEL', h, 'probe_until')
  end
end
redis.call('HSET', h, 'samples', samples, 'err', err, 'consecutive', consecutive, 'state', state)
return state
"""

# KEYS[1] = health hash. ARGV: now_ms, probe_timeout_ms. Returns 1 when this caller may send to the provider:
# closed, or open-but-cooled-down (becomes half_open and this caller is its single probe).
_ACQUIRE_SCRIPT = """
local h = KEYS[1]
local now = tonumber(ARGV[1])
local state = redis.call('HGET', h, 'state') or 'closed'
if state == 'closed' then return 1 end
if state == 'open' then
  if now < tonumber(redis.call('HGET', h, 'open_until') or '0') then return 0 end
  redis.call('HSET', h, 'state', 'half_open', 'probe_until', now + tonumber(ARGV[2]))
  return 1
end
if now >= tonumber(redis.call('HGET', h, 'probe_until') or '0') then
  redis.call('HSET', h, 'probe_until', now + tonumber(ARGV[2]))
  return 1
end
return 0
"""


class HealthBoard:
    """Reads and writes the shared provider state."""

    def __init__(self, redis: aioredis.Redis, namespace: str, policy: BreakerPolicy | None = None,
                 *, alpha: float = 0.2, refresh_s: float = 0.2) -> None:
        self.redis = redis
        self.namespace = namespace
        self.policy = policy or BreakerPolicy()
        self.alpha = alpha
        self.refresh_s = refresh_s
        self._record = redis.register_script(_RECORD_SCRIPT)
        self._acquire = redis.register_script(_ACQUIRE_SCRIPT)
        self._gcra = redis.register_script(GCRA_SCRIPT)
        self._snapshot: dict[str, ProviderHealth] = {}

    def _key(self, provider_id: str) -> str:
        return f"{self.namespace}:ph:{provider_id}"

    def _quota_keys(self, provider_id: str) -> tuple[str, str]:
        now = time.gmtime()
        return (f"{self.namespace}:pq:{provider_id}:d:{time.strftime('%Y%m%d', now)}",
                f"{self.namespace}:pq:{provider_id}:m:{time.strftime('%Y%m', now)}")

    def snapshot(self, provider_id: str) -> ProviderHealth:
        return self._snapshot.get(provider_id, ProviderHealth())

    async def refresh(self, provider_ids: Iterable[str]) -> Mapping[str, ProviderHealth]:
        """Read every provider's state in one pipelined round trip."""
        ids = list(provider_ids)
        if not ids:
            self._snapshot = {}
            return self._snapshot
        async with self.redis.pipeline(transaction=False) as pipe:
            for pid in ids:
                daily, monthly = self._quota_keys(pid)
                pipe.hmget(self._key(pid), "state", "lat", "err", "samples", "open_until")
                pipe.get(daily)
                pipe.get(monthly)
            replies = await pipe.execute()
        now_ms = time.time() * 1000
        snapshot: dict[str, ProviderHealth] = {}
        for i, pid in enumerate(ids):
            (state, lat, err, samples, open_until), daily, monthly = replies[3 * i: 3 * i + 3]
            breaker = (state or b"closed").decode()
            if breaker == OPEN and open_until is not None and now_ms >= float(open_until):
                breaker = HALF_OPEN  # cooled down: eligible for a probe
            latency = float(lat) if lat is not None and float(lat) >= 0 else 0.0
            snapshot[pid] = ProviderHealth(breaker, latency, float(err or 0), int(samples or 0),
                                           int(daily or 0), int(monthly or 0))
        self._snapshot = snapshot
        return snapshot

    async def run_refresher(self, provider_ids: Callable[[], Iterable[str]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh(provider_ids())
            except Exception:
                log.warning("provider health refresh failed", exc_info=True)
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_s)
            except TimeoutError:
                pass

    async def acquire(self, provider_id: str, rate_limit_per_second: float) -> tuple[bool, float]:
        """May we send to this provider now? Checks the breaker (taking the half-open probe slot if due) and the
        global rate limit; returns (allowed, seconds to wait when refused by the rate limit)."""
        now_ms = int(time.time() * 1000)
        allowed = await self._acquire(keys=[self._key(provider_id)],
                                      args=[now_ms, int(self.policy.probe_timeout_s * 1000)])
        if not allowed:
            return False, 0.0
        if rate_limit_per_second > 0:
            interval_us = 1_000_000 / rate_limit_per_second
            ok, retry_us, _ = await self._gcra(keys=[f"{self.namespace}:prl:{provider_id}"],
                                               args=[interval_us, interval_us, 1])
            if not ok:
                return False, int(retry_us) / 1_000_000
        return True, 0.0

    async def record(self, provider_id: str, *, ok: bool, latency_ms: float | None, counts_toward_quota: bool,
                     provider_fault: bool = True) -> str:
        """Record an attempt's outcome; returns the breaker state after it. Failures that are the message's fault
        (a permanent rejection of one address) don't count against the provider's health."""
        now_ms = int(time.time() * 1000)
        p = self.policy
        async with self.redis.pipeline(transaction=False) as pipe:
            if ok or provider_fault:
                await self._record(keys=[self._key(provider_id)], args=[
                    1 if ok else 0, latency_ms if latency_ms is not None else -1, self.alpha,
                    p.consecutive_failures, p.failure_rate, p.min_samples, int(p.open_seconds * 1000), now_ms],
                    client=pipe)
            if counts_toward_quota:
                daily, monthly = self._quota_keys(provider_id)
                pipe.incr(daily)
                pipe.expire(daily, 2 * 86400)
                pipe.incr(monthly)
                pipe.expire(monthly, 32 * 86400)
            replies = await pipe.execute()
        state = replies[0] if (ok or provider_fault) else b"closed"
        return state.decode() if isinstance(state, bytes) else str(state)

