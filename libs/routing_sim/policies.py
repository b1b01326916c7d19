"""The routing policies a simulated day compares: production's ranking and the baselines.

Every policy sees the same fallback machinery — the production eligibility rules (``libs.routing.scoring.rank``
leaves out what cannot take the email now: breaker, Retry-After, quota, rate budget, size, class), the health
board's permits and the sender's retry decisions — and differs only in the order it tries the eligible providers:

- ``production``: ``rank``'s own order (what the sender does);
- ``round_robin``: the eligible providers in turn, one step further for every email;
- ``static_priority``: a fixed order (the scenario's order of providers), the next one when one cannot;
- ``cheapest_first``: the cheapest for the email's size first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from libs.routing.scoring import ProviderScore, RouteDecision

__all__ = [
    "BASELINES",
    "POLICIES",
    "CheapestFirst",
    "Production",
    "RoundRobin",
    "RoutingPolicy",
    "StaticPriority",
    "policy",
]


class RoutingPolicy(Protocol):
    """An order of the eligible providers for one email."""

    name: str

    def order(self, decision: RouteDecision) -> Sequence[ProviderScore]:
        """The providers ``decision`` ranked, in the order this policy tries them."""


class Production:
    """The production ranking as it is."""

    name = "production"

    def order(self, decision: RouteDecision) -> Sequence[ProviderScore]:
        """``rank``'s order."""
        return decision.ranked


class RoundRobin:
    """Each email starts one provider further along than the one before."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def order(self, decision: RouteDecision) -> Sequence[ProviderScore]:
        """The eligible providers by id, rotated by the turn."""
        eligible = sorted(decision.ranked, key=lambda s: s.provider_id)
        if not eligible:
            return eligible
        start = self._turn % len(eligible)
        self._turn += 1
        return eligible[start:] + eligible[:start]


class StaticPriority:
    """A fixed priority list with failover."""

    name = "static_priority"

    def __init__(self, priority: Sequence[str]) -> None:
        self._rank = {provider_id: i for i, provider_id in enumerate(priority)}

    def order(self, decision: RouteDecision) -> Sequence[ProviderScore]:
        """The eligible providers in priority order."""
        return sorted(decision.ranked, key=lambda s: (self._rank.get(s.provider_id, len(self._rank)), s.provider_id))


class CheapestFirst:
    """Price alone, with failover."""

    name = "cheapest_first"

    def order(self, decision: RouteDecision) -> Sequence[ProviderScore]:
        """The eligible providers by what the email would cost there."""
        return sorted(decision.ranked, key=lambda s: (s.expected_cost_micros, s.provider_id))


BASELINES = ("round_robin", "static_priority", "cheapest_first")
POLICIES = ("production", *BASELINES)


def policy(name: str, provider_order: Sequence[str]) -> RoutingPolicy:
    """A fresh policy by name (``provider_order``: the static priority list)."""
    if name == "production":
        return Production()
    if name == "round_robin":
        return RoundRobin()
    if name == "static_priority":
        return StaticPriority(provider_order)
    if name == "cheapest_first":
        return CheapestFirst()
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")
