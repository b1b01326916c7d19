"""The simulator's mutable state: live knobs, rate and quota counters, and the bounded request log."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from dev.simulator.model import DOMAIN_STATES, Knobs, Personality, RequestRecord, SimDomain


class UnknownPersonality(KeyError):
    """No personality of that name."""


class SimulatorState:
    """Everything the HTTP app, the SMTP server and the admin API share."""

    def __init__(self, personalities: Iterable[Personality], *, seed: int | None = None, log_cap: int = 10_000) -> None:
        self.personalities: dict[str, Personality] = {p.name: p for p in personalities}
        self.random = random.Random(seed)
        self.log_cap = log_cap
        self._seq = itertools.count(1)
        self._knobs: dict[str, Knobs] = {}
        self._outage_until: dict[str, float] = {}
        self._recent_requests: dict[str, list[float]] = {}
        self._quota_day: dict[str, str] = {}
        self._quota_used: dict[str, int] = {}
        self._records: dict[str, deque[RequestRecord]] = {}
        self._dropped_records = 0
        self._hang_release = asyncio.Event()
        self._domains: dict[str, dict[str, SimDomain]] = {}
        self._domain_holds: dict[tuple[str, str], tuple[str, str]] = {}
        self._domain_ids = itertools.count(1)
        self.reset(keep_knobs=False)

    # -- personalities and knobs -----------------------------------------------------------------------------

    def personality(self, name: str) -> Personality:
        """The personality called ``name`` or ``UnknownPersonality``."""
        try:
            return self.personalities[name]
        except KeyError:
            raise UnknownPersonality(name) from None

    def smtp_personality(self, username: str) -> Personality | None:
        """The SMTP personality whose AUTH user is ``username``."""
        for personality in self.personalities.values():
            if personality.type == "smtp" and personality.credentials.get("username") == username:
                return personality
        return None

    def knobs(self, name: str) -> Knobs:
        """The live knobs of a personality."""
        self.personality(name)
        return self._knobs[name]

    def set_knobs(self, name: str, values: Mapping[str, Any]) -> Knobs:
        """Apply a partial knob update; ``ValueError`` lists every bad key."""
        knobs = Knobs.from_mapping(values, base=self.knobs(name))
        self._knobs[name] = knobs
        if "outage_for_s" in values:
            if knobs.outage_for_s is None:
                self._outage_until.pop(name, None)
            else:
                self._outage_until[name] = time.monotonic() + knobs.outage_for_s
        return knobs

    def reset(self, *, keep_knobs: bool = False) -> None:
        """Forget every request and counter; knobs go back to each personality's initial ones unless kept."""
        for name, personality in self.personalities.items():
            if not keep_knobs or name not in self._knobs:
                self._knobs[name] = Knobs.from_mapping({}, base=personality.knobs)
                self._outage_until.pop(name, None)
            self._recent_requests[name] = []
            self._quota_used[name] = 0
            self._records[name] = deque(maxlen=self.log_cap)
            self._domains[name] = {}
        if not keep_knobs:
            self._domain_holds.clear()
        self._dropped_records = 0
        self.release_hangs()

    # -- behaviour ---------------------------------------------------------------------------------------

    async def delay(self, name: str) -> None:
        """Sleep for the personality's latency plus jitter."""
        knobs = self.knobs(name)
        seconds = (knobs.latency_ms + self.random.uniform(0.0, knobs.jitter_ms)) / 1000.0
        if seconds > 0:
            await asyncio.sleep(seconds)

    def in_outage(self, name: str) -> bool:
        """Whether the personality is down right now."""
        if self.knobs(name).outage:
            return True
        until = self._outage_until.get(name)
        return until is not None and time.monotonic() < until

    def admit_rate(self, name: str, arrived: float | None = None) -> bool:
        """Count one request against ``throttle_rps`` (a one-second sliding window); False = throttle it.

        ``arrived`` is the request's ``time.monotonic()`` when it reached the simulator, before its body was read
        and the latency knob slept: a provider's edge counts arrivals, and on a busy machine the time a request is
        looked at can bunch requests that arrived well spaced (a client pacing itself to the rate then sees 429s it
        did not cause)."""
        limit = self.knobs(name).throttle_rps
        if limit is None:
            return True
        at = time.monotonic() if arrived is None else arrived
        window = self._recent_requests[name]  # sorted arrival times
        del window[:bisect.bisect_right(window, at - 1.0)]
        if bisect.bisect_right(window, at) >= limit:  # arrivals in (at - 1 s, at]
            return False
        bisect.insort(window, at)
        return True

    def consume_quota(self, name: str, messages: int) -> bool:
        """Take ``messages`` from today's quota; False (and nothing taken) when that would exceed it."""
        quota = self.knobs(name).daily_quota
        today = datetime.now(UTC).date().isoformat()
        if self._quota_day.get(name) != today:
            self._quota_day[name] = today
            self._quota_used[name] = 0
        if quota is not None and self._quota_used[name] + messages > quota:
            return False
        self._quota_used[name] += messages
        return True

    @staticmethod
    def seconds_until_quota_reset() -> int:
        """Seconds until the next UTC midnight, when daily quotas start over."""
        now = datetime.now(UTC)
        midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        return max(1, int((midnight - now).total_seconds()))

    async def hang(self, seconds: float) -> None:
        """Withhold an answer for ``seconds``, or until ``release_hangs`` (reset, shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hang_release.wait(), timeout=seconds)

    def release_hangs(self) -> None:
        """End every withheld answer now."""
        self._hang_release.set()
        self._hang_release = asyncio.Event()

    def roll(self, probability: float) -> bool:
        """True with the given probability (seeded generator, so runs are repeatable)."""
        return probability > 0 and self.random.random() < probability

    # -- sending domains -----------------------------------------------------------------------------------

    def register_domain(self, name: str, domain: str) -> tuple[SimDomain, bool]:
        """The personality's registration of ``domain``, and whether this call created it."""
        domains = self._domains[self.personality(name).name]
        found = domains.get(domain.lower())
        if found is not None:
            return found, False
        created = domains[domain.lower()] = SimDomain(domain.lower(), next(self._domain_ids), time.time())
        return created, True

    def registered_domain(self, name: str, domain: str) -> SimDomain | None:
        """The personality's registration of ``domain``, if any."""
        return self._domains[self.personality(name).name].get(domain.lower())

    def registered_domains(self, name: str) -> list[SimDomain]:
        """Every domain registered at the personality, oldest first."""
        return sorted(self._domains[self.personality(name).name].values(), key=lambda d: d.id)

    def domain_state(self, name: str, domain: str) -> tuple[str, str]:
        """``(state, detail)`` of a domain at the personality: ``verified`` at once unless held (``hold_domain``)."""
        return self._domain_holds.get((name, domain.lower()), ("verified", ""))

    def hold_domain(self, name: str, domain: str, state: str, detail: str = "") -> None:
        """Hold ``domain`` at the personality in ``state`` (pending, failed, or verified again), registered or not
        yet: a failed hold makes the provider refuse its registration, or report it failed once registered."""
        self.personality(name)
        if state not in DOMAIN_STATES:
            raise ValueError(f"state must be one of {', '.join(DOMAIN_STATES)}")
        self._domain_holds[(name, domain.lower())] = (state, detail)

    def release_domain(self, name: str, domain: str) -> None:
        """Drop a hold: the domain verifies."""
        self.personality(name)
        self._domain_holds.pop((name, domain.lower()), None)

    # -- the request log -----------------------------------------------------------------------------------

    def record(self, record_without_seq: dict[str, Any]) -> RequestRecord:
        """Store a request; the log keeps the newest ``log_cap`` per personality."""
        record = RequestRecord(seq=next(self._seq), received_at=time.time(), **record_without_seq)
        log = self._records.setdefault(record.personality, deque(maxlen=self.log_cap))
        if len(log) == log.maxlen:
            self._dropped_records += 1
        log.append(record)
        return record

    def requests(self, personality: str | None = None, *, since_seq: int = 0) -> list[RequestRecord]:
        """Recorded requests, oldest first, optionally for one personality and after a sequence number."""
        if personality is not None:
            self.personality(personality)
            logs: Iterable[deque[RequestRecord]] = [self._records[personality]]
        else:
            logs = self._records.values()
        merged = [r for log in logs for r in log if r.seq > since_seq]
        return sorted(merged, key=lambda r: r.seq)

    def stats(self) -> dict[str, Any]:
        """Counts per personality and result."""
        per_personality: dict[str, dict[str, int]] = {}
        for name, log in self._records.items():
            counts: dict[str, int] = {"requests": len(log), "messages_delivered": 0}
            for record in log:
                counts[record.result] = counts.get(record.result, 0) + 1
                if record.delivered:
                    counts["messages_delivered"] += sum(1 for m in record.messages if m.rejection is None)
            counts["quota_used_today"] = self._quota_used.get(name, 0)
            per_personality[name] = counts
        return {"personalities": per_personality, "dropped_records": self._dropped_records}
