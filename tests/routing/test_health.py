"""Shared provider health in Redis: circuit breakers, Retry-After pauses, global rate limits and quotas."""

from __future__ import annotations

import asyncio
import time

from libs.routing.health import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    RATE_SAFETY_MARGIN,
    CallHealth,
    HealthBoard,
    ProviderLimits,
    Refusal,
)
from tests.routing.conftest import FAST_BREAKER

NO_LIMITS = ProviderLimits()


async def fail(board: HealthBoard, provider: str, times: int = 1, *, probe: bool = False) -> str:
    state = ""
    for _ in range(times):
        state = await board.record(provider, CallHealth.FAILURE, probe=probe)
    return state


async def open_breaker(board: HealthBoard, provider: str) -> None:
    assert await fail(board, provider, FAST_BREAKER.consecutive_failures) == OPEN


async def cooled_down() -> None:
    await asyncio.sleep(FAST_BREAKER.open_s + 0.05)


async def test_a_provider_never_seen_is_closed_and_lets_calls_through(board: HealthBoard):
    permit = await board.acquire("p", NO_LIMITS)

    assert permit.allowed and not permit.probe and permit.wait_s == 0
    assert (await board.refresh(["p"]))["p"].breaker == CLOSED


async def test_the_breaker_opens_after_the_consecutive_failure_threshold(board: HealthBoard):
    assert await fail(board, "p", FAST_BREAKER.consecutive_failures - 1) == CLOSED
    assert await fail(board, "p") == OPEN

    permit = await board.acquire("p", NO_LIMITS)

    assert not permit.allowed and permit.refusal is Refusal.BREAKER_OPEN
    assert 0 < permit.wait_s <= FAST_BREAKER.open_s


async def test_a_success_resets_the_consecutive_failure_count(board: HealthBoard):
    await fail(board, "p", FAST_BREAKER.consecutive_failures - 1)
    await board.record("p", CallHealth.SUCCESS, latency_ms=5)

    assert await fail(board, "p", FAST_BREAKER.consecutive_failures - 1) == CLOSED


async def test_the_breaker_opens_when_the_failure_rate_over_the_window_passes_its_threshold(board: HealthBoard):
    states = []
    for _ in range(FAST_BREAKER.min_samples // 2):
        states.append(await board.record("p", CallHealth.SUCCESS, latency_ms=5))
        states.append(await board.record("p", CallHealth.FAILURE))

    assert states[:-1] == [CLOSED] * (len(states) - 1)  # never 3 in a row; too few samples until the last
    assert states[-1] == OPEN


async def test_throttling_is_not_a_failure(board: HealthBoard):
    for _ in range(FAST_BREAKER.consecutive_failures * 2):
        await board.record("p", CallHealth.THROTTLED, retry_after_s=0.01)

    assert (await board.refresh(["p"]))["p"].breaker == CLOSED


async def test_throttling_pauses_the_provider_for_everyone_until_retry_after(board: HealthBoard):
    await board.record("p", CallHealth.THROTTLED, retry_after_s=0.4)

    refused = await board.acquire("p", NO_LIMITS)
    await asyncio.sleep(0.45)
    allowed = await board.acquire("p", NO_LIMITS)

    assert refused.refusal is Refusal.THROTTLED and 0.2 < refused.wait_s <= 0.4
    assert allowed.allowed


async def test_an_open_breaker_lets_exactly_one_probe_through_once_cooled_down(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()

    first, second = await board.acquire("p", NO_LIMITS), await board.acquire("p", NO_LIMITS)

    assert first.allowed and first.probe
    assert not second.allowed and second.refusal is Refusal.PROBE_IN_FLIGHT


async def test_a_probe_carries_a_single_email_even_when_asked_for_more(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()

    permit = await board.acquire("p", NO_LIMITS, emails=50)

    assert permit.probe and permit.granted == 1


async def test_a_successful_probe_closes_the_breaker(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()
    probe = await board.acquire("p", NO_LIMITS)

    state = await board.record("p", CallHealth.SUCCESS, latency_ms=3, probe=probe.probe)

    assert state == CLOSED
    assert (await board.acquire("p", NO_LIMITS)).allowed


async def test_a_closed_breaker_starts_with_a_clean_window(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()
    await board.record("p", CallHealth.SUCCESS, latency_ms=3, probe=(await board.acquire("p", NO_LIMITS)).probe)

    assert (await board.refresh(["p"]))["p"].error_rate == 0


async def test_a_failed_probe_opens_the_breaker_again(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()
    probe = await board.acquire("p", NO_LIMITS)

    assert await fail(board, "p", probe=probe.probe) == OPEN
    assert (await board.acquire("p", NO_LIMITS)).refusal is Refusal.BREAKER_OPEN


async def test_a_probe_that_never_reports_frees_the_slot_after_its_timeout(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()
    assert (await board.acquire("p", NO_LIMITS)).probe

    await asyncio.sleep(FAST_BREAKER.probe_timeout_s + 0.05)

    assert (await board.acquire("p", NO_LIMITS)).probe


async def test_a_throttled_probe_gives_the_slot_back(board: HealthBoard):
    await open_breaker(board, "p")
    await cooled_down()
    probe = await board.acquire("p", NO_LIMITS)
    await board.record("p", CallHealth.THROTTLED, probe=probe.probe, retry_after_s=0.05)
    await asyncio.sleep(0.06)

    assert (await board.acquire("p", NO_LIMITS)).probe


async def test_a_success_of_a_call_started_before_the_breaker_opened_does_not_close_it(board: HealthBoard):
    await open_breaker(board, "p")

    assert await board.record("p", CallHealth.SUCCESS, latency_ms=3) == OPEN


async def test_refresh_reads_an_open_breaker_that_cooled_down_as_half_open(board: HealthBoard):
    await open_breaker(board, "p")
    assert (await board.refresh(["p"]))["p"].breaker == OPEN
    await cooled_down()

    health = (await board.refresh(["p"]))["p"]

    assert health.breaker == HALF_OPEN and not health.probe_in_flight
    await board.acquire("p", NO_LIMITS)
    assert (await board.refresh(["p"]))["p"].probe_in_flight


async def test_rate_limited_calls_are_booked_at_least_one_interval_apart(board: HealthBoard):
    limits = ProviderLimits(rate_per_second=20)
    interval = (1 + RATE_SAFETY_MARGIN) / 20
    started = time.monotonic()
    waits = [(await board.acquire("p", limits, max_wait_s=1.0)).wait_s for _ in range(5)]
    elapsed = time.monotonic() - started

    # The i-th call's slot is i intervals after the first; some of that time has passed by the time it asks.
    for i, wait in enumerate(waits):
        assert wait >= i * interval - elapsed
        assert wait <= i * interval + 0.001
    assert waits[0] == 0


async def test_a_rate_slot_beyond_the_callers_wait_limit_is_refused_as_rate_budget_spent(board: HealthBoard):
    limits = ProviderLimits(rate_per_second=10)
    booked = [await board.acquire("p", limits, max_wait_s=0.25) for _ in range(4)]

    assert [p.allowed for p in booked] == [True, True, True, False]
    assert booked[-1].refusal is Refusal.RATE and booked[-1].wait_s > 0


async def test_a_refused_rate_slot_reserves_no_quota(board: HealthBoard):
    limits = ProviderLimits(rate_per_second=1, daily_quota=2)
    assert (await board.acquire("p", limits)).allowed
    assert (await board.acquire("p", limits)).refusal is Refusal.RATE

    assert (await board.refresh(["p"]))["p"].daily_used == 1


async def test_concurrent_callers_never_reserve_more_than_the_daily_quota(board: HealthBoard):
    limits = ProviderLimits(daily_quota=50)

    permits = await asyncio.gather(*(board.acquire("p", limits) for _ in range(90)))

    assert sum(p.granted for p in permits) == 50
    assert {p.refusal for p in permits if not p.allowed} == {Refusal.QUOTA}


async def test_a_batch_is_granted_the_part_of_it_that_fits_the_quota(board: HealthBoard):
    limits = ProviderLimits(daily_quota=10, monthly_quota=12)

    grants = [(await board.acquire("p", limits, emails=n)).granted for n in (4, 8, 1)]

    assert grants == [4, 6, 0]


async def test_the_monthly_quota_is_enforced_like_the_daily_one(board: HealthBoard):
    limits = ProviderLimits(monthly_quota=3)

    assert (await board.acquire("p", limits, emails=5)).granted == 3
    assert (await board.acquire("p", limits)).refusal is Refusal.QUOTA


async def test_a_throttled_call_gives_its_quota_back(board: HealthBoard):
    limits = ProviderLimits(daily_quota=5)
    assert (await board.acquire("p", limits, emails=5)).granted == 5

    await board.record("p", CallHealth.THROTTLED, retry_after_s=0.01, refund_emails=5)
    await asyncio.sleep(0.02)

    assert (await board.acquire("p", limits, emails=5)).granted == 5


async def test_refresh_reports_latency_error_rate_quota_and_rate_backlog(board: HealthBoard):
    limits = ProviderLimits(rate_per_second=2, daily_quota=100)
    for latency in (10, 20):
        await board.acquire("p", limits, max_wait_s=5)
        await board.record("p", CallHealth.SUCCESS, latency_ms=latency)
    await board.record("p", CallHealth.FAILURE)

    health = (await board.refresh(["p"]))["p"]

    assert 10 < health.latency_ms_ewma < 20 and health.latency_tail_ms > health.latency_ms_ewma
    assert health.error_rate == 1 / 3 and health.window_samples == 3
    assert health.daily_used == 2 and health.monthly_used == 2
    assert 0.4 < health.rate_backlog_s <= 2 * (1 + RATE_SAFETY_MARGIN) / 2
