"""When a delivery is tried again: the retry schedule with jitter, and a receiver's Retry-After."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["next_delay", "retry_after_s"]


def next_delay(schedule: Sequence[float], attempts_made: int, jitter: float,
               rng: random.Random | None = None) -> float | None:
    """Seconds from try ``attempts_made`` to the next, or None when the schedule is exhausted. ``schedule`` holds
    each try's offset from the first; the gap between two consecutive offsets is jittered."""
    if attempts_made >= len(schedule):
        return None
    base = schedule[attempts_made] - (schedule[attempts_made - 1] if attempts_made else 0)
    spread = base * jitter
    return max(0.0, base + (rng or random).uniform(-spread, spread))


def retry_after_s(value: str, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now (delta-seconds or an HTTP date), None when unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
