"""Retry, fallback and ambiguity policy per message class.

- A retryable failure (5xx, refused connection, timeout before the request was written, our account refused
  by the provider) counts against the email's failure budget, excludes that provider from the email's next
  attempt and is retried after exponential backoff with full jitter: uniform in [0, min(cap, base·2^(n-1))]
  for the n-th failure, so with the default base the ceilings run 1 s, 2 s, 4 s, 8 s … up to the class's cap.
  otp does not wait: it falls over to the next ranked provider at once, within the same delivery.
- A throttled answer (429 + Retry-After) is not the email's failure: the provider is paused for every sender
  until Retry-After passes, the email tries the next provider at once, and if there is none it waits at least
  the Retry-After (plus a little jitter so the paused emails do not all return in the same instant).
- A permanent rejection of the email (invalid address, content refused) fails it: no retry, hold released.
- Ambiguous (the request went out and no answer came back — the provider may have sent it):
  ``FAIL_OVER`` (otp) treats it as a failure and sends again elsewhere at once: a rare duplicate code beats a
  late one. ``ASSUME_SENT`` (transactional, bulk) does not resend blindly: the email is recorded as sent with
  the attempt's outcome AMBIGUOUS and attribute ``ambiguous=true``; the provider's delivery webhooks (bounce or
  delivered, through reports) settle what happened.
- Failure budget exhausted, or the email older than the class's useful life → ``failed`` and dead-lettered.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class AmbiguousPolicy(enum.StrEnum):
    """What to do after an attempt that may or may not have sent the email."""

    FAIL_OVER = "fail_over"
    ASSUME_SENT = "assume_sent"


@dataclass(frozen=True)
class RetryPolicy:
    """How one class of email is retried."""

    max_failures: int
    """Failed attempts (throttling and unavailable providers do not count) before the email is failed and
    dead-lettered."""
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    """The class's cap on one backoff, and on any wait for a provider to become available."""
    failover_now: bool = False
    """Try the next provider at once within the same delivery (otp: a late code is a useless code)."""
    max_attempts_per_delivery: int = 1
    """Provider calls one delivery may make for the email before it waits for the next delivery."""
    ambiguous: AmbiguousPolicy = AmbiguousPolicy.ASSUME_SENT
    max_age_s: float = 3 * 86400
    """An email not sent this long after it was accepted is failed: a day-old code or receipt helps nobody."""
    batch_calls: bool = False
    """Send emails fetched together in one provider batch call where the provider has a batch API."""

    def backoff_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Delay before the attempt after the ``failures``-th failure: full jitter under an exponential ceiling."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, failures - 1))
        return (rng or random).uniform(0, ceiling)

    def throttle_delay_s(self, retry_after_s: float, rng: random.Random | None = None) -> float:
        """Delay honouring a provider's Retry-After, spread a little so paused emails do not return at once."""
        return min(self.max_delay_s, retry_after_s * (rng or random).uniform(1.0, 1.2))


POLICIES: dict[str, RetryPolicy] = {
    "otp": RetryPolicy(max_failures=6, base_delay_s=0.25, max_delay_s=2.0, failover_now=True,
                       max_attempts_per_delivery=3, ambiguous=AmbiguousPolicy.FAIL_OVER, max_age_s=600),
    "transactional": RetryPolicy(max_failures=10, base_delay_s=1.0, max_delay_s=60.0, max_age_s=86400),
    "bulk": RetryPolicy(max_failures=12, base_delay_s=1.0, max_delay_s=300.0, max_age_s=3 * 86400,
                        batch_calls=True),
}
