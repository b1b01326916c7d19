"""The suppression list looked at again just before the provider call, for every email of a delivery at once.

Ingest refuses suppressed recipients at accept, but a campaign drains for hours: a bounce, complaint or
unsubscribe that arrives meanwhile must stop the emails to that address still queued. Each email is checked
against the sets its class and topic call for (``libs.common.suppressions.suppression_keys_for``: bulk mail
against every suppression for every topic and, when it has a topic (``SendTask.topic``), that topic's; OTP and
transactional mail against all but unsubscribes, never a topic's), every email of the delivery in one pipelined
round trip (one ``SMISMEMBER`` per tenant and set). When Redis cannot answer the emails go on: the
check at accept already passed, and holding mail back for a Redis blip would cost more than it saves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from libs.common.message_classes import MessageClass
from libs.common.suppressions import normalise_email, suppression_keys_for

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
"""While the check keeps failing, one warning this often."""


@dataclass(frozen=True)
class Recipients:
    """The addresses one email is about to be sent to."""

    tenant_id: str
    message_class: MessageClass
    addresses: Sequence[str]
    topic: str = ""
    """The topic of its campaign (``SendTask.topic``), empty for none."""


class SuppressionCheck:
    """Finds the recipients suppressed since their email was accepted."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.namespace = namespace
        self._clock = clock
        self._logged_at = -float("inf")

    async def suppressed(self, emails: Sequence[Recipients]) -> list[list[str]]:
        """For each email, its recipients (as given) now on the suppression list its class honours, for every
        topic or for its topic; all empty when Redis cannot answer. One round trip for all the emails."""
        found: list[list[str]] = [[] for _ in emails]
        # One SMISMEMBER per set, each address asked once: a campaign's delivery is one tenant, one class and one
        # topic (two sets).
        keys_of = [suppression_keys_for(self.namespace, email.tenant_id, email.message_class, email.topic)
                   for email in emails]
        wanted: dict[str, dict[str, None]] = {}
        for email, keys in zip(emails, keys_of, strict=True):
            for key in keys:
                addresses = wanted.setdefault(key, {})
                for address in email.addresses:
                    addresses[normalise_email(address)] = None
        wanted = {key: addresses for key, addresses in wanted.items() if addresses}
        if not wanted:
            return found
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, addresses in wanted.items():
                    pipe.smismember(key, list(addresses))
                replies = await pipe.execute()
        except Exception:
            now = self._clock()
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                log.warning("could not re-check suppressions; sending without (accept checked them)", exc_info=True)
            return found
        suppressed = {(key, address) for (key, addresses), flags in zip(wanted.items(), replies, strict=True)
                      for address, flag in zip(addresses, flags, strict=True) if flag}
        if not suppressed:
            return found
        for index, (email, keys) in enumerate(zip(emails, keys_of, strict=True)):
            found[index] = [a for a in email.addresses
                            if any((key, normalise_email(a)) in suppressed for key in keys)]
        return found
