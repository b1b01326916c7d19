"""Resilient sending through the whole mesh against the provider simulator: an outage opens the breaker and
traffic moves on without losing an email; throttling is honoured; quotas and rate limits are respected before
the provider has to refuse anything.

``mesh.create_provider`` returns once the router's catalog shows the provider, so no test sleeps for a registry
change to spread; every wait is on progress (``tests.progress``), never on a fixed deadline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from tests.sender.mesh import BREAKER_OPEN_S, BREAKER_THRESHOLD, STALL_S, ProviderMesh

pytestmark = pytest.mark.e2e

BATCHES_TO_SEE_A_CLOSED_BREAKER = 20
"""Batches of concurrent emails sent at most while a sender's health snapshot still shows the breaker's probe in
flight (it refreshes every 0.2 s; each batch waits for its deliveries, so a batch lasts at least a round trip)."""


def max_in_any_window(times: list[float], window_s: float = 1.0) -> int:
    """The most events in any half-open window (t - window_s, t] — how a provider counts its rate."""
    ordered = sorted(times)
    most = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_an_outage_opens_the_breaker_moves_traffic_on_and_loses_nothing(mesh: ProviderMesh):
    primary = await mesh.create_provider("primary", price=50)
    await mesh.create_provider("secondary", price=100)
    await mesh.simulator.set_knobs("primary", outage=True)

    # One at a time until the breaker opens, so each failure is recorded before the next email is routed.
    sent = []
    for count in range(1, BREAKER_THRESHOLD + 1):
        sent.append(await mesh.send("transactional"))
        await mesh.wait_for(_attempts_at(mesh, "primary"), lambda n, at_least=count: n >= at_least,
                            f"attempt {count} at the primary")
    await mesh.wait_for(lambda: mesh.breaker(primary), lambda state: state == "open", "the breaker opening")
    sent += await mesh.send_many("transactional", 20)

    where = await mesh.wait_delivered(sent)
    await mesh.wait_all_sent(sent)
    assert all(len(copies) == 1 for copies in where.values())  # none lost, none twice
    assert {copies[0].personality for copies in where.values()} == {"secondary"}
    arrivals = sorted(r["arrived_at"] for r in await mesh.requests("primary"))
    # The first failures open it; after that the primary only sees a probe once per cool-down.
    assert all(later - earlier >= BREAKER_OPEN_S - 0.1
               for earlier, later in zip(arrivals[BREAKER_THRESHOLD - 1:], arrivals[BREAKER_THRESHOLD:], strict=False))

    await mesh.simulator.set_knobs("primary", outage=False)
    await mesh.wait_for(lambda: mesh.breaker(primary), lambda state: state == "half_open", "the breaker half-open",
                        stall_s=BREAKER_OPEN_S + STALL_S)
    # Traffic keeps flowing; the first email routed while the breaker is half-open is its probe.
    trickle = []
    for _ in range(50):
        trickle.append(await mesh.send("transactional"))
        await mesh.wait_delivered(trickle[-1:])
        if await _breaker_is(mesh, primary, "closed"):
            break
    assert await _breaker_is(mesh, primary, "closed")
    # Redis says closed at once; a sender routes by its last snapshot, and ten concurrent sends accepted together
    # could reach it before its next refresh and still see the probe in flight (and go to the secondary). No sender
    # shows its snapshot, so where its mail goes is the observable: batches until one goes wholly to the primary.
    batches: list[list[str]] = []
    for _ in range(BATCHES_TO_SEE_A_CLOSED_BREAKER):
        batches.append(await mesh.send_many("transactional", 10))
        landed = await mesh.wait_delivered(batches[-1])
        if {copies[0].personality for copies in landed.values()} == {"primary"}:
            break
    after = batches[-1]

    where = await mesh.wait_delivered([*trickle, *(m for batch in batches for m in batch)])
    assert where[trickle[-1]][0].personality == "primary"  # the probe that closed it
    assert {copies[0].personality for copies in where.values() if copies[0].message_id in after} == {"primary"}
    assert all(len(copies) == 1 for copies in where.values())


async def _breaker_is(mesh: ProviderMesh, provider_id: str, state: str) -> bool:
    return await mesh.breaker(provider_id) == state


def _attempts_at(mesh: ProviderMesh, personality: str) -> Callable[[], Awaitable[int]]:
    """How many requests the simulator took for ``personality`` so far."""
    async def count() -> int:
        return len(await mesh.requests(personality))
    return count


async def test_a_rate_limited_provider_never_receives_more_than_its_rate(mesh: ProviderMesh):
    await mesh.create_provider("paced", rate=10)
    await mesh.simulator.set_knobs("paced", throttle_rps=10)

    sent = await mesh.send_many("transactional", 40)

    where = await mesh.wait_delivered(sent)
    await mesh.wait_all_sent(sent)
    assert all(len(copies) == 1 for copies in where.values())
    requests = await mesh.requests("paced")
    assert Counter(r["result"] for r in requests) == {"accepted": 40}  # not one 429
    assert max_in_any_window([r["arrived_at"] for r in requests]) <= 10


async def test_throttled_sends_honour_retry_after_and_none_fail(mesh: ProviderMesh):
    retry_after_s = 2.0
    await mesh.create_provider("throttled")  # the registry does not know its limit: the provider says it
    await mesh.simulator.set_knobs("throttled", throttle_rps=4, retry_after_s=retry_after_s)

    sent = await mesh.send_many("transactional", 12)

    where = await mesh.wait_delivered(sent)
    await mesh.wait_all_sent(sent)
    assert all(len(copies) == 1 for copies in where.values())  # 0 failed, 0 duplicated
    requests = await mesh.requests("throttled")
    throttled_at = [r["received_at"] for r in requests if r["result"] == "throttled"]
    assert throttled_at, "the simulator never throttled: the test proves nothing"
    # After a 429, only requests already on their way may arrive until its Retry-After has passed.
    for answered in throttled_at:
        too_early = [r for r in requests if answered + 0.25 <= r["arrived_at"] <= answered + retry_after_s - 0.1]
        assert too_early == []


async def test_a_provider_whose_daily_quota_is_reached_is_left_before_it_refuses(mesh: ProviderMesh):
    cheap = await mesh.create_provider("quota-cheap", price=10, daily_quota=30)
    await mesh.create_provider("quota-spare", price=100)
    await mesh.simulator.set_knobs("quota-cheap", daily_quota=30)

    sent = await mesh.send_many("bulk", 80)

    where = await mesh.wait_delivered(sent)
    assert Counter(copies[0].personality for copies in where.values()) == {"quota-cheap": 30, "quota-spare": 50}
    assert all(len(copies) == 1 for copies in where.values())
    assert [r for r in await mesh.requests("quota-cheap") if r["result"] != "accepted"] == []
    decision = await mesh.route("bulk")
    [excluded] = [s for s in decision.excluded if s.provider == f"providers/{cheap}"]
    assert excluded.excluded_reason == "daily quota exhausted" and excluded.remaining_daily_quota == 0
