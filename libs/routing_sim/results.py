"""What one simulated day measured, per policy, and what the hindsight oracle found: the figures the bench prints
and the report plots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["OracleResult", "PolicyResult", "WindowFigures"]


@dataclass(frozen=True)
class WindowFigures:
    """One time window of a simulated day under one policy (every mapping is keyed by provider id, except
    ``latency_p99_ms`` by class)."""

    start_s: float
    sent: Mapping[str, int]
    """Emails each provider accepted in the window."""
    cost_micros: Mapping[str, float]
    """What those emails cost, at the price in force when each was sent."""
    quota_used: Mapping[str, int]
    """Each provider's daily quota counter at the end of the window (reserved emails, as routing sees it)."""
    failed_calls: Mapping[str, int]
    throttled_calls: Mapping[str, int]
    latency_p99_ms: Mapping[str, float]
    """Per class: p99 from acceptance to a provider accepting the email, of the emails sent in the window."""
    failovers: int
    """Provider calls that were not an email's first (after a failure, a throttle or a refused permit)."""


@dataclass(frozen=True)
class PolicyResult:
    """One policy's simulated day."""

    policy: str
    accepted: int
    delivered: int
    """Emails a provider accepted."""
    failed: int
    """Emails given up on (failure budget spent, too old, no provider takes the size)."""
    pending: int
    """Emails still waiting for a retry when the day ended."""
    cost_micros: float
    latency_ms: Mapping[str, Mapping[str, float]]
    """Per class: ``p50``, ``p95``, ``p99`` and ``max`` from acceptance to a provider accepting the email."""
    failovers: int
    calls: int
    windows: tuple[WindowFigures, ...]
    wall_s: float = 0.0
    """How long the simulation took (real seconds)."""
    explanations: Mapping[str, int] = field(default_factory=dict)
    """How often each reason decided a routing choice (first-ranked provider's leading factor)."""

    @property
    def delivered_ratio(self) -> float:
        """Delivered share of the accepted emails."""
        return self.delivered / self.accepted if self.accepted else 1.0

    @property
    def cost_per_delivered_micros(self) -> float:
        """Average cost of a delivered email."""
        return self.cost_micros / self.delivered if self.delivered else 0.0


@dataclass(frozen=True)
class OracleResult:
    """The hindsight optimum: the cheapest allocation of every window's emails to providers, knowing every
    outage, quota and price in advance."""

    status: str
    """The solver's verdict (``optimal``, or why not)."""
    cost_micros: float
    delivered: float
    """Emails the allocation sends (all accepted ones when feasible)."""
    undeliverable: float
    """Emails no provider could take within their window (0 when feasible)."""
    allocation: Mapping[tuple[int, str], float]
    """(window index, provider id) → emails sent there."""
    cost_by_window: Mapping[tuple[int, str], float]
    wall_s: float = 0.0

    @property
    def cost_per_delivered_micros(self) -> float:
        """Average cost of an email the oracle delivers."""
        return self.cost_micros / self.delivered if self.delivered else 0.0
