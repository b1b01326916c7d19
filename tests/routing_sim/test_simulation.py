"""The routing lab's simulated day (libs/routing_sim/engine.py), the comparison (comparison.py) and ``esp-routing``
(cli.py), on a tiny market: two providers, about 500 emails a day, hour-long windows, so that a day simulates in
a fraction of a second. No servers: the health board's store is the in-memory one on the simulated clock."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from libs.common.message_classes import MessageClass
from libs.routing import scoring
from libs.routing.health import HealthBoard
from libs.routing_sim import cli, engine, market, policies, scenario, traffic
from libs.routing_sim.comparison import Comparison, compare
from libs.routing_sim.results import PolicyResult
from libs.routing_sim.scenario import Scenario
from services.sender import delivery, outcomes

TINY_TOML = """\
name = "tiny"
description = "Two providers and five hundred emails: the simulation tests' market."
seed = 7
window_minutes = 60

[[providers]]
id = "cheap"
type = "ses"
price_per_email_micros = 100
latency = { median_ms = 100, p99_ms = 500 }
error_rate = 0.01

[[providers]]
id = "dear"
type = "sendgrid"
price_per_email_micros = 600
latency = { median_ms = 80, p99_ms = 400 }
error_rate = 0.01

[traffic]
emails = 500
mix = { otp = 0.2, transactional = 0.3, bulk = 0.5 }
"""
"""The test market as a scenario file (the CLI reads it so); ``tiny`` parses it with changes."""


def tiny(**changes: Any) -> Scenario:
    """The tiny market with top-level tables replaced (``events=[...]``, ``traffic={...}``, ``providers=[...]``)."""
    return scenario.parse({**tomllib.loads(TINY_TOML), **changes})


def simulate(day: Scenario, policy_name: str = "production",
             emails: Sequence[traffic.Arrival] | None = None) -> PolicyResult:
    routing = policies.policy(policy_name, [p.id for p in day.providers])
    return asyncio.run(engine.simulate(day, routing, traffic.arrivals(day) if emails is None else emails))


def without_wall_time(result: PolicyResult) -> PolicyResult:
    return dataclasses.replace(result, wall_s=0.0)


def sent(result: PolicyResult, provider_id: str, windows: range | None = None) -> int:
    return sum(w.sent[provider_id] for i, w in enumerate(result.windows) if windows is None or i in windows)


def test_a_day_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    day = tiny(events=[{"kind": "brownout", "provider": "cheap", "at_h": 9, "until_h": 11}])
    first, again = simulate(day), simulate(day)
    assert first.delivered > 0
    assert without_wall_time(first) == without_wall_time(again)
    other = simulate(dataclasses.replace(day, seed=day.seed + 1))
    assert without_wall_time(other) != without_wall_time(first)


def test_the_simulation_calls_the_functions_the_sender_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # The very objects, not look-alikes: what the lab measures is what the sender runs.
    assert engine.rank is delivery.rank is scoring.rank
    assert engine.after_attempt is delivery.after_attempt is outcomes.after_attempt
    assert engine.recorded_call is delivery.recorded_call is outcomes.recorded_call
    assert engine.unroutable is delivery.unroutable is outcomes.unroutable
    assert engine.unavailable_delay_s is delivery.unavailable_delay_s is outcomes.unavailable_delay_s
    assert engine.HealthBoard is delivery.HealthBoard is HealthBoard

    calls: Counter[str] = Counter()

    def spy(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    def async_spy(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return await function(*args, **kwargs)
        return counted

    monkeypatch.setattr(engine, "rank", spy("rank", engine.rank))
    monkeypatch.setattr(engine, "after_attempt", spy("after_attempt", engine.after_attempt))
    monkeypatch.setattr(engine, "recorded_call", spy("recorded_call", engine.recorded_call))
    monkeypatch.setattr(HealthBoard, "acquire_many", async_spy("acquire_many", HealthBoard.acquire_many))
    monkeypatch.setattr(HealthBoard, "record_many", async_spy("record_many", HealthBoard.record_many))
    result = simulate(tiny())
    assert result.delivered > 0
    assert calls["rank"] >= result.accepted
    assert calls["acquire_many"] >= result.calls
    assert calls["record_many"] == calls["recorded_call"] == calls["after_attempt"] == result.calls


@pytest.mark.parametrize("policy_name", policies.POLICIES)
def test_every_accepted_email_ends_delivered_failed_or_pending(policy_name: str) -> None:
    # Both providers down at noon (OTPs older than their ten minutes fail) and throttled with an hour's
    # Retry-After at the end of the day (some emails are still waiting when the grace period ends).
    events = [{"kind": "outage", "provider": p, "at_h": 12, "until_h": 13} for p in ("cheap", "dear")]
    events += [{"kind": "throttle", "provider": p, "at_h": 23, "until_h": 24, "rate_per_second": 0,
                "retry_after_s": 3000} for p in ("cheap", "dear")]
    result = simulate(tiny(events=events), policy_name)
    assert result.delivered > 0
    assert result.failed > 0
    assert result.pending > 0
    assert result.delivered + result.failed + result.pending == result.accepted


@pytest.mark.parametrize("policy_name", policies.POLICIES)
def test_an_outage_moves_traffic_away_from_the_provider(policy_name: str) -> None:
    day = tiny(events=[{"kind": "outage", "provider": "cheap", "at_h": 10, "until_h": 14}])
    result = simulate(day, policy_name)
    outage = range(10, 14)  # the hour-long windows the outage covers
    assert sent(result, "cheap", outage) == 0
    assert sent(result, "dear", outage) > 0
    assert sent(result, "cheap") > 0  # the cheap provider does carry traffic outside its outage
    assert result.delivered == result.accepted


@pytest.mark.parametrize("policy_name", policies.POLICIES)
def test_an_oversize_email_goes_only_to_a_provider_whose_cap_takes_it(policy_name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 100_000
    raw = tomllib.loads(TINY_TOML)
    raw["providers"][0]["max_message_bytes"] = cap
    # Half the emails carry a 500 kB attachment: over the cheap provider's cap, within the dear one's.
    sizes = {"median_bytes": 20_000, "sigma": 0.0, "attachment_share": 0.5, "attachment_median_bytes": 500_000,
             "attachment_sigma": 0.0}
    day = tiny(providers=raw["providers"],
               traffic={"emails": 500, "mix": {"transactional": 1.0}, "sizes": {"transactional": sizes}})
    emails = traffic.arrivals(day)
    assert any(e.size_bytes > cap for e in emails) and any(e.size_bytes <= cap for e in emails)

    # The engine ranks an email, then calls a provider for it before it ranks the next one (a day is one
    # sequence of events), so each call carries the size of the email ranked last.
    ranked_size = [0]
    calls: list[tuple[int, str]] = []
    rank, call = engine.rank, market.Market.call

    def ranking(catalog: Any, snapshots: Any, facts: scoring.EmailFacts) -> scoring.RouteDecision:
        ranked_size[0] = facts.message_bytes
        return rank(catalog, snapshots, facts)

    def calling(self: market.Market, provider_id: str, at_s: float) -> Any:
        calls.append((ranked_size[0], provider_id))
        return call(self, provider_id, at_s)

    monkeypatch.setattr(engine, "rank", ranking)
    monkeypatch.setattr(market.Market, "call", calling)
    result = simulate(day, policy_name, emails)
    assert {provider for size, provider in calls if size > cap} == {"dear"}
    assert "cheap" in {provider for size, provider in calls if size <= cap}
    assert result.delivered == result.accepted


def test_the_comparison_ratios_are_computed_from_the_results() -> None:
    day = tiny(events=[{"kind": "outage", "provider": "cheap", "at_h": 10, "until_h": 12}])
    result = asyncio.run(compare(day))
    assert set(result.results) == set(policies.POLICIES)
    assert {r.accepted for r in result.results.values()} == {len(traffic.arrivals(day))}
    production, oracle = result.results["production"], result.oracle
    round_robin, cheapest = result.results["round_robin"], result.results["cheapest_first"]
    assert result.cost_vs_oracle == pytest.approx(
        (production.cost_micros / production.delivered) / (oracle.cost_micros / oracle.delivered))
    assert result.cost_vs_round_robin == pytest.approx(
        (production.cost_micros / production.delivered) / (round_robin.cost_micros / round_robin.delivered))
    assert result.delivered_ratio == production.delivered / production.accepted
    assert result.delivered_vs_cheapest_first == pytest.approx(
        (production.delivered / production.accepted) / (cheapest.delivered / cheapest.accepted))
    assert result.otp_p99_ms == production.latency_ms["otp"]["p99"]
    assert result.meets_targets() == {
        "cost_vs_oracle": result.cost_vs_oracle <= 1.05,
        "delivered_ratio": result.delivered_ratio >= 0.9999,
        "otp_p99_ms": result.otp_p99_ms <= MessageClass.OTP.policy.routing.latency_objective_s * 1000,
        "cost_vs_round_robin": result.cost_vs_round_robin < 1,
        "delivered_vs_cheapest_first": result.delivered_vs_cheapest_first >= 1,
    }


def test_the_comparison_always_runs_production_and_leaves_out_targets_of_baselines_not_run() -> None:
    result: Comparison = asyncio.run(compare(tiny(), ("static_priority",)))
    assert list(result.results) == ["production", "static_priority"]
    assert math.isnan(result.cost_vs_round_robin)
    assert math.isnan(result.delivered_vs_cheapest_first)
    assert set(result.meets_targets()) == {"cost_vs_oracle", "delivered_ratio", "otp_p99_ms"}


def test_cli_simulate_prints_the_table_and_writes_the_report(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(TINY_TOML)
    report = tmp_path / "r.html"
    assert cli.main(["simulate", "--scenario", str(scenario_file), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "production" in out
    assert "oracle" in out
    assert "cost_vs_oracle" in out  # the target checks
    assert str(report.resolve()) in out
    assert report.read_text().startswith("<!DOCTYPE html>")


def test_cli_simulate_writes_the_report_in_the_current_directory_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(TINY_TOML)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["simulate", "--scenario", str(scenario_file), "--policy", "production", "--seed", "3"]) == 0
    assert (tmp_path / "routing-report-tiny.html").is_file()
    assert "not run" in capsys.readouterr().out  # the baselines' targets, as they were not simulated


def test_cli_names_the_broken_field_of_a_scenario_and_exits_2(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(TINY_TOML.replace("p99_ms = 500", "p99_ms = 50"))
    assert cli.main(["simulate", "--scenario", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "providers[0].latency.p99_ms" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_lists_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["scenarios"]) == 0
    out = capsys.readouterr().out
    shipped = scenario.shipped()
    assert shipped
    for path in shipped:
        assert path.stem in out
        assert scenario.load(path).description in out
