"""Retry delays: how long an email waits before its next attempt, per its class's ``RetryPolicy``
(``libs.common.message_classes``).

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

import random

from libs.common.message_classes import RetryPolicy


def backoff_s(policy: RetryPolicy, failures: int, rng: random.Random | None = None) -> float:
    """Delay before the attempt after the ``failures``-th failure: full jitter under an exponential ceiling."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** max(0, failures - 1))
    return (rng or random).uniform(0, ceiling)


def throttle_delay_s(policy: RetryPolicy, retry_after_s: float, rng: random.Random | None = None) -> float:
    """Delay honouring a provider's Retry-After, spread a little so paused emails do not return at once."""
    return min(policy.max_delay_s, retry_after_s * (rng or random).uniform(1.0, 1.2))
