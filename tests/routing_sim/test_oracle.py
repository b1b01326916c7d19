"""The hindsight oracle on small markets whose optimum is known by hand, and on a shipped scenario."""

from __future__ import annotations

from typing import Any

import pytest

from libs.routing_sim import oracle, scenario, traffic
from libs.routing_sim.results import OracleResult
from libs.routing_sim.scenario import Scenario
from libs.routing_sim.traffic import Arrival

WINDOW_S = 900.0  # the default 15-minute window


def provider(provider_id: str, price: int, **extra: Any) -> dict[str, Any]:
    """A provider table: type ses (40 MiB cap), fast, reliable and unlimited unless ``extra`` says otherwise."""
    return {"id": provider_id, "type": "ses", "price_per_email_micros": price,
            "latency": {"median_ms": 100, "p99_ms": 500}, **extra}


def market(*providers: dict[str, Any], events: tuple[dict[str, Any], ...] = (),
           mix: dict[str, float] | None = None) -> Scenario:
    return scenario.parse({"name": "test", "providers": list(providers), "events": list(events),
                           "traffic": {"emails": 1, "mix": mix or {"transactional": 1.0}}})


def emails(*batches: tuple[int, float, str, int]) -> list[Arrival]:
    """Arrivals from (count, at_s, class, size_bytes) batches, spread over the second after ``at_s``."""
    result: list[Arrival] = []
    for count, at_s, message_class, size in batches:
        result.extend(Arrival(len(result), at_s + i / count, message_class, size) for i in range(count))
    return result


def sent(result: OracleResult, provider_id: str, window: int | None = None) -> float:
    return sum(v for (w, p), v in result.allocation.items() if p == provider_id and window in (None, w))


def test_cheap_quota_is_used_up_then_the_dear_provider_takes_the_rest() -> None:
    day = market(provider("cheap", 100, daily_quota=10), provider("dear", 300))
    result = oracle.solve(day, emails((15, 0.0, "transactional", 10_000)))
    assert result.status == "optimal"
    assert result.cost_micros == pytest.approx(10 * 100 + 5 * 300)
    assert sent(result, "cheap") == pytest.approx(10)
    assert sent(result, "dear") == pytest.approx(5)
    assert result.delivered == pytest.approx(15)
    assert result.undeliverable == pytest.approx(0)


def test_otp_avoids_a_cheap_provider_whose_p99_exceeds_the_objective() -> None:
    day = market(provider("slow", 100, latency={"median_ms": 300, "p99_ms": 1500}), provider("fast", 500),
                 mix={"otp": 1.0})
    result = oracle.solve(day, emails((4, 0.0, "otp", 3_000)))
    assert sent(result, "slow") == 0
    assert result.cost_micros == pytest.approx(4 * 500)


def test_the_slow_provider_still_carries_other_classes() -> None:
    day = market(provider("slow", 100, latency={"median_ms": 300, "p99_ms": 1500}), provider("fast", 500),
                 mix={"otp": 0.5, "transactional": 0.5})
    result = oracle.solve(day, emails((4, 0.0, "otp", 3_000), (6, 1.0, "transactional", 3_000)))
    assert sent(result, "slow") == pytest.approx(6)
    assert result.cost_micros == pytest.approx(4 * 500 + 6 * 100)


def test_otp_avoids_a_provider_while_a_brownout_slows_it_past_the_objective() -> None:
    brownout = {"kind": "brownout", "provider": "cheap", "at_h": 0.0, "until_h": 0.25, "latency_factor": 4.0,
                "error_rate": 0.0}
    day = market(provider("cheap", 100), provider("dear", 500), events=(brownout,), mix={"otp": 1.0})
    result = oracle.solve(day, emails((3, 0.0, "otp", 3_000), (2, WINDOW_S, "otp", 3_000)))
    assert sent(result, "cheap", 0) == 0  # 500 ms x 4 = 2 s > 1 s
    assert sent(result, "cheap", 1) == pytest.approx(2)  # the brown-out is over
    assert result.cost_micros == pytest.approx(3 * 500 + 2 * 100)


def test_otp_takes_a_partly_slow_provider_only_for_codes_arriving_while_it_is_fast() -> None:
    # The brown-out covers the second half of window 0: OTPs cannot wait for it to end.
    brownout = {"kind": "brownout", "provider": "cheap", "at_h": 0.125, "until_h": 0.25, "latency_factor": 4.0,
                "error_rate": 0.0}
    day = market(provider("cheap", 100), provider("dear", 500), events=(brownout,), mix={"otp": 1.0})
    result = oracle.solve(day, emails((2, 10.0, "otp", 3_000), (3, 600.0, "otp", 3_000)))
    assert sent(result, "cheap") == pytest.approx(2)
    assert sent(result, "dear") == pytest.approx(3)


def test_an_email_over_a_providers_size_cap_goes_elsewhere() -> None:
    day = market(provider("cheap", 100, max_message_bytes=1_000_000), provider("dear", 300, price_per_mb_micros=50))
    result = oracle.solve(day, emails((1, 0.0, "transactional", 2_000_000), (1, 1.0, "transactional", 900_000)))
    assert sent(result, "cheap") == pytest.approx(1)  # the small one
    assert sent(result, "dear") == pytest.approx(1)
    assert result.cost_micros == pytest.approx(100 + (300 + 50 * 2.0))


def test_a_provider_that_does_not_carry_the_class_gets_none_of_it() -> None:
    day = market(provider("cheap", 100, classes=["bulk"]), provider("dear", 300))
    result = oracle.solve(day, emails((5, 0.0, "transactional", 10_000)))
    assert sent(result, "cheap") == 0
    assert result.cost_micros == pytest.approx(5 * 300)


def test_an_outage_window_sends_nothing_to_that_provider() -> None:
    outage = {"kind": "outage", "provider": "cheap", "at_h": 0.0, "until_h": 0.25}
    day = market(provider("cheap", 100), provider("dear", 300), events=(outage,))
    result = oracle.solve(day, emails((5, 0.0, "transactional", 10_000), (5, WINDOW_S, "transactional", 10_000)))
    assert sent(result, "cheap", 0) == 0
    assert sent(result, "cheap", 1) == pytest.approx(5)
    assert result.cost_micros == pytest.approx(5 * 300 + 5 * 100)


def test_a_partial_outage_scales_the_rate_limited_capacity() -> None:
    # 0.02 calls/s x 450 s left of the window = 9 calls.
    outage = {"kind": "outage", "provider": "cheap", "at_h": 0.0, "until_h": 0.125}
    day = market(provider("cheap", 100, rate_limit_per_second=0.02), provider("dear", 300), events=(outage,))
    result = oracle.solve(day, emails((12, 0.0, "transactional", 10_000)))
    assert sent(result, "cheap") == pytest.approx(9)
    assert sent(result, "dear") == pytest.approx(3)


def test_a_quota_cut_mid_day_caps_the_cumulative_sends() -> None:
    cut = {"kind": "quota_cut", "provider": "cheap", "at_h": 1.0, "daily_quota": 6}
    day = market(provider("cheap", 100, daily_quota=8), provider("dear", 300), events=(cut,))
    result = oracle.solve(day, emails((10, 0.0, "transactional", 10_000), (10, 2 * 3600.0, "transactional", 10_000)))
    assert sent(result, "cheap") == pytest.approx(6)
    assert result.cost_micros == pytest.approx(6 * 100 + 14 * 300)


def test_the_quota_before_a_cut_holds_the_windows_before_it() -> None:
    # A cut that raises the quota: the morning is held to the old 4, the day to the new 20.
    cut = {"kind": "quota_cut", "provider": "cheap", "at_h": 1.0, "daily_quota": 20}
    day = market(provider("cheap", 100, daily_quota=4), provider("dear", 300), events=(cut,))
    result = oracle.solve(day, emails((10, 0.0, "transactional", 10_000), (10, 2 * 3600.0, "transactional", 10_000)))
    assert sent(result, "cheap", 0) == pytest.approx(4)
    assert sent(result, "cheap", 8) == pytest.approx(10)


def test_after_a_price_change_the_other_provider_becomes_cheaper() -> None:
    change = {"kind": "price_change", "provider": "a", "at_h": 1.0, "price_per_email_micros": 300}
    day = market(provider("a", 100), provider("b", 200), events=(change,))
    result = oracle.solve(day, emails((5, 0.0, "transactional", 10_000), (5, 3600.0, "transactional", 10_000)))
    assert sent(result, "a", 0) == pytest.approx(5)
    assert sent(result, "b", 4) == pytest.approx(5)
    assert result.cost_micros == pytest.approx(5 * 100 + 5 * 200)
    assert result.cost_by_window[(4, "b")] == pytest.approx(5 * 200)


def test_a_price_change_mid_window_is_pro_rated() -> None:
    # Half of window 4 at 100, half at 500: 300 on average, dearer than b's 250 (the start price would be 100).
    change = {"kind": "price_change", "provider": "a", "at_h": 1.125, "price_per_email_micros": 500}
    day = market(provider("a", 100), provider("b", 250), events=(change,))
    result = oracle.solve(day, emails((5, 3600.0, "transactional", 10_000)))
    assert sent(result, "b") == pytest.approx(5)


def test_a_rate_limit_spills_the_excess_to_the_next_provider() -> None:
    # 0.01 calls/s x 900 s = 9 calls in the window.
    day = market(provider("cheap", 100, rate_limit_per_second=0.01), provider("mid", 200), provider("dear", 300))
    result = oracle.solve(day, emails((12, 0.0, "transactional", 10_000)))
    assert sent(result, "cheap") == pytest.approx(9)
    assert sent(result, "mid") == pytest.approx(3)
    assert sent(result, "dear") == 0


def test_a_throttle_lowers_the_rate_limit_while_it_lasts() -> None:
    throttle = {"kind": "throttle", "provider": "cheap", "at_h": 0.0, "until_h": 0.25, "rate_per_second": 0.005}
    day = market(provider("cheap", 100, rate_limit_per_second=0.01), provider("dear", 300), events=(throttle,))
    result = oracle.solve(day, emails((12, 0.0, "transactional", 10_000)))
    assert sent(result, "cheap") == pytest.approx(4.5)


def test_failed_calls_count_against_the_quota_but_cost_nothing() -> None:
    # 10 % of calls fail: 9 calls deliver 8.1 emails.
    day = market(provider("cheap", 100, daily_quota=9, error_rate=0.1), provider("dear", 300))
    result = oracle.solve(day, emails((12, 0.0, "transactional", 10_000)))
    assert sent(result, "cheap") == pytest.approx(8.1)
    assert result.cost_micros == pytest.approx(8.1 * 100 + 3.9 * 300)


def test_infeasible_demand_is_reported_undeliverable() -> None:
    day = market(provider("a", 100, rate_limit_per_second=0.01), provider("b", 300, rate_limit_per_second=0.01))
    result = oracle.solve(day, emails((20, 0.0, "transactional", 10_000)))
    assert result.status == "optimal"
    assert result.delivered == pytest.approx(18)
    assert result.undeliverable == pytest.approx(2)
    assert result.cost_micros == pytest.approx(9 * 100 + 9 * 300)  # no penalty in the reported cost


def test_an_email_no_provider_can_take_is_undeliverable() -> None:
    day = market(provider("a", 100), provider("b", 300))
    result = oracle.solve(day, emails((1, 0.0, "transactional", 50 * 1024 * 1024), (1, 1.0, "transactional", 1_000)))
    assert result.undeliverable == pytest.approx(1)
    assert result.cost_micros == pytest.approx(100)


def test_no_emails_cost_nothing() -> None:
    day = market(provider("a", 100), provider("b", 300))
    result = oracle.solve(day, [])
    assert (result.status, result.cost_micros, result.delivered) == ("optimal", 0, 0)
    assert len(result.allocation) == day.windows * 2


def test_the_shipped_cheap_quota_scenario_solves_to_optimal() -> None:
    day = scenario.load(scenario.SHIPPED_SCENARIOS / "cheap-quota-runs-out.toml")
    arrivals = traffic.arrivals(day)
    result = oracle.solve(day, arrivals)
    print(f"\n{day.name}: {len(arrivals)} emails solved in {result.wall_s:.3f} s, "
          f"cost {result.cost_micros / 1e6:.2f} units, undeliverable {result.undeliverable:g}")
    assert result.status == "optimal"
    assert result.delivered + result.undeliverable == pytest.approx(len(arrivals))
    assert sent(result, "relay") <= 22_000
