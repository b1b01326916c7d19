"""Mergeable latency histograms: fixed log-spaced buckets that add up element-wise.

Rollup rows keep one histogram per latency (provider call, accept → sent, accept → delivered). Because every row
uses the same buckets, the rows of any grouping add up to the histogram of that grouping, and its percentiles are
true percentiles of the merged latencies, not averages of per-row percentiles. The price is resolution: a
percentile is known to lie in one bucket, and each bucket's upper bound is ``GROWTH`` times its lower bound, so an
estimate is within 25 % of the exact value (interpolation inside the bucket usually does much better).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BUCKET_COUNT", "GROWTH", "Percentiles", "bucket_index", "percentile", "percentiles"]

GROWTH = 1.25
"""Each bucket's upper bound is this many times the previous one's."""
BUCKET_COUNT = 80
"""Bucket 0 holds [0, 1] ms, bucket i (1 <= i < 79) holds (1.25^(i-1), 1.25^i] ms (1.25^78 ms ~ 36 h: a delivery
report can take hours), and the last bucket everything above. Histograms written with fewer buckets (54, before
accept → delivered latencies were kept) are a prefix of these and merge unchanged."""
_LOG_GROWTH = math.log(GROWTH)


def bucket_index(latency_ms: float) -> int:
    """The bucket of one latency."""
    if latency_ms <= 1:
        return 0
    return min(BUCKET_COUNT - 1, math.ceil(math.log(latency_ms) / _LOG_GROWTH - 1e-9))


def percentile(buckets: Sequence[int], quantile: float) -> float:
    """Estimate a quantile (0..1) of the latencies counted in ``buckets`` (0.0 when there are none), interpolating
    linearly inside the bucket that holds the wanted rank."""
    total = sum(buckets)
    if total == 0:
        return 0.0
    rank = quantile * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            lower = 0.0 if index == 0 else GROWTH ** (index - 1)
            if index == BUCKET_COUNT - 1:
                return lower  # open-ended bucket: its lower bound is all we know
            upper = GROWTH**index
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return GROWTH ** (BUCKET_COUNT - 2)


@dataclass(frozen=True)
class Percentiles:
    """p50, p95 and p99 of one histogram, and how many latencies it counts."""

    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    count: int = 0


def percentiles(buckets: Sequence[int]) -> Percentiles:
    """The p50, p95 and p99 of a histogram."""
    if not any(buckets):
        return Percentiles()
    return Percentiles(percentile(buckets, 0.50), percentile(buckets, 0.95), percentile(buckets, 0.99), sum(buckets))
