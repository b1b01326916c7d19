"""Per-tenant, per-class rate limits (GCRA in Redis, one round trip) and the daily send quota."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from libs.common.errors import QuotaViolation, ResourceExhausted
from libs.common.redis import GCRA_SCRIPT

# Reserved for the daily counter's first use: the counter outlives the day by an hour so late retries see it.
_DAY_S = 86400


@dataclass(frozen=True)
class RateDefaults:
    """Platform defaults, used where a tenant has no setting of its own."""

    otp_per_second: float = 200.0
    transactional_per_second: float = 500.0
    bulk_per_second: float = 2000.0
    burst_seconds: float = 1.0
    """How many seconds' worth of sends may arrive at once."""

    def for_class(self, message_class: str) -> float:
        return {"otp": self.otp_per_second, "transactional": self.transactional_per_second,
                "bulk": self.bulk_per_second}[message_class]


# Daily quota check-and-count in one step: refuse without counting when the quota would be exceeded.
_QUOTA_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
if quota > 0 and used + cost > quota then return {0, used} end
used = redis.call('INCRBY', KEYS[1], cost)
if used == cost then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
return {1, used}
"""


class SendLimiter:
    """Applies tenant rate limits and daily quotas; over-limit raises RESOURCE_EXHAUSTED with RetryInfo."""

    def __init__(self, redis: aioredis.Redis, namespace: str, defaults: RateDefaults | None = None) -> None:
        self.redis = redis
        self.namespace = namespace
        self.defaults = defaults or RateDefaults()
        self._gcra = redis.register_script(GCRA_SCRIPT)
        self._quota = redis.register_script(_QUOTA_SCRIPT)

    async def check_rate(self, tenant_id: str, message_class: str, rate_per_second: float, cost: int = 1) -> None:
        rate = rate_per_second or self.defaults.for_class(message_class)
        interval_us = 1_000_000 / rate
        tolerance_us = interval_us * max(1.0, rate * self.defaults.burst_seconds)
        key = f"{self.namespace}:rl:{tenant_id}:{message_class}"
        allowed, retry_us, _remaining = await self._gcra(keys=[key], args=[interval_us, tolerance_us, cost])
        if not allowed:
            retry_s = max(0.001, int(retry_us) / 1_000_000)
            raise ResourceExhausted(
                f"rate limit of {rate:g} {message_class} emails/s exceeded", reason="RATE_LIMITED",
                metadata={"limit_per_second": f"{rate:g}", "message_class": message_class},
                retry_after_s=retry_s,
                quota_violations=[QuotaViolation(f"tenants/{tenant_id}/{message_class}",
                                                 f"{rate:g} emails per second")],
            )

    async def count_daily(self, tenant_id: str, daily_quota: int, cost: int = 1) -> None:
        day = time.strftime("%Y%m%d", time.gmtime())
        key = f"{self.namespace}:quota:{tenant_id}:{day}"
        allowed, used = await self._quota(keys=[key], args=[cost, daily_quota, _DAY_S + 3600])
        if not allowed:
            seconds_to_midnight = _DAY_S - int(time.time()) % _DAY_S
            raise ResourceExhausted(
                f"daily quota of {daily_quota} emails reached", reason="DAILY_QUOTA_EXCEEDED",
                metadata={"daily_quota": str(daily_quota), "used": str(used)},
                retry_after_s=float(seconds_to_midnight),
                quota_violations=[QuotaViolation(f"tenants/{tenant_id}", f"{daily_quota} emails per UTC day")],
            )

    async def refund_daily(self, tenant_id: str, cost: int = 1) -> None:
        """Give back quota counted for a request that was then refused (so refusals don't eat the quota)."""
        day = time.strftime("%Y%m%d", time.gmtime())
        await self.redis.decrby(f"{self.namespace}:quota:{tenant_id}:{day}", cost)
