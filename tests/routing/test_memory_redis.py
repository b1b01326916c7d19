"""The routing lab's in-memory Redis answers the health board exactly as a real Redis does: the same sequence of
board calls, run against both, reads back the same state (times compared within a few milliseconds, since the
real one reads Redis's clock)."""

from __future__ import annotations

import secrets
import time
from dataclasses import astuple

import redis.asyncio as aioredis

from libs.routing.health import CallHealth, HealthBoard, ProviderHealth, ProviderLimits, RecordedCall
from libs.routing.memory_redis import MemoryRedis
from tests.routing.conftest import FAST_BREAKER

TIME_FIELDS = {"open_for_s", "throttled_for_s", "rate_backlog_s", "day_share"}


async def _story(board: HealthBoard) -> list[object]:
    """Quota, rate slots, latency, failures opening the breaker, a throttle: every answer and snapshot."""
    seen: list[object] = []
    quota = ProviderLimits(daily_quota=3, monthly_quota=10)
    seen.extend(await board.acquire_many([("q", quota, 2, 0.0), ("q", quota, 2, 0.0), ("q", quota, 1, 0.0)]))
    rated = ProviderLimits(rate_per_second=10)
    seen.extend(await board.acquire_many([("r", rated, 1, 0.5)] * 7))
    seen.append(await board.record_many([RecordedCall("l", CallHealth.SUCCESS, ms) for ms in (100, 300, 50, 80)]))
    seen.append(await board.record_many([RecordedCall("f", CallHealth.SUCCESS, 10.0)]
                                        + [RecordedCall("f", CallHealth.FAILURE)] * 3))
    seen.append(await board.acquire("f", ProviderLimits()))
    seen.append(await board.record("t", CallHealth.THROTTLED, retry_after_s=2.0, refund_emails=0))
    seen.append(await board.acquire("t", ProviderLimits()))
    seen.append(await board.record("q", CallHealth.NOT_SENT, refund_emails=2))
    snapshot = await board.refresh(["q", "r", "l", "f", "t", "never"])
    seen.extend((pid, _comparable(h)) for pid, h in sorted(snapshot.items()))
    return seen


def _comparable(health: ProviderHealth) -> tuple[object, ...]:
    return tuple(round(v, 2) if name in TIME_FIELDS else v
                 for name, v in zip(ProviderHealth.__dataclass_fields__, astuple(health), strict=True))


async def test_the_board_reads_the_same_state_from_memory_as_from_redis(redis_client: aioredis.Redis,
                                                                         run_id: str) -> None:
    real = await _story(HealthBoard(redis_client, f"{run_id}{secrets.token_hex(3)}", FAST_BREAKER))
    memory = await _story(HealthBoard(MemoryRedis(time.time), "memory", FAST_BREAKER))
    assert len(real) == len(memory)
    for mine, theirs in zip(memory, real, strict=True):
        if hasattr(mine, "wait_s"):  # a permit: the rate slot waits differ by the microseconds between the calls
            assert (mine.granted, mine.probe, mine.refusal) == (theirs.granted, theirs.probe, theirs.refusal)
            assert abs(mine.wait_s - theirs.wait_s) < 0.005
        else:
            assert mine == theirs


async def test_the_memory_store_runs_on_the_clock_it_is_given() -> None:
    now = [1_700_000_000.0]
    board = HealthBoard(MemoryRedis(lambda: now[0]), "sim", FAST_BREAKER, clock=lambda: now[0])
    await board.record_many([RecordedCall("p", CallHealth.FAILURE)] * FAST_BREAKER.consecutive_failures)
    assert (await board.acquire("p", ProviderLimits())).allowed is False
    now[0] += FAST_BREAKER.open_s + 0.01
    permit = await board.acquire("p", ProviderLimits())
    assert permit.allowed and permit.probe


async def test_quota_counters_follow_the_injected_day() -> None:
    now = [1_700_000_000.0 - 1_700_000_000.0 % 86400 + 86399.0]  # one second before a UTC midnight
    board = HealthBoard(MemoryRedis(lambda: now[0]), "sim", FAST_BREAKER, clock=lambda: now[0])
    limits = ProviderLimits(daily_quota=1)
    assert (await board.acquire("p", limits)).allowed
    assert not (await board.acquire("p", limits)).allowed
    now[0] += 2
    assert (await board.acquire("p", limits)).allowed
