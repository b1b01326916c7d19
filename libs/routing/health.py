"""Provider health shared by every sender and router replica, in Redis.

One hash per provider holds its circuit breaker, latency estimates, a sliding window of outcomes and the
"throttled until" instant a provider's ``Retry-After`` set; next to it live the global rate limiter (GCRA) and
the daily/monthly quota counters. Every state change is one Lua script, so replicas never disagree on a
transition, and every script reads the clock from Redis (``TIME``), so replicas with skewed clocks still agree.

- ``acquire`` is the gate before a provider call: breaker (taking the single half-open probe slot when due),
  Retry-After, quota and rate budget, checked *and reserved* atomically. Quota is reserved before the call, so
  concurrent senders can never overshoot a provider's quota: routing moves away before the provider refuses.
  The rate limit books the caller a slot in the provider's schedule (GCRA with zero burst: calls are spaced at
  least ``1/rate`` apart — ``RATE_SAFETY_MARGIN`` more, so the network jitter between our clock and the
  provider's never pushes one of its one-second windows over ``rate`` calls) and returns how long to wait for
  it; a slot further away than the caller's ``max_wait_s`` is refused as "rate budget spent".
- ``record`` feeds an outcome back: successes close a half-open breaker, failures open it after N in a row or
  when the failure rate over the window passes a threshold (given enough samples); a throttled answer is not a
  failure (the provider is healthy, just busy) but pauses the provider for everyone until Retry-After passes.
- ``refresh`` reads every provider's state in one pipelined round trip; routing ranks from that snapshot, which
  each process refreshes a few times a second, so a routing decision itself costs no round trip.

The board talks to a ``HealthStore``: Redis in production, or the routing lab's in-memory Redis
(``libs.routing.memory_redis``), which runs the same scripts on a simulated clock; ``clock`` names the UTC day and
month of the quota counters, so it must be the clock the store's ``TIME`` reads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from libs.common.stopping import pause_unless_stopped
from libs.routing.pacing import DAY_S, UNIFORM, DemandProfile

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "RATE_SAFETY_MARGIN",
    "BreakerPolicy",
    "BreakerSettings",
    "CallHealth",
    "HealthBoard",
    "HealthStore",
    "Permit",
    "ProviderHealth",
    "ProviderLimits",
    "RecordedCall",
    "Refusal",
]

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
Z99 = 2.3263478740408408
"""The standard normal's 99th percentile."""
FAST_TAIL_DEVIATIONS = 4.0
"""The quick p99 bound: mean plus this many mean deviations (errs high for lognormal latencies)."""
TAIL_PRIOR_VAR = 0.25
"""The log-latency variance assumed after a provider's first measured call (a p99 about three times the first
latency), until more calls teach better."""
RATE_SAFETY_MARGIN = 0.05
"""Calls are paced this share below a provider's configured rate (≈ 50 ms of slack per one-second window)."""


@dataclass(frozen=True)
class BreakerPolicy:
    """When a provider's breaker opens and how it recovers."""

    consecutive_failures: int = 5
    """Open after this many failures in a row."""
    failure_rate: float = 0.5
    """... or when this share of the outcomes in the window failed ..."""
    min_samples: int = 20
    """... provided the window holds at least this many outcomes."""
    window_s: int = 30
    """Length of the sliding window of outcomes, in seconds (at most 60). Routing's health floor judges a provider
    by the same window (``libs.routing.scoring``), and a provider it leaves gets no calls, so the window is how long
    a failing provider stays out before a few calls test it again: at 10 s the routing lab's failing brown-out was
    tried again every ten seconds, each time spending quota on a few dozen calls of which a third failed."""
    open_s: float = 5.0
    """How long an open breaker refuses traffic before it lets one probe through (half-open)."""
    probe_timeout_s: float = 30.0
    """A probe that never reports back frees the half-open slot after this long (longer than a send timeout)."""

    def __post_init__(self) -> None:
        if not 1 <= self.window_s <= 60:
            raise ValueError("breaker window must be 1..60 seconds")
        if self.consecutive_failures < 1 or self.min_samples < 1 or self.open_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("breaker thresholds and durations must be positive")
        if not 0 < self.failure_rate <= 1:
            raise ValueError("breaker failure rate must be within (0, 1]")


@dataclass(frozen=True)
class ProviderHealth:
    """What routing knows about one provider right now (a snapshot; ``acquire`` has the final word)."""

    breaker: str = CLOSED
    """closed, open, or half_open (an open breaker whose cool-down has passed reads as half_open)."""
    probe_in_flight: bool = False
    """Half-open and its single probe is under way: nobody else may call the provider yet."""
    open_for_s: float = 0.0
    """Seconds until an open breaker lets a probe through."""
    throttled_for_s: float = 0.0
    """Seconds left of the pause the provider's last Retry-After asked for."""
    latency_ms_ewma: float = 0.0
    """Mean latency of successful calls (exponentially weighted); 0 means never measured."""
    latency_dev_ms: float = 0.0
    """Mean deviation of the latency (weighted the same way); ``ewma + 2·dev`` estimates its tail."""
    error_rate: float = 0.0
    """Share of failed calls in the sliding window."""
    window_samples: int = 0
    """Calls in the sliding window."""
    samples: int = 0
    """Calls recorded since the provider was first seen."""
    daily_used: int = 0
    """Emails reserved against today's quota (UTC)."""
    monthly_used: int = 0
    rate_backlog_s: float = 0.0
    """How far ahead the rate limiter's schedule is booked: a new call would wait this long."""
    day_share: float = 0.0
    """Share of the quota day's (UTC) expected sending gone by at the snapshot, by the store's clock and the
    board's ``DemandProfile`` (uniform: the share of the day gone by): what routing paces a daily quota against."""

    latency_log_mean: float = 0.0
    """Mean of the log of the latency in ms (weighted with ``HealthBoard.tail_alpha``, slower than the mean)."""
    latency_log_var: float = 0.0
    """Variance of the log of the latency (weighted the same way)."""

    @property
    def latency_p99_ms(self) -> float:
        """The latency's 99th percentile as routing estimates it (0 when never measured): the lower of a lognormal
        fit (steady: provider latencies have a long right tail) and the quick mean plus ``FAST_TAIL_DEVIATIONS``
        deviations (noisy, but it follows a provider that recovers within a few calls, where the fit would take a
        few hundred)."""
        if not self.measured:
            return 0.0
        fitted = math.exp(self.latency_log_mean + Z99 * math.sqrt(max(0.0, self.latency_log_var)))
        return min(fitted, self.latency_ms_ewma + FAST_TAIL_DEVIATIONS * self.latency_dev_ms)

    @property
    def latency_tail_ms(self) -> float:
        """A cheap tail estimate (≈ p95 for a well-behaved provider), as TCP estimates its retransmit timeout."""
        return self.latency_ms_ewma + 2 * self.latency_dev_ms if self.latency_ms_ewma else 0.0

    @property
    def measured(self) -> bool:
        """Whether any successful call has been timed."""
        return self.latency_ms_ewma > 0


class Refusal(enum.StrEnum):
    """Why ``acquire`` refused a call."""

    BREAKER_OPEN = "breaker_open"
    PROBE_IN_FLIGHT = "probe_in_flight"
    THROTTLED = "throttled"
    QUOTA = "quota"
    RATE = "rate"


@dataclass(frozen=True)
class Permit:
    """The answer of ``acquire``: how many emails may go in this call, after how long, and whether it probes."""

    granted: int
    """Emails the call may carry (quota can grant fewer than asked); 0 means refused."""
    wait_s: float = 0.0
    """When granted: sleep this long before calling (the booked rate slot). When refused: a hint of when
    asking again could succeed (0 when unknown, e.g. an exhausted daily quota)."""
    probe: bool = False
    """The call is the half-open breaker's probe: its outcome decides whether the breaker closes."""
    refusal: Refusal | None = None

    @property
    def allowed(self) -> bool:
        """Whether the call may go ahead."""
        return self.granted > 0


@dataclass(frozen=True)
class ProviderLimits:
    """The limits ``acquire`` enforces for one provider (from its registry entry)."""

    rate_per_second: float = 0.0
    """Calls per second across every sender; 0 = unlimited."""
    daily_quota: int = 0
    """Emails per UTC day; 0 = unlimited."""
    monthly_quota: int = 0


class CallHealth(enum.StrEnum):
    """What one provider call says about the provider's health: what ``record`` is told about a call (not what
    became of the email, which is ``libs.providers.model.Outcome``)."""

    SUCCESS = "ok"
    """The provider answered (accepted, or refused the email itself): it is up."""
    FAILURE = "fail"
    """The provider failed (5xx, timeout, refused connection, our account refused): counts toward opening."""
    THROTTLED = "throttle"
    """429 / Retry-After: healthy but busy; pauses the provider, never opens the breaker."""
    NOT_SENT = "release"
    """The call never reached the provider (refused locally): only gives back a probe slot."""


# KEYS: health hash, rate key, daily quota key, monthly quota key.
# ARGV: interval_us (0 = no rate limit), max_wait_us, wanted, daily_quota, monthly_quota, probe_ms, daily_ttl_s,
# monthly_ttl_s. Returns {granted, wait_or_retry_us, probe, reason}. Every check happens before any write, so
# a refusal never leaves a reservation (or a probe slot) behind.
_ACQUIRE = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local daily_quota = tonumber(ARGV[4])
local monthly_quota = tonumber(ARGV[5])
local f = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'probe_until', 'throttled_until')
local state = f[1] or 'closed'
local probe = 0
if state == 'open' then
  local open_until = tonumber(f[2] or '0')
  if now_ms < open_until then return {0, (open_until - now_ms) * 1000, 0, 'breaker_open'} end
  probe = 1
elseif state == 'half_open' then
  local probe_until = tonumber(f[3] or '0')
  if now_ms < probe_until then return {0, (probe_until - now_ms) * 1000, 0, 'probe_in_flight'} end
  probe = 1
end
local throttled_until = tonumber(f[4] or '0')
if now_ms < throttled_until then return {0, (throttled_until - now_ms) * 1000, 0, 'throttled'} end
local granted = wanted
if probe == 1 then granted = 1 end
if daily_quota > 0 then
  local room = daily_quota - tonumber(redis.call('GET', KEYS[3]) or '0')
  if room < granted then granted = room end
end
if monthly_quota > 0 then
  local room = monthly_quota - tonumber(redis.call('GET', KEYS[4]) or '0')
  if room < granted then granted = room end
end
if granted <= 0 then return {0, 0, 0, 'quota'} end
local wait = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now_us then tat = now_us end
  wait = tat - now_us
  if wait > max_wait then return {0, wait - max_wait, 0, 'rate'} end
  local new_tat = tat + interval
  redis.call('SET', KEYS[2], new_tat, 'PX', math.ceil((new_tat - now_us) / 1000) + 1000)
end
if probe == 1 then
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', now_ms + tonumber(ARGV[6]))
end
redis.call('INCRBY', KEYS[3], granted)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
redis.call('INCRBY', KEYS[4], granted)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
return {granted, wait, probe, 'ok'}
"""

# KEYS: health hash. ARGV: kind (ok | fail | throttle | release), latency_ms (-1 = none), alpha,
# consecutive_threshold, rate_threshold, min_samples, window_s, open_ms, throttle_ms, was_probe (1/0), tail_alpha,
# tail_prior_var.
# The window is a ring of window_s slots "w<sec mod window>" = "<sec>:<ok>:<fail>", so it never grows.
_RECORD = """
local h = KEYS[1]
local kind = ARGV[1]
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[7])
local was_probe = ARGV[10] == '1'
local state = redis.call('HGET', h, 'state') or 'closed'
if kind == 'release' then
  if was_probe and state == 'half_open' then redis.call('HSET', h, 'probe_until', 0) end
  return state
end
if kind == 'throttle' then
  local paused_until = now_ms + tonumber(ARGV[9])
  if paused_until > tonumber(redis.call('HGET', h, 'throttled_until') or '0') then
    redis.call('HSET', h, 'throttled_until', paused_until)
  end
  if was_probe and state == 'half_open' then redis.call('HSET', h, 'probe_until', 0) end
  return state
end
local slot = 'w' .. (now_s % window)
local ok, fail = 0, 0
local raw = redis.call('HGET', h, slot)
if raw then
  local sec, o, x = string.match(raw, '(%d+):(%d+):(%d+)')
  if tonumber(sec) == now_s then ok, fail = tonumber(o), tonumber(x) end
end
if kind == 'ok' then ok = ok + 1 else fail = fail + 1 end
redis.call('HSET', h, slot, now_s .. ':' .. ok .. ':' .. fail)
local total_ok, total_fail = 0, 0
local slots = {}
for i = 0, window - 1 do slots[i + 1] = 'w' .. i end
local ring = redis.call('HMGET', h, unpack(slots))
for i = 1, window do
  local r = ring[i]
  if r then
    local sec, o, x = string.match(r, '(%d+):(%d+):(%d+)')
    if tonumber(sec) > now_s - window then
      total_ok = total_ok + tonumber(o)
      total_fail = total_fail + tonumber(x)
    end
  end
end
local consecutive = tonumber(redis.call('HGET', h, 'consecutive') or '0')
local alpha = tonumber(ARGV[3])
if kind == 'ok' then
  consecutive = 0
  local latency = tonumber(ARGV[2])
  if latency >= 0 then
    local lat = tonumber(redis.call('HGET', h, 'lat') or '-1')
    local dev = tonumber(redis.call('HGET', h, 'latdev') or '0')
    if lat < 0 then
      lat = latency
      dev = latency / 2
    else
      local err = latency - lat
      lat = lat + alpha * err
      dev = dev + alpha * (math.abs(err) - dev)
    end
    local ln = math.log(math.max(latency, 0.01))
    local lm = tonumber(redis.call('HGET', h, 'lnlat') or 'none')
    local lv
    if lm == nil then
      lm = ln
      lv = tonumber(ARGV[12])
    else
      local beta = tonumber(ARGV[11])
      local d = ln - lm
      lv = (1 - beta) * (tonumber(redis.call('HGET', h, 'lnvar') or '0') + beta * d * d)
      lm = lm + beta * d
    end
    redis.call('HSET', h, 'lat', lat, 'latdev', dev, 'lnlat', lm, 'lnvar', lv)
  end
  if state == 'half_open' then
    state = 'closed'
    redis.call('HDEL', h, 'open_until', 'probe_until')
    for i = 0, window - 1 do redis.call('HDEL', h, 'w' .. i) end
  end
else
  consecutive = consecutive + 1
  local total = total_ok + total_fail
  if state == 'half_open' or (state == 'closed' and (consecutive >= tonumber(ARGV[4])
      or (total >= tonumber(ARGV[6]) and total_fail / total >= tonumber(ARGV[5])))) then
    state = 'open'
    redis.call('HSET', h, 'open_until', now_ms + tonumber(ARGV[8]), 'probe_until', 0)
    redis.call('HINCRBY', h, 'opened_total', 1)
  end
end
redis.call('HINCRBY', h, 'samples', 1)
redis.call('HSET', h, 'consecutive', consecutive, 'state', state)
return state
"""

ScriptArg = str | int | float


class HealthStore(Protocol):
    """What the board needs of its store: scripts and non-transactional pipelines, as ``redis.asyncio.Redis`` has
    them."""

    def register_script(self, script: str) -> Any:
        """A callable script: ``await script(keys=..., args=..., client=pipeline)`` queues it in the pipeline."""

    def pipeline(self, transaction: bool = True) -> Any:
        """An ``async with`` pipeline with ``time``, ``get``, ``hmget``, ``decrby`` and ``execute``."""

_HEALTH_FIELDS = ("state", "open_until", "probe_until", "throttled_until", "lat", "latdev", "samples", "lnlat",
                  "lnvar")


class HealthBoard:
    """Reads and writes the shared provider state of one mesh (``namespace`` prefixes every key)."""

    def __init__(self, redis: HealthStore, namespace: str, policy: BreakerPolicy | None = None,
                 *, alpha: float = 0.2, tail_alpha: float = 0.01, refresh_s: float = 0.2,
                 clock: Callable[[], float] = time.time, demand: DemandProfile = UNIFORM) -> None:
        """``alpha`` weighs a new latency into the mean and deviation (quick to follow), ``tail_alpha`` into the
        lognormal fit behind ``latency_p99_ms`` (steadier: a tail needs many calls to show); ``demand`` is the
        day's expected shape of sending that ``ProviderHealth.day_share`` follows."""
        self.demand = demand
        self.redis = redis
        self.tail_alpha = tail_alpha
        self.clock = clock
        self.namespace = namespace
        self.policy = policy or BreakerPolicy()
        self.alpha = alpha
        self.refresh_s = refresh_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._record = redis.register_script(_RECORD)
        self._snapshot: dict[str, ProviderHealth] = {}

    # -- keys ----------------------------------------------------------------------------------------------------
    def health_key(self, provider_id: str) -> str:
        """The provider's health hash (breaker, latency, window, throttle pause)."""
        return f"{self.namespace}:ph:{provider_id}"

    def rate_key(self, provider_id: str) -> str:
        """The provider's GCRA "theoretical arrival time", in microseconds of Redis time."""
        return f"{self.namespace}:prl:{provider_id}"

    def quota_keys(self, provider_id: str) -> tuple[str, str]:
        """Today's and this month's quota counters (UTC)."""
        now = time.gmtime(self.clock())
        return (f"{self.namespace}:pq:{provider_id}:d:{time.strftime('%Y%m%d', now)}",
                f"{self.namespace}:pq:{provider_id}:m:{time.strftime('%Y%m', now)}")

    # -- reading -------------------------------------------------------------------------------------------------
    def snapshot(self, provider_id: str) -> ProviderHealth:
        """The provider's state as of the last refresh (a never-seen provider reads as healthy and unmeasured)."""
        return self._snapshot.get(provider_id, ProviderHealth())

    @property
    def snapshots(self) -> Mapping[str, ProviderHealth]:
        """Every provider's state as of the last refresh."""
        return self._snapshot

    async def refresh(self, provider_ids: Iterable[str]) -> Mapping[str, ProviderHealth]:
        """Read every provider's state in one pipelined round trip and make it the current snapshot."""
        ids = list(provider_ids)
        if not ids:
            self._snapshot = {}
            return self._snapshot
        ring = [f"w{i}" for i in range(self.policy.window_s)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for pid in ids:
                daily, monthly = self.quota_keys(pid)
                pipe.hmget(self.health_key(pid), [*_HEALTH_FIELDS, *ring])
                pipe.get(daily)
                pipe.get(monthly)
                pipe.get(self.rate_key(pid))
            replies = await pipe.execute()
        seconds, micros = replies[0]
        now_us = int(seconds) * 1_000_000 + int(micros)
        snapshot = {pid: self._health_from(replies[1 + 4 * i: 5 + 4 * i], now_us) for i, pid in enumerate(ids)}
        self._snapshot = snapshot
        return snapshot

    def _health_from(self, replies: Sequence[object], now_us: int) -> ProviderHealth:
        fields, daily, monthly, tat = replies
        assert isinstance(fields, list)
        breaker = fields[0].decode() if isinstance(fields[0], bytes) else CLOSED
        open_until, probe_until, throttled_until, latency, latdev, samples, log_mean, log_var = (
            _float(v) for v in fields[1:len(_HEALTH_FIELDS)])
        now_ms = now_us / 1000
        now_s = now_us // 1_000_000
        ok = failed = 0
        for raw in fields[len(_HEALTH_FIELDS):]:
            if raw is None:
                continue
            sec, ok_count, fail_count = (int(x) for x in raw.decode().split(":"))
            if sec > now_s - self.policy.window_s:
                ok += ok_count
                failed += fail_count
        open_for = 0.0
        probe_in_flight = False
        if breaker == OPEN:
            if now_ms >= open_until:
                breaker = HALF_OPEN  # cooled down: the next caller becomes the probe
            else:
                open_for = (open_until - now_ms) / 1000
        elif breaker == HALF_OPEN:
            probe_in_flight = now_ms < probe_until
        return ProviderHealth(
            breaker=breaker, probe_in_flight=probe_in_flight, open_for_s=open_for,
            throttled_for_s=max(0.0, (throttled_until - now_ms) / 1000),
            latency_ms_ewma=latency if latency > 0 else 0.0, latency_dev_ms=latdev,
            error_rate=failed / (ok + failed) if ok + failed else 0.0, window_samples=ok + failed,
            samples=int(samples), latency_log_mean=log_mean, latency_log_var=log_var,
            daily_used=int(_float(daily)), monthly_used=int(_float(monthly)),
            rate_backlog_s=max(0.0, (_float(tat) - now_us) / 1_000_000),
            day_share=self.demand.share_by(now_us / 1_000_000 % DAY_S))

    async def run_refresher(self, provider_ids: Callable[[], Iterable[str]], stop: asyncio.Event) -> None:
        """Refresh the snapshot every ``refresh_s`` until ``stop``; Redis trouble keeps the last snapshot."""
        while not stop.is_set():
            try:
                await self.refresh(provider_ids())
            except Exception:
                log.warning("provider health refresh failed", exc_info=True)
            await pause_unless_stopped(stop, self.refresh_s)

    # -- the gate ------------------------------------------------------------------------------------------------
    def _acquire_args(self, provider_id: str, limits: ProviderLimits, emails: int,
                      max_wait_s: float) -> tuple[list[str], list[ScriptArg]]:
        daily, monthly = self.quota_keys(provider_id)
        interval_us = (math.ceil(1_000_000 * (1 + RATE_SAFETY_MARGIN) / limits.rate_per_second)
                       if limits.rate_per_second > 0 else 0)
        return ([self.health_key(provider_id), self.rate_key(provider_id), daily, monthly],
                [interval_us, int(max_wait_s * 1_000_000), max(1, emails), limits.daily_quota,
                 limits.monthly_quota, int(self.policy.probe_timeout_s * 1000), 2 * 86400, 32 * 86400])

    async def acquire(self, provider_id: str, limits: ProviderLimits, *, emails: int = 1,
                      max_wait_s: float = 0.0) -> Permit:
        """May a call carrying ``emails`` emails go to the provider? Reserves quota and a rate slot if so."""
        return (await self.acquire_many([(provider_id, limits, emails, max_wait_s)]))[0]

    async def acquire_many(self, calls: Sequence[tuple[str, ProviderLimits, int, float]]) -> list[Permit]:
        """``acquire`` for several calls in one round trip: (provider id, limits, emails, max wait) each."""
        if not calls:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for provider_id, limits, emails, max_wait_s in calls:
                keys, args = self._acquire_args(provider_id, limits, emails, max_wait_s)
                await self._acquire(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        permits = []
        for granted, micros, probe, reason in replies:
            reason = reason.decode() if isinstance(reason, bytes) else str(reason)
            permits.append(Permit(int(granted), int(micros) / 1_000_000, bool(probe),
                                  None if reason == "ok" else Refusal(reason)))
        return permits

    # -- outcomes ------------------------------------------------------------------------------------------------
    def _record_args(self, outcome: CallHealth, latency_ms: float | None, probe: bool,
                     retry_after_s: float | None) -> list[ScriptArg]:
        p = self.policy
        return [outcome.value, -1 if latency_ms is None else latency_ms, self.alpha, p.consecutive_failures,
                p.failure_rate, p.min_samples, p.window_s, int(p.open_s * 1000),
                int((retry_after_s if retry_after_s is not None else 1.0) * 1000), 1 if probe else 0,
                self.tail_alpha, TAIL_PRIOR_VAR]

    async def record(self, provider_id: str, outcome: CallHealth, *, latency_ms: float | None = None,
                     probe: bool = False, retry_after_s: float | None = None, refund_emails: int = 0) -> str:
        """Record one call's outcome; returns the breaker state after it. ``refund_emails`` gives quota back
        for emails the provider certainly did not take (a throttled or never-sent call)."""
        return (await self.record_many([RecordedCall(provider_id, outcome, latency_ms, probe, retry_after_s,
                                                     refund_emails)]))[0]

    async def record_many(self, calls: Sequence[RecordedCall]) -> list[str]:
        """``record`` for several calls in one round trip; returns each breaker state after its call."""
        if not calls:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                await self._record(keys=[self.health_key(call.provider_id)],
                                   args=self._record_args(call.outcome, call.latency_ms, call.probe,
                                                          call.retry_after_s), client=pipe)
            for call in calls:
                if call.refund_emails:
                    for key in self.quota_keys(call.provider_id):
                        pipe.decrby(key, call.refund_emails)
            replies = await pipe.execute()
        return [r.decode() if isinstance(r, bytes) else str(r) for r in replies[:len(calls)]]


@dataclass(frozen=True)
class RecordedCall:
    """One call's outcome, for ``HealthBoard.record_many``."""

    provider_id: str
    outcome: CallHealth
    latency_ms: float | None = None
    """Only for successful single-email calls: a batch call's time says little about one email's latency."""
    probe: bool = False
    retry_after_s: float | None = None
    """For throttled calls: the pause the provider asked for (1 s when it did not say)."""
    refund_emails: int = 0


def _float(value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bytes):
        return float(value.decode())
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BreakerSettings:
    """``ESP_BREAKER_*`` settings, shared by every service that reads or writes provider health (mix into a
    service's settings dataclass); senders and routers must agree on them."""

    breaker_consecutive_failures: int = 5
    breaker_failure_rate: float = 0.5
    breaker_min_samples: int = 20
    breaker_window_s: int = 30
    breaker_open_s: float = 5.0
    breaker_probe_timeout_s: float = 30.0

    def breaker_policy(self) -> BreakerPolicy:
        """The policy these settings describe (raises ``ValueError`` when out of range)."""
        return BreakerPolicy(self.breaker_consecutive_failures, self.breaker_failure_rate, self.breaker_min_samples,
                             self.breaker_window_s, self.breaker_open_s, self.breaker_probe_timeout_s)
