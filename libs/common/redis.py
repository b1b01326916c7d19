"""Redis client and the Lua scripts shared by services (rate limits, counters)."""

from __future__ import annotations

import redis.asyncio as aioredis

__all__ = [
    "GCRA_SCRIPT",
    "create_redis",
]


def create_redis(url: str, *, max_connections: int = 200) -> aioredis.Redis:
    """An asyncio Redis client over a blocking pool: past ``max_connections`` callers wait for a free connection
    instead of failing with "Too many connections" (redis-py's default pool raises)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, socket_timeout=5, socket_connect_timeout=5,
        health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


# GCRA (generic cell rate algorithm) in one round trip. KEYS[1] = the limiter key; ARGV = emission interval in
# microseconds (1e6 / rate), burst tolerance in microseconds, cost (cells). Returns {allowed, retry_after_us,
# remaining}. Time comes from the Redis server so every replica agrees.
GCRA_SCRIPT = """
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance - interval
if allow_at > now then
  return {0, allow_at - now, 0}
end
redis.call('SET', key, new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now + tolerance + interval - new_tat) / interval)
return {1, 0, remaining}
"""
