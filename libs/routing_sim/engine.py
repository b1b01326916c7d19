"""A discrete-event simulation of one day of sending that runs the production routing code on simulated time.

What is production code here, called as the sender calls it (``services.sender.delivery``):

- ``libs.routing.scoring.rank`` ranks the catalog's providers for each email from the health snapshot;
- ``libs.routing.health.HealthBoard`` — its Lua scripts, breaker, quota counters and GCRA rate limiter — takes
  every ``acquire_many`` before a call and every ``record_many`` after it, refreshing its snapshot every
  ``refresh_s`` of simulated time; its store is ``libs.routing.memory_redis.MemoryRedis`` on the simulated clock;
- ``services.sender.outcomes`` turns each call into the health record (``recorded_call``) and decides what
  becomes of the email (``after_attempt``: sent, rejected, next provider now, backoff, give up), what an email
  no provider takes now does (``unroutable``, ``unavailable_delay_s``), and when a bulk email waits in the queue
  for a cheap provider's rate budget (``waits_for_cheaper``, ``paced_delay_s``), with the class's ``RetryPolicy``.

What is simulated: the providers (``market``), the clock, and the queue between deliveries (an email waiting for
a retry comes back after its delay, as JetStream redelivers a nak). One email per call (no batch calls), so a
scenario's rate limits are emails a second. A policy other than production reorders ``rank``'s eligible providers
(``policies``) and keeps everything else.
"""

from __future__ import annotations

import calendar
import heapq
import itertools
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from libs.common.message_classes import MessageClass, RetryPolicy
from libs.providers.model import SendResult
from libs.routing.catalog import ProviderSpec
from libs.routing.health import BreakerPolicy, HealthBoard, Permit, ProviderLimits, Refusal
from libs.routing.memory_redis import MemoryRedis
from libs.routing.scoring import EmailFacts, RouteDecision, rank
from libs.routing_sim.market import Market, catalog_entry
from libs.routing_sim.policies import RoutingPolicy
from libs.routing_sim.results import PolicyResult, WindowFigures
from libs.routing_sim.scenario import Scenario
from libs.routing_sim.traffic import Arrival, demand_profile
from services.sender.outcomes import (
    Next,
    Unroutable,
    after_attempt,
    paced_delay_s,
    rate_limited_cheapest,
    recorded_call,
    unavailable_delay_s,
    unroutable,
    waits_for_cheaper,
)
from services.sender.retries import backoff_s

__all__ = ["DAY_START", "GRACE_S", "simulate"]

DAY_START = calendar.timegm((2026, 1, 5, 0, 0, 0))
"""The simulated day's midnight (UTC), so the quota counters' day is the simulated day."""
GRACE_S = 900.0
"""Emails still waiting when the day ends get this long to be sent; the rest count as pending."""
REFRESH_S = 0.2
"""How stale the health snapshot may be (the sender's ``health_refresh_s`` default)."""


@dataclass(eq=False)
class _Email:
    arrival: Arrival
    message_class: MessageClass
    policy: RetryPolicy
    failures: int = 0
    excluded: set[str] = field(default_factory=set)
    tried: set[str] = field(default_factory=set)
    calls: int = 0
    rounds: int = 0
    hint_s: float | None = None
    provider_calls: int = 0
    deliveries: int = 0
    """Deliveries so far (JetStream's delivery count)."""

    def hint(self, seconds: float) -> None:
        if seconds > 0 and (self.hint_s is None or seconds < self.hint_s):
            self.hint_s = seconds


@dataclass(eq=False)
class _Call:
    email: _Email
    provider_id: str
    permit: Permit
    result: SendResult
    started_s: float
    price_micros: float


class _Day:
    """One policy's day: the event queue, the catalog, the board, and what was measured."""

    def __init__(self, scenario: Scenario, routing: RoutingPolicy, seed: int) -> None:
        self.scenario = scenario
        self.routing = routing
        self.now = 0.0
        self.market = Market(scenario, seed)
        self.rng = random.Random(seed + 1)
        self.catalog: dict[str, ProviderSpec] = {p.id: catalog_entry(p) for p in scenario.providers}
        self.board = HealthBoard(MemoryRedis(self.clock), "sim", BreakerPolicy(), refresh_s=REFRESH_S,
                                 clock=self.clock, demand=demand_profile(scenario))
        self.refreshed_at = -1.0
        self._queue: list[tuple[float, int, str, object]] = []
        self._order = itertools.count()
        windows = scenario.windows
        providers = [p.id for p in scenario.providers]
        self.sent = [Counter[str]() for _ in range(windows)]
        self.cost = [dict.fromkeys(providers, 0.0) for _ in range(windows)]
        self.failed_calls = [Counter[str]() for _ in range(windows)]
        self.throttled_calls = [Counter[str]() for _ in range(windows)]
        self.failovers = [0] * windows
        self.quota_used: list[dict[str, int]] = [{} for _ in range(windows)]
        self.latencies: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.delivered = self.failed = self.calls = 0
        self.first_choice: Counter[str] = Counter()

    def clock(self) -> float:
        return DAY_START + self.now

    def window(self, at_s: float) -> int:
        return min(self.scenario.windows - 1, int(at_s // self.scenario.window_s))

    def at(self, when: float, kind: str, item: object) -> None:
        heapq.heappush(self._queue, (when, next(self._order), kind, item))

    async def run(self, emails: Sequence[Arrival]) -> None:
        for arrival in emails:
            message_class = MessageClass(arrival.message_class)
            self.at(arrival.at_s, "deliver", _Email(arrival, message_class, message_class.policy.retry))
        for when, spec in self.market.catalog_changes():
            self.at(when, "catalog", spec)
        for w in range(self.scenario.windows):
            self.at(min(self.scenario.day_s, (w + 1) * self.scenario.window_s) - 1e-6, "window", w)
        end = self.scenario.day_s + GRACE_S
        while self._queue and self._queue[0][0] <= end:
            self.now, _, kind, item = heapq.heappop(self._queue)
            if kind == "deliver":
                assert isinstance(item, _Email)
                await self.deliver(item)
            elif kind == "done":
                assert isinstance(item, _Call)
                await self.complete(item)
            elif kind == "catalog":
                assert isinstance(item, ProviderSpec)
                self.catalog[item.id] = item
            else:
                assert isinstance(item, int)
                await self.board.refresh(self.catalog)
                self.refreshed_at = self.now
                self.quota_used[item] = {pid: h.daily_used for pid, h in self.board.snapshots.items()}

    @property
    def pending(self) -> int:
        return sum(1 for _, _, kind, _ in self._queue if kind in ("deliver", "done"))

    # -- a delivery (the sender's steps 1 to 6 for one email) ---------------------------------------------------
    async def deliver(self, email: _Email) -> None:
        if self.now - email.arrival.at_s > email.policy.max_age_s:
            self.failed += 1
            return
        email.tried, email.calls, email.rounds, email.hint_s = set(), 0, 0, None
        email.deliveries += 1
        await self.route(email)

    async def route(self, email: _Email) -> None:
        email.rounds += 1
        if email.rounds > len(self.catalog) + 2:  # every round asked for another: wait like any retry
            self.later(email, backoff_s(email.policy, max(1, email.failures), self.rng))
            return
        if self.now - self.refreshed_at >= REFRESH_S:
            await self.board.refresh(self.catalog)
            self.refreshed_at = self.now
        facts = EmailFacts(email.message_class, email.arrival.size_bytes, 1,
                           frozenset(email.excluded | email.tried))
        decision = rank(self.catalog.values(), self.board.snapshots, facts)
        chain = self.routing.order(decision)
        if not chain:
            self.unroutable(email, decision)
            return
        if email.provider_calls == 0:
            self.first_choice[f"{email.message_class}:{chain[0].provider_id}"] += 1
        booked = rate_limited_cheapest(decision)
        rate_refused_cost = booked[1] if booked is not None else None
        for choice in chain:
            if waits_for_cheaper(email.message_class.policy.routing, rate_refused_cost, choice.expected_cost_micros):
                self.later(email, max(self.unavailable_delay(email), paced_delay_s(email.policy, email.deliveries,
                                                                                   self.rng)))
                return
            spec = self.catalog[choice.provider_id]
            limits = ProviderLimits(spec.rate_limit_per_second, spec.daily_quota, spec.monthly_quota)
            [permit] = await self.board.acquire_many(
                [(spec.id, limits, 1, email.message_class.policy.routing.max_rate_wait_s)])
            if permit.allowed:
                self.call(email, spec, permit)
                return
            email.tried.add(spec.id)
            email.hint(permit.wait_s)
            if permit.refusal is Refusal.RATE and (rate_refused_cost is None
                                                   or choice.expected_cost_micros < rate_refused_cost):
                rate_refused_cost = choice.expected_cost_micros
        self.later(email, self.unavailable_delay(email))

    def unavailable_delay(self, email: _Email) -> float:
        return unavailable_delay_s(email.policy, email.message_class, self.catalog.values(), self.board.snapshots,
                                   email.hint_s)

    def unroutable(self, email: _Email, decision: RouteDecision) -> None:
        why = unroutable(decision, email.excluded)
        if why is Unroutable.TOO_LARGE:
            self.failed += 1
        elif why is Unroutable.NO_CARRIER:
            self.later(email, email.policy.max_delay_s)
        elif why is Unroutable.ALL_FAILED:
            email.excluded.clear()
            delay = backoff_s(email.policy, max(1, email.failures), self.rng)
            self.later(email, max(delay, email.hint_s or 0.0))
        else:
            self.later(email, self.unavailable_delay(email))

    def call(self, email: _Email, spec: ProviderSpec, permit: Permit) -> None:
        started = self.now + permit.wait_s
        result = self.market.call(spec.id, started)
        email.calls += 1
        email.provider_calls += 1
        self.calls += 1
        if email.provider_calls > 1:
            self.failovers[self.window(started)] += 1
        call = _Call(email, spec.id, permit, result, started, spec.price_micros(email.arrival.size_bytes))
        self.at(started + (result.elapsed_s or 0.0), "done", call)

    async def complete(self, call: _Call) -> None:
        email = call.email
        await self.board.record_many([recorded_call(call.provider_id, [call.result], emails=1,
                                                    probe=call.permit.probe)])
        verdict = after_attempt(email.policy, call.result, failures=email.failures, calls=email.calls,
                                probe=call.permit.probe, rng=self.rng)
        w = self.window(self.now)
        if verdict.next is Next.SENT:
            self.delivered += 1
            self.sent[w][call.provider_id] += 1
            self.cost[w][call.provider_id] += call.price_micros
            self.latencies[(w, email.message_class.value)].append((self.now - email.arrival.at_s) * 1000)
            return
        if call.result.status_code == 429:
            self.throttled_calls[w][call.provider_id] += 1
        else:
            self.failed_calls[w][call.provider_id] += 1
        if verdict.next is Next.REJECTED or verdict.next is Next.GIVE_UP:
            self.failed += 1
            return
        email.tried.add(call.provider_id)
        email.hint(verdict.wait_hint_s)
        if verdict.failure:
            email.excluded.add(call.provider_id)
            email.failures += 1
        if verdict.next is Next.OTHER_PROVIDER_NOW:
            await self.route(email)
        else:
            self.later(email, verdict.delay_s)

    def later(self, email: _Email, delay_s: float) -> None:
        self.at(self.now + delay_s, "deliver", email)

    # -- what was measured ---------------------------------------------------------------------------------------
    def result(self, accepted: int, wall_s: float) -> PolicyResult:
        by_class: dict[str, list[float]] = defaultdict(list)
        for (_, message_class), values in self.latencies.items():
            by_class[message_class].extend(values)
        latency = {c: _percentiles(v) for c, v in sorted(by_class.items())}
        windows = []
        providers = [p.id for p in self.scenario.providers]
        for w in range(self.scenario.windows):
            p99 = {c.value: float(np.percentile(self.latencies[(w, c.value)], 99))
                   for c in MessageClass if self.latencies.get((w, c.value))}
            windows.append(WindowFigures(
                start_s=w * self.scenario.window_s, sent={p: self.sent[w][p] for p in providers},
                cost_micros=dict(self.cost[w]), quota_used={p: self.quota_used[w].get(p, 0) for p in providers},
                failed_calls={p: self.failed_calls[w][p] for p in providers},
                throttled_calls={p: self.throttled_calls[w][p] for p in providers},
                latency_p99_ms=p99, failovers=self.failovers[w]))
        return PolicyResult(
            policy=self.routing.name, accepted=accepted, delivered=self.delivered, failed=self.failed,
            pending=self.pending, cost_micros=sum(sum(c.values()) for c in self.cost),
            latency_ms=latency, failovers=sum(self.failovers), calls=self.calls, windows=tuple(windows),
            wall_s=wall_s, explanations=dict(self.first_choice))


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(array.max())}


async def simulate(scenario: Scenario, routing: RoutingPolicy, emails: Sequence[Arrival],
                   seed: int | None = None) -> PolicyResult:
    """Run one day of ``emails`` through ``routing`` on the scenario's market (seed: the scenario's unless given)."""
    started = time.perf_counter()
    day = _Day(scenario, routing, scenario.seed if seed is None else seed)
    await day.run(emails)
    return day.result(len(emails), time.perf_counter() - started)
