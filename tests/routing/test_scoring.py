"""Ranking providers for one email: eligibility, class weights and the reasons given for every score."""

from __future__ import annotations

import math

from libs.routing.catalog import ProviderSpec
from libs.routing.health import HALF_OPEN, OPEN, ProviderHealth
from libs.routing.scoring import EmailFacts, rank

CAPS = {"postmark": 10_000_000, "sendgrid": 30_000_000}
SLOW_AND_CHEAP = ProviderSpec("slow-cheap", "sendgrid", "http://x", price_per_email_micros=50)
FAST_AND_PRICEY = ProviderSpec("fast-pricey", "sendgrid", "http://x", price_per_email_micros=500)
MEASURED = {"slow-cheap": ProviderHealth(latency_ms_ewma=40, latency_dev_ms=5, samples=50,
                                         latency_log_mean=math.log(40), latency_log_var=0.04),
            "fast-pricey": ProviderHealth(latency_ms_ewma=3, latency_dev_ms=1, samples=50,
                                          latency_log_mean=math.log(3), latency_log_var=0.04)}
BROWNED_OUT = ProviderHealth(latency_ms_ewma=700, latency_dev_ms=150, samples=50, latency_log_mean=math.log(700),
                             latency_log_var=0.25)
"""A p99 of about 2.2 s: beyond otp's objective (1 s), within transactional's (10 s)."""


def email(message_class: str = "bulk", size: int = 20_000, **fields: object) -> EmailFacts:
    return EmailFacts(message_class, size, **fields)  # type: ignore[arg-type]


def order(decision: object) -> list[str]:
    return [s.provider_id for s in decision.ranked]  # type: ignore[attr-defined]


def reason(decision: object, provider_id: str) -> str:
    return next(s.excluded_reason for s in decision.excluded if s.provider_id == provider_id)  # type: ignore


def test_bulk_prefers_the_cheapest_healthy_provider():
    decision = rank([FAST_AND_PRICEY, SLOW_AND_CHEAP], MEASURED, email("bulk"), CAPS)

    assert order(decision) == ["slow-cheap", "fast-pricey"]


def test_otp_prefers_the_cheapest_provider_within_its_latency_objective():
    decision = rank([FAST_AND_PRICEY, SLOW_AND_CHEAP], MEASURED, email("otp"), CAPS)

    assert order(decision) == ["slow-cheap", "fast-pricey"]


def test_otp_leaves_a_cheaper_provider_whose_latency_misses_the_objective():
    browned_out = {**MEASURED, "slow-cheap": BROWNED_OUT}

    decision = rank([SLOW_AND_CHEAP, FAST_AND_PRICEY], browned_out, email("otp"), CAPS)

    assert order(decision) == ["fast-pricey", "slow-cheap"]
    assert "above the class objective of 1000 ms" in decision.ranked[1].below_floor
    assert decision.ranked[1].latency_p99_ms > 1000 and decision.ranked[0].below_floor == ""


def test_transactional_keeps_a_slow_provider_that_is_within_its_own_objective():
    browned_out = {**MEASURED, "slow-cheap": BROWNED_OUT}

    assert order(rank([FAST_AND_PRICEY, SLOW_AND_CHEAP], browned_out, email("transactional"), CAPS))[0] == "slow-cheap"


def test_a_provider_never_measured_counts_as_within_the_objective():
    decision = rank([SLOW_AND_CHEAP, FAST_AND_PRICEY], {"slow-cheap": BROWNED_OUT}, email("otp"), CAPS)

    assert order(decision) == ["fast-pricey", "slow-cheap"]
    assert decision.ranked[0].below_floor == ""


def test_an_unhealthy_provider_ranks_below_a_healthy_one_of_the_same_price():
    a = ProviderSpec("a", "sendgrid", "http://x", price_per_email_micros=100)
    b = ProviderSpec("b", "sendgrid", "http://x", price_per_email_micros=100)
    health = {"a": ProviderHealth(latency_ms_ewma=5, error_rate=0.4, window_samples=50),
              "b": ProviderHealth(latency_ms_ewma=5)}

    assert order(rank([a, b], health, email("transactional"), CAPS)) == ["b", "a"]


def test_a_single_failure_among_few_calls_does_not_turn_routing_around():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=50)
    pricey = ProviderSpec("pricey", "sendgrid", "http://x", price_per_email_micros=100)
    health = {"cheap": ProviderHealth(error_rate=1.0, window_samples=1)}

    decision = rank([pricey, cheap], health, email("transactional"), CAPS)

    assert order(decision) == ["cheap", "pricey"]
    assert 0.9 < decision.ranked[0].health_factor < 1

def test_the_manual_weight_scales_the_score():
    a = ProviderSpec("a", "sendgrid", "http://x", price_per_email_micros=100)
    b = ProviderSpec("b", "sendgrid", "http://x", price_per_email_micros=100, weight=2.0)

    assert order(rank([a, b], {}, email("bulk"), CAPS)) == ["b", "a"]


def test_price_per_megabyte_counts_for_large_emails():
    per_email = ProviderSpec("per-email", "sendgrid", "http://x", price_per_email_micros=300)
    per_mb = ProviderSpec("per-mb", "sendgrid", "http://x", price_per_email_micros=100, price_per_mb_micros=100)

    assert order(rank([per_email, per_mb], {}, email("bulk", size=100_000), CAPS))[0] == "per-mb"
    assert order(rank([per_email, per_mb], {}, email("bulk", size=5_000_000), CAPS))[0] == "per-email"


def test_every_ineligible_provider_is_listed_with_its_reason():
    providers = [
        ProviderSpec("off", "sendgrid", "http://x", disabled=True),
        ProviderSpec("otp-only", "sendgrid", "http://x", allowed_classes=("otp",)),
        ProviderSpec("small", "postmark", "http://x"),
        ProviderSpec("broken", "sendgrid", "http://x"),
        ProviderSpec("probing", "sendgrid", "http://x"),
        ProviderSpec("busy", "sendgrid", "http://x"),
        ProviderSpec("spent", "sendgrid", "http://x", daily_quota=10),
        ProviderSpec("month", "sendgrid", "http://x", monthly_quota=10),
        ProviderSpec("booked", "sendgrid", "http://x", rate_limit_per_second=10),
        ProviderSpec("failed", "sendgrid", "http://x"),
    ]
    health = {"broken": ProviderHealth(breaker=OPEN, open_for_s=3), "probing": ProviderHealth(
        breaker=HALF_OPEN, probe_in_flight=True), "busy": ProviderHealth(throttled_for_s=2),
        "spent": ProviderHealth(daily_used=10), "month": ProviderHealth(monthly_used=10),
        "booked": ProviderHealth(rate_backlog_s=5)}

    decision = rank(providers, health, email("bulk", size=12_000_000, excluded=frozenset({"failed"})), CAPS)

    assert order(decision) == []
    assert reason(decision, "off") == "disabled"
    assert reason(decision, "otp-only") == "does not carry bulk"
    assert "exceeds cap of 10000000" in reason(decision, "small")
    assert reason(decision, "broken").startswith("circuit breaker open")
    assert reason(decision, "probing") == "circuit breaker half-open, probe in flight"
    assert "Retry-After" in reason(decision, "busy")
    assert reason(decision, "spent") == "daily quota exhausted"
    assert reason(decision, "month") == "monthly quota exhausted"
    assert reason(decision, "booked").startswith("rate budget spent")
    assert reason(decision, "failed") == "failed for this email already"


def test_the_registry_size_cap_applies_when_lower_than_the_adapters():
    capped = ProviderSpec("capped", "sendgrid", "http://x", max_message_bytes=1_000_000)

    decision = rank([capped], {}, email("bulk", size=2_000_000), CAPS)

    assert "exceeds cap of 1000000" in reason(decision, "capped")


def test_a_half_open_provider_gets_its_probe_first_for_bulk_and_last_for_otp():
    recovering = ProviderSpec("recovering", "sendgrid", "http://x", price_per_email_micros=500)
    healthy = ProviderSpec("healthy", "sendgrid", "http://x", price_per_email_micros=50)
    health = {"recovering": ProviderHealth(breaker=HALF_OPEN), "healthy": ProviderHealth(latency_ms_ewma=5)}

    bulk = rank([healthy, recovering], health, email("bulk"), CAPS)
    otp = rank([healthy, recovering], health, email("otp"), CAPS)

    assert order(bulk) == ["recovering", "healthy"] and bulk.ranked[0].probe
    assert order(otp) == ["healthy", "recovering"]


def test_a_cheapest_provider_keeps_its_rank_until_its_rate_budget_for_the_class_is_spent():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=50, rate_limit_per_second=10)
    next_cheapest = ProviderSpec("next", "sendgrid", "http://x", price_per_email_micros=70)

    booked = rank([cheap, next_cheapest], {"cheap": ProviderHealth(rate_backlog_s=1.9)}, email("bulk"), CAPS)
    spent = rank([cheap, next_cheapest], {"cheap": ProviderHealth(rate_backlog_s=2.1)}, email("bulk"), CAPS)

    assert order(booked) == ["cheap", "next"]
    assert booked.ranked[0].capacity_factor < 0.6  # the breakdown still shows how full its schedule is
    assert order(spent) == ["next"] and reason(spent, "cheap").startswith("rate budget spent")


def test_a_cheapest_provider_is_used_to_the_last_email_of_its_quota():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=50, daily_quota=1000)
    next_cheapest = ProviderSpec("next", "sendgrid", "http://x", price_per_email_micros=70)

    evening = 0.99  # of the quota day: the quota is on pace
    last = rank([cheap, next_cheapest], {"cheap": ProviderHealth(daily_used=999, day_share=evening)}, email("bulk"),
                CAPS)
    gone = rank([cheap, next_cheapest], {"cheap": ProviderHealth(daily_used=1000, day_share=evening)},
                email("bulk"), CAPS)

    assert order(last) == ["cheap", "next"] and last.ranked[0].remaining_daily_quota == 1
    assert order(gone) == ["next"] and reason(gone, "cheap") == "daily quota exhausted"


def test_a_provider_outside_the_preferred_region_ranks_after_those_inside():
    eu = ProviderSpec("eu", "sendgrid", "http://x", price_per_email_micros=100, region="eu")
    us = ProviderSpec("us", "sendgrid", "http://x", price_per_email_micros=80, region="us")

    assert order(rank([us, eu], {}, email("bulk", region="eu"), CAPS)) == ["eu", "us"]


def test_the_breakdown_explains_the_score():
    decision = rank([FAST_AND_PRICEY, SLOW_AND_CHEAP], MEASURED, email("bulk"), CAPS)
    cheap, pricey = decision.ranked

    assert cheap.expected_cost_micros == 50 and pricey.expected_cost_micros == 500
    assert cheap.cost_factor == 1.0 and pricey.cost_factor == 0.1
    assert pricey.latency_factor == 1.0 and cheap.latency_factor == 3 / 40
    assert cheap.health_factor == 1.0 and cheap.capacity_factor == 1.0
    assert cheap.breaker == "closed" and cheap.remaining_daily_quota == float("inf")
    assert cheap.score > pricey.score


def test_a_provider_ahead_of_its_daily_quota_pace_gives_way_to_one_up_to_twice_its_price():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=60, daily_quota=1000)
    near = ProviderSpec("near", "sendgrid", "http://x", price_per_email_micros=100)
    dear = ProviderSpec("dear", "sendgrid", "http://x", price_per_email_micros=600)
    at_noon = {"cheap": ProviderHealth(daily_used=800, day_share=0.5)}  # 80 % of the quota by half the day

    assert order(rank([cheap, near, dear], at_noon, email("bulk"), CAPS)) == ["near", "cheap", "dear"]
    assert order(rank([cheap, dear], at_noon, email("bulk"), CAPS)) == ["cheap", "dear"]
    on_pace = {"cheap": ProviderHealth(daily_used=500, day_share=0.5)}
    assert order(rank([cheap, near, dear], on_pace, email("bulk"), CAPS)) == ["cheap", "near", "dear"]


def test_bulk_keeps_a_cheap_provider_failing_a_third_of_its_calls_that_transactional_leaves():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=100)
    dear = ProviderSpec("dear", "sendgrid", "http://x", price_per_email_micros=600)
    browning = {"cheap": ProviderHealth(latency_ms_ewma=5, error_rate=0.3, window_samples=40)}

    assert order(rank([dear, cheap], browning, email("bulk"), CAPS)) == ["cheap", "dear"]
    transactional = rank([dear, cheap], browning, email("transactional"), CAPS)
    assert order(transactional) == ["dear", "cheap"]
    assert "below the class floor of 0.9" in transactional.ranked[1].below_floor


def test_a_provider_with_a_daily_quota_is_left_by_bulk_when_failing_a_third_of_its_calls():
    quota = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=100, daily_quota=50_000)
    dear = ProviderSpec("dear", "sendgrid", "http://x", price_per_email_micros=600)
    browning = {"cheap": ProviderHealth(latency_ms_ewma=5, error_rate=0.3, window_samples=40)}

    decision = rank([quota, dear], browning, email("bulk"), CAPS)

    assert order(decision) == ["dear", "cheap"]
    assert "below the daily-quota floor of 0.9" in decision.ranked[1].below_floor


def test_pacing_against_a_demand_profile_keeps_a_quota_for_the_evening():
    cheap = ProviderSpec("cheap", "sendgrid", "http://x", price_per_email_micros=60, daily_quota=1000)
    near = ProviderSpec("near", "sendgrid", "http://x", price_per_email_micros=100)
    # At 15:00, 600 of the quota spent: ahead of a straight line of the day (62.5 %, +5 %)? No; ahead of a day whose
    # evening brings most of the mail (40 % expected by now)? Yes: it gives way to the next cheapest.
    straight = {"cheap": ProviderHealth(daily_used=600, day_share=15 / 24)}
    forecast = {"cheap": ProviderHealth(daily_used=600, day_share=0.4)}

    assert order(rank([cheap, near], straight, email("bulk"), CAPS)) == ["cheap", "near"]
    assert order(rank([cheap, near], forecast, email("bulk"), CAPS)) == ["near", "cheap"]
