"""One scenario's day under every routing policy and the hindsight oracle, and the issue's targets for production.

``compare`` draws the day's emails once and hands the very same list to every policy and to the oracle, so their
figures differ by routing alone. ``Comparison`` holds the results and derives the ratios the bench prints and the
CLI checks: production's cost per delivered email against the oracle's and round-robin's, its delivered share
against cheapest-first's, and its OTP p99 against the class's latency objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from libs.common.message_classes import MessageClass
from libs.routing_sim import engine, oracle, policies, traffic
from libs.routing_sim.results import OracleResult, PolicyResult
from libs.routing_sim.scenario import Scenario
from libs.routing_sim.traffic import Arrival

__all__ = [
    "CHEAPEST_FIRST",
    "MAX_COST_VS_ORACLE",
    "MIN_DELIVERED_RATIO",
    "PRODUCTION",
    "ROUND_ROBIN",
    "TARGETS",
    "Comparison",
    "compare",
    "otp_objective_ms",
]

PRODUCTION = "production"
ROUND_ROBIN = "round_robin"
CHEAPEST_FIRST = "cheapest_first"

MAX_COST_VS_ORACLE = 1.05
"""Production may pay at most 5 % more per delivered email than the hindsight optimum."""
MIN_DELIVERED_RATIO = 0.9999
"""Production must deliver at least 99.99 % of the accepted emails within the day (and its grace period)."""

TARGETS = ("cost_vs_oracle", "delivered_ratio", "otp_p99_ms", "cost_vs_round_robin", "delivered_vs_cheapest_first")
"""The targets ``Comparison.meets_targets`` checks, each named after the property it checks."""

Progress = Callable[[str, float], None]
"""Called after each policy's day and after the oracle with its name and the real seconds it took."""


def otp_objective_ms() -> float:
    """The OTP class's p99 objective in milliseconds (the same figure alerting and the oracle hold OTPs to)."""
    return MessageClass.OTP.policy.routing.latency_objective_s * 1000


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; two zeros are equal (1.0), and anything over a zero is infinitely worse."""
    if denominator:
        return numerator / denominator
    return 1.0 if not numerator else math.inf


@dataclass(frozen=True)
class Comparison:
    """The policies' days and the oracle's optimum for one scenario, over the same emails.

    ``results`` always holds ``production``; a ratio against a baseline that was not run is NaN, and
    ``meets_targets`` leaves its target out.
    """

    scenario: Scenario
    results: Mapping[str, PolicyResult]
    oracle: OracleResult

    @property
    def production(self) -> PolicyResult:
        """Production's day."""
        return self.results[PRODUCTION]

    @property
    def cost_vs_oracle(self) -> float:
        """Production's cost per delivered email ÷ the oracle's (1.0 is the best possible)."""
        return _ratio(self.production.cost_per_delivered_micros, self.oracle.cost_per_delivered_micros)

    @property
    def delivered_ratio(self) -> float:
        """Production's delivered share of the accepted emails."""
        return self.production.delivered_ratio

    @property
    def otp_p99_ms(self) -> float:
        """Production's OTP p99 from acceptance to a provider accepting (NaN when no OTP was delivered)."""
        return self.production.latency_ms.get(MessageClass.OTP.value, {}).get("p99", math.nan)

    @property
    def cost_vs_round_robin(self) -> float:
        """Production's cost per delivered email ÷ round-robin's (below 1 beats it)."""
        baseline = self.results.get(ROUND_ROBIN)
        if baseline is None:
            return math.nan
        return _ratio(self.production.cost_per_delivered_micros, baseline.cost_per_delivered_micros)

    @property
    def delivered_vs_cheapest_first(self) -> float:
        """Production's delivered share ÷ cheapest-first's (1 or more beats it)."""
        baseline = self.results.get(CHEAPEST_FIRST)
        if baseline is None:
            return math.nan
        return _ratio(self.production.delivered_ratio, baseline.delivered_ratio)

    def meets_targets(self) -> dict[str, bool]:
        """Each target of ``TARGETS`` whose figure exists, and whether production meets it.

        A day without OTP traffic meets the OTP objective (there is no tail to miss); a day with OTPs of which none
        was delivered misses it.
        """
        checks: dict[str, bool] = {
            "cost_vs_oracle": self.cost_vs_oracle <= MAX_COST_VS_ORACLE,
            "delivered_ratio": self.delivered_ratio >= MIN_DELIVERED_RATIO,
        }
        otp_p99 = self.otp_p99_ms
        if math.isnan(otp_p99):
            checks["otp_p99_ms"] = not self.scenario.traffic.mix.get(MessageClass.OTP.value, 0.0)
        else:
            checks["otp_p99_ms"] = otp_p99 <= otp_objective_ms()
        # Comparisons with NaN are False, so a missing baseline must be left out rather than reported as a miss.
        if ROUND_ROBIN in self.results:
            checks["cost_vs_round_robin"] = self.cost_vs_round_robin < 1
        if CHEAPEST_FIRST in self.results:
            checks["delivered_vs_cheapest_first"] = self.delivered_vs_cheapest_first >= 1
        return checks


async def compare(scenario: Scenario, policy_names: Sequence[str] = policies.POLICIES,
                  emails: Sequence[Arrival] | None = None, progress: Progress | None = None) -> Comparison:
    """Run every policy of ``policy_names`` (production always, first) over one day of ``emails`` — drawn from
    the scenario (``traffic.arrivals``) unless given — one after another, then solve the oracle over the same day.

    ``ValueError`` for an unknown policy name, before anything runs.
    """
    day = list(traffic.arrivals(scenario) if emails is None else emails)
    # Production is what every ratio is about; a name given twice would only rerun the same deterministic day.
    names = list(dict.fromkeys([PRODUCTION, *policy_names]))
    provider_order = [p.id for p in scenario.providers]
    routings = [policies.policy(name, provider_order) for name in names]
    results: dict[str, PolicyResult] = {}
    for name, routing in zip(names, routings, strict=True):
        results[name] = await engine.simulate(scenario, routing, day)
        if progress:
            progress(name, results[name].wall_s)
    best = oracle.solve(scenario, day)
    if progress:
        progress("oracle", best.wall_s)
    return Comparison(scenario, MappingProxyType(results), best)
