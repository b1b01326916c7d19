"""The demand profile the lab's router paces quotas against (``traffic.demand_profile``): the traffic model's
expected shape of the day, as the platform team would configure it, blind to the market's events."""

from __future__ import annotations

import dataclasses

import pytest

from libs.routing_sim import scenario, traffic

BLACK_FRIDAY = scenario.load(next(p for p in scenario.shipped() if p.stem == "black-friday"))


def test_the_forecast_knows_the_evening_spike_and_the_campaigns() -> None:
    profile = traffic.demand_profile(BLACK_FRIDAY)
    hourly = [profile.share_by((h + 1) * 3600.0) - profile.share_by(h * 3600.0) for h in range(24)]

    assert hourly[19] > 4 * hourly[17]  # the 6x spike and the 12,000-email campaign at 19:30
    assert hourly[10] > 2 * hourly[9]  # the 8,000-email campaign at 10:00
    assert profile.share_by(19 * 3600.0) == pytest.approx(0.51, abs=0.02)


def test_the_forecast_does_not_know_the_markets_events() -> None:
    calm = dataclasses.replace(BLACK_FRIDAY, events=())

    assert traffic.demand_profile(calm) == traffic.demand_profile(BLACK_FRIDAY)
