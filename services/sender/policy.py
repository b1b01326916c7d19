"""Retry and fallback policy per class."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How one class of email is retried."""

    max_deliveries: int
    """Deliveries (rounds of attempts) before the email is failed and dead-lettered."""
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    failover_now: bool = False
    """Try the next provider at once within the same delivery (otp: a late code is a useless code)."""
    max_attempts_per_delivery: int = 1
    resend_after_ambiguous: bool = False
    """After a timeout that may have sent the email: resend elsewhere (otp) or trust the provider (others)."""

    def backoff_s(self, delivery: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^(n-1))]."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, delivery - 1))
        return (rng or random).uniform(0, ceiling)


POLICIES: dict[str, RetryPolicy] = {
    "otp": RetryPolicy(max_deliveries=5, base_delay_s=0.5, max_delay_s=4.0, failover_now=True,
                       max_attempts_per_delivery=3, resend_after_ambiguous=True),
    "transactional": RetryPolicy(max_deliveries=10, base_delay_s=1.0, max_delay_s=60.0),
    "bulk": RetryPolicy(max_deliveries=12, base_delay_s=1.0, max_delay_s=300.0),
}
