"""The day's expected shape of sending, which routing paces every daily quota against.

A provider's daily quota is spent "on pace" when the share of it used so far is no more than the share of the
day's sending that was expected by now (``libs.routing.scoring``: ahead of pace, it ranks as dearer). With no
forecast that share is the share of the day gone by — a straight line from midnight to midnight. But sending is
not spread evenly: a quota paced on a straight line is held back through the quiet morning and runs short in the
evening peak. A ``DemandProfile`` says how the platform's emails spread over the UTC day — the relative volume of
each of its equal slots (24 weights: one an hour), as the platform team knows it from previous days and its
customers' marketing calendar (Black Friday's evening, a newsletter at 10:00) — and ``share_by`` answers the share
of the day's emails expected by a time of day, linear within a slot.

What a profile must not be is a forecast of the providers: it describes demand, which the platform knows ahead,
not outages or brown-outs, which nobody does. It is configured, shared by every sender and router
(``ESP_DEMAND_PROFILE``, ``PacingSettings``); the default, uniform, is the straight line.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

__all__ = ["DAY_S", "UNIFORM", "DemandProfile", "PacingSettings"]

DAY_S = 86400.0
"""A quota day (UTC) in seconds."""


@dataclass(frozen=True)
class DemandProfile:
    """How a day's emails spread over equal slots of the UTC day (relative weights; their sum does not matter)."""

    weights: tuple[float, ...] = (1.0,)
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.weights or any(not math.isfinite(w) or w < 0 for w in self.weights) or not any(self.weights):
            raise ValueError("a demand profile needs finite, non-negative weights, not all zero")
        total = sum(self.weights)
        cumulative = tuple(c / total for c in itertools.accumulate(self.weights))
        object.__setattr__(self, "_cumulative", (0.0, *cumulative))

    def share_by(self, seconds_into_day: float) -> float:
        """The share of the day's emails expected by ``seconds_into_day`` after midnight (UTC): 0 at midnight, 1 at
        the next, linear within a slot. Uniform weights give the share of the day gone by."""
        cumulative = self._cumulative
        at = min(1.0, max(0.0, seconds_into_day / DAY_S)) * len(self.weights)
        slot = min(len(self.weights) - 1, int(at))
        return cumulative[slot] + (cumulative[slot + 1] - cumulative[slot]) * (at - slot)


UNIFORM = DemandProfile()
"""No forecast: a daily quota is paced over a straight line of the day."""


@dataclass(frozen=True)
class PacingSettings:
    """``ESP_DEMAND_PROFILE``, shared by every service that ranks providers (mix into a service's settings
    dataclass); senders and routers must agree on it, so ``RouteEmail`` explains what senders do."""

    demand_profile: tuple[float, ...] = ()
    """The relative volume of each equal slot of the UTC day (24 values: one an hour), comma-separated; empty:
    uniform, a straight line."""

    def demand(self) -> DemandProfile:
        """The profile these settings describe (raises ``ValueError`` when malformed)."""
        return DemandProfile(self.demand_profile) if self.demand_profile else UNIFORM
