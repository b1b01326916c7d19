"""The hindsight oracle: the cheapest way the day's emails could have been sent, knowing the whole day in advance.

Every policy the lab simulates decides online; the oracle solves one linear program over the whole day with every
outage, brown-out, throttle, quota cut and price change known beforehand. Its cost is the yardstick the report
measures policies against (how far from the best possible a router got), and its allocation shows where the
cheap capacity should have gone.

The model (the contract; ``solve`` implements exactly this)
-----------------------------------------------------------

*Time.* The day is cut into ``scenario.windows`` windows of ``scenario.window_s`` seconds (the last one may be
shorter). An email is sent in the window it arrives in, never later, but it may be sent at any moment of that
window: the window is the oracle's unit of time.

*Demand groups.* Emails are aggregated by (class, window, size bucket). Size buckets are ``SIZE_BUCKETS``
log-spaced ranges between the day's smallest and largest email, split further at every provider's size cap so
that a bucket never straddles a cap (a group is then either wholly under a cap or wholly over it).

*Variables.* ``x[g, p] >= 0``: emails of group ``g`` sent via provider ``p`` (only for eligible pairs, the others
are fixed at 0 by being left out); ``u[g] >= 0``: emails of ``g`` that no provider can take (undeliverable).
Demand: ``sum_p x[g, p] + u[g] = count(g)``.

*Within a window* each provider's state is evaluated on the segments between its events' boundaries. A segment
is *available* unless an ``outage`` covers it or a brown-out fails every call there (error rate 1).

*Eligibility.* ``(g, p)`` is eligible when ``p`` carries the class (``SimProvider.classes``, empty: all), the
group's largest email is within ``provider_size_cap(p.type, p.max_message_bytes)`` (0: no cap), and ``p`` is
available for some of the window. For OTPs also: ``p``'s p99 latency (``latency.p99_ms``, times the
``latency_factor`` of every brown-out active) is within ``MessageClass.OTP.policy.routing.latency_objective_s``
for some available part of the window. An OTP cannot wait, so where that *fast* part is not the whole window, the
OTPs sent via ``p`` in the window are at most those that arrived during it (counted from the arrival times).

*Error rates.* A provider with error rate ``e`` (the largest of its ``error_rate`` and those of the brown-outs
active, as ``market.Market`` fails calls) makes ``1 / (1 - e)`` calls per delivered email. A window's calls per
email are the average of that over its available seconds (sends are spread over the available part). Failed calls
cost nothing, but they count against rate limits and quotas.

*Rate limits.* Calls to ``p`` in a window ``<=`` the integral of its rate over the window's available seconds:
``rate_limit_per_second`` (0: unlimited), or during a ``throttle`` the lower of that and the event's
``rate_per_second``. A partial outage therefore scales a rate-limited provider's capacity by the uncovered share;
an unlimited provider is unlimited in any available part of the window (its emails wait there).

*Quotas.* The simulated day is one UTC day and starts with every quota counter at 0. The daily quota in force at
time ``t`` is the latest ``quota_cut`` that started at or before ``t``, else ``daily_quota``; a ``monthly_quota``
caps the day too (the lower of the two; 0: unlimited). Cumulative calls to ``p`` through the end of each window
``<=`` the quota in force at that window's end. So a cut at ``t`` holds the windows wholly before ``t`` to the
old quota and everything up to the next change, the window containing ``t`` included, to the new one.
(Consequence: a cut below what was already sent forbids the earlier sends too, where a real router would have
kept them and stopped; with a cut the oracle may therefore cost more than a policy that sent early.)

*Cost.* ``x[g, p]`` costs ``x * (price_per_email + price_per_mb * mean size of g in MB)`` (MB = 1e6 bytes) at the
prices in force: a ``price_change`` applies from its start for the rest of the day, and a window it starts in is
charged the time-weighted average of the prices over the provider's available seconds of the window (pro-rated).

*Objective.* Minimise total cost plus a penalty on every undeliverable email (far above any email's cost, so the
oracle delivers all it can), with scipy's HiGHS. ``OracleResult.cost_micros`` excludes the penalty;
``delivered = sum x``, ``undeliverable = sum u``; ``allocation`` and ``cost_by_window`` hold every
(window index, provider id), 0 where nothing is sent.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import linprog

from libs.common.message_classes import MessageClass
from libs.providers.capabilities import provider_size_cap
from libs.routing_sim.results import OracleResult
from libs.routing_sim.scenario import MarketEvent, Scenario, SimProvider
from libs.routing_sim.traffic import Arrival

__all__ = ["SIZE_BUCKETS", "solve"]

SIZE_BUCKETS = 10
"""Log-spaced size ranges per (class, window), before the splits at provider size caps: the group mean stands in
for every size of its bucket in the per-MB price, so more buckets only refine that and grow the LP."""

BYTES_PER_MB = 1e6
PENALTY_FACTOR = 1000.0
"""The undeliverable penalty is this many times the dearest email's cost: delivering one more email may shift
others to dearer providers, and the penalty must outweigh any such shuffle."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class _Window:
    """What one provider offers during one window."""

    length_s: float
    available_s: float
    calls_cap: float
    """Calls the rate limit allows in the window (``inf``: unlimited)."""
    calls_per_email: float
    price_per_email: float
    price_per_mb: float
    fast: tuple[tuple[float, float], ...]
    """Available intervals where the p99 latency meets the OTP objective."""
    quota: float
    """Daily quota in force at the window's end (``inf``: unlimited)."""


def solve(scenario: Scenario, emails: Sequence[Arrival]) -> OracleResult:
    """The cheapest allocation of ``emails`` to ``scenario``'s providers in hindsight (see the module's model).

    Never raises for a scenario that cannot carry the traffic: what no provider can take is ``undeliverable``.
    ``status`` is ``optimal``, or the solver's reason when it found no optimum (then nothing is allocated and every
    email counts as undeliverable).
    """
    started = time.perf_counter()
    providers = scenario.providers
    n_windows = scenario.windows
    zero = {(w, p.id): 0.0 for w in range(n_windows) for p in providers}
    if not emails:
        return OracleResult(status="optimal", cost_micros=0.0, delivered=0.0, undeliverable=0.0,
                            allocation=dict(zero), cost_by_window=dict(zero), wall_s=time.perf_counter() - started)

    at_s = np.array([e.at_s for e in emails], dtype=np.float64)
    sizes = np.array([e.size_bytes for e in emails], dtype=np.float64)
    class_names = sorted({e.message_class for e in emails})
    class_of = np.array([class_names.index(e.message_class) for e in emails], dtype=np.int64)
    window_of = np.clip(np.floor(at_s / scenario.window_s), 0, n_windows - 1).astype(np.int64)
    caps = [provider_size_cap(p.type, p.max_message_bytes) for p in providers]
    edges = _size_edges(sizes, caps)
    bucket_of = np.searchsorted(edges, sizes, side="left").astype(np.int64)

    # One integer key per (class, window, bucket); np.unique sorts the groups by class, then window, then bucket.
    n_buckets = len(edges) + 1
    key = (class_of * n_windows + window_of) * n_buckets + bucket_of
    group_keys, group_of, counts = np.unique(key, return_inverse=True, return_counts=True)
    group_class = group_keys // (n_windows * n_buckets)
    group_window = (group_keys // n_buckets) % n_windows
    group_max = np.zeros(len(group_keys))
    np.maximum.at(group_max, group_of, sizes)
    group_mean_mb = np.bincount(group_of, weights=sizes) / counts / BYTES_PER_MB

    objective_ms = MessageClass.OTP.policy.routing.latency_objective_s * 1000
    state = [[_window_state(scenario, p, w, objective_ms) for w in range(n_windows)] for p in providers]
    otp = class_names.index(MessageClass.OTP) if MessageClass.OTP in class_names else -1

    # Variables x[g, p] for the eligible pairs only.
    var_group: list[int] = []
    var_provider: list[int] = []
    var_cost: list[float] = []
    for g in range(len(group_keys)):
        cls, w = int(group_class[g]), int(group_window[g])
        for pi, p in enumerate(providers):
            s = state[pi][w]
            if p.classes and class_names[cls] not in p.classes:
                continue
            if caps[pi] and group_max[g] > caps[pi]:
                continue
            if s.available_s <= 0 or (cls == otp and not s.fast):
                continue
            var_group.append(g)
            var_provider.append(pi)
            var_cost.append(s.price_per_email + s.price_per_mb * float(group_mean_mb[g]))
    vg = np.array(var_group, dtype=np.int64)
    vp = np.array(var_provider, dtype=np.int64)
    vw = group_window[vg] if len(vg) else np.zeros(0, dtype=np.int64)
    vk = np.array([state[int(p)][int(w)].calls_per_email for p, w in zip(vp, vw, strict=True)])
    cost = np.array(var_cost, dtype=np.float64)
    n_x, n_g = len(vg), len(group_keys)

    a_ub, b_ub = _inequalities(scenario, emails, state, otp, class_of, window_of, vg, vp, vw, vk, group_class)
    a_eq = sparse.csr_array(
        (np.ones(n_x + n_g), (np.concatenate([vg, np.arange(n_g)]), np.arange(n_x + n_g))), shape=(n_g, n_x + n_g))
    penalty = PENALTY_FACTOR * max(1.0, float(cost.max()) if n_x else 1.0)
    c = np.concatenate([cost, np.full(n_g, penalty)])
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=counts.astype(np.float64), bounds=(0, None),
                  method="highs")

    if res.status != 0 or res.x is None:
        return OracleResult(status=str(res.message), cost_micros=0.0, delivered=0.0, undeliverable=float(len(emails)),
                            allocation=dict(zero), cost_by_window=dict(zero), wall_s=time.perf_counter() - started)
    solution = np.clip(np.asarray(res.x, dtype=np.float64), 0.0, None)
    x, u = solution[:n_x], solution[n_x:]
    sent = np.zeros((n_windows, len(providers)))
    spent = np.zeros((n_windows, len(providers)))
    np.add.at(sent, (vw, vp), x)
    np.add.at(spent, (vw, vp), x * cost)
    allocation = {(w, p.id): float(sent[w, pi]) for w in range(n_windows) for pi, p in enumerate(providers)}
    cost_by_window = {(w, p.id): float(spent[w, pi]) for w in range(n_windows) for pi, p in enumerate(providers)}
    return OracleResult(status="optimal", cost_micros=float(x @ cost), delivered=float(x.sum()),
                        undeliverable=float(u.sum()), allocation=allocation, cost_by_window=cost_by_window,
                        wall_s=time.perf_counter() - started)


def _size_edges(sizes: FloatArray, caps: Sequence[int]) -> FloatArray:
    """Upper edges of the size buckets (a size ``s`` is in the first bucket whose edge is ``>= s``, or past the
    last): log-spaced between the smallest and largest email, plus every provider cap."""
    low, high = float(sizes.min()), float(sizes.max())
    spaced = np.geomspace(low, high, SIZE_BUCKETS + 1)[1:-1] if high > low else np.zeros(0)
    return np.unique(np.concatenate([spaced, np.array([cap for cap in caps if cap > 0], dtype=np.float64)]))


def _window_state(scenario: Scenario, provider: SimProvider, w: int, objective_ms: float) -> _Window:
    """``provider``'s availability, capacity, error rate, prices and quota during window ``w``."""
    start = w * scenario.window_s
    end = min(scenario.day_s, start + scenario.window_s)
    events = [e for e in scenario.events if e.provider == provider.id]
    cuts = sorted({start, end} | {t for e in events for t in (e.start_s, e.end_s) if start < t < end})
    available = calls = weighted_calls = price_email = price_mb = 0.0
    fast: list[tuple[float, float]] = []
    for a, b in itertools.pairwise(cuts):
        length = b - a
        active = [e for e in events if e.active((a + b) / 2)]
        brownouts = [e for e in active if e.kind == "brownout"]
        error = max([provider.error_rate, *(e.error_rate for e in brownouts)])
        if any(e.kind == "outage" for e in active) or error >= 1:
            continue
        rates = [e.rate_per_second for e in active if e.kind == "throttle"]
        if provider.rate_limit_per_second > 0:
            rates.append(provider.rate_limit_per_second)
        available += length
        calls += min(rates) * length if rates else math.inf
        weighted_calls += length / (1 - error)
        email_price, mb_price = _price(provider, events, (a + b) / 2)
        price_email += email_price * length
        price_mb += mb_price * length
        factor = math.prod(e.latency_factor for e in brownouts)
        if provider.latency.p99_ms * factor <= objective_ms or objective_ms <= 0:
            fast.append((a, b))
    if available <= 0:
        return _Window(end - start, 0.0, 0.0, 1.0, 0.0, 0.0, (), _quota(provider, events, end))
    return _Window(end - start, available, calls, weighted_calls / available, price_email / available,
                   price_mb / available, tuple(fast), _quota(provider, events, end))


def _price(provider: SimProvider, events: Sequence[MarketEvent], at_s: float) -> tuple[float, float]:
    """Prices per email and per MB in force at ``at_s`` (the latest price change started by then)."""
    changes = sorted((e for e in events if e.kind == "price_change" and e.start_s <= at_s), key=lambda e: e.start_s)
    if changes:
        return float(changes[-1].price_per_email_micros), float(changes[-1].price_per_mb_micros)
    return float(provider.price_per_email_micros), float(provider.price_per_mb_micros)


def _quota(provider: SimProvider, events: Sequence[MarketEvent], end_s: float) -> float:
    """The day's quota in force just before ``end_s`` (a cut at ``end_s`` belongs to the next window)."""
    cuts = sorted((e for e in events if e.kind == "quota_cut" and e.start_s < end_s), key=lambda e: e.start_s)
    daily = cuts[-1].daily_quota if cuts else provider.daily_quota
    limits = [q for q in (daily, provider.monthly_quota) if q > 0]
    return float(min(limits)) if limits else math.inf


def _inequalities(scenario: Scenario, emails: Sequence[Arrival], state: Sequence[Sequence[_Window]], otp: int,
                  class_of: IntArray, window_of: IntArray, vg: IntArray, vp: IntArray, vw: IntArray,
                  vk: FloatArray, group_class: IntArray) -> tuple[sparse.csr_array | None, FloatArray | None]:
    """Rate-limit, OTP-fast-part and cumulative-quota rows over the x variables (the undeliverable columns, which
    come after them, have no entries)."""
    n_x, n_g = len(vg), len(group_class)
    rows: list[IntArray] = []
    cols: list[IntArray] = []
    vals: list[FloatArray] = []
    bounds: list[float] = []

    def add(mask: npt.NDArray[np.bool_], weights: FloatArray, bound: float) -> None:
        where = np.flatnonzero(mask)
        if not len(where):
            return
        rows.append(np.full(len(where), len(bounds), dtype=np.int64))
        cols.append(where.astype(np.int64))
        vals.append(weights[where])
        bounds.append(bound)

    is_otp = group_class[vg] == otp if n_x else np.zeros(0, dtype=np.bool_)
    at_s = np.array([e.at_s for e in emails], dtype=np.float64)
    otp_times = [np.sort(at_s[(class_of == otp) & (window_of == w)]) for w in range(scenario.windows)]
    for pi, windows in enumerate(state):
        of_provider = vp == pi
        for w, s in enumerate(windows):
            if s.available_s <= 0:
                continue
            in_window = of_provider & (vw == w)
            if math.isfinite(s.calls_cap):
                add(in_window, vk, s.calls_cap)
            # Only a partly fast window needs a row: a wholly fast one lets every OTP through, a slow one none.
            if otp >= 0 and s.fast and sum(b - a for a, b in s.fast) < s.length_s:
                times = otp_times[w]
                arrived = sum(int(np.searchsorted(times, b) - np.searchsorted(times, a)) for a, b in s.fast)
                add(in_window & is_otp, np.ones(n_x), float(arrived))
        # Cumulative calls are non-decreasing, so each run of windows under one quota needs a row at its end only.
        for w, s in enumerate(windows):
            last_of_run = w == len(windows) - 1 or windows[w + 1].quota != s.quota
            if last_of_run and math.isfinite(s.quota):
                add(of_provider & (vw <= w), vk, s.quota)
    if not bounds:
        return None, None
    matrix = sparse.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(len(bounds), n_x + n_g))
    return matrix, np.array(bounds, dtype=np.float64)

