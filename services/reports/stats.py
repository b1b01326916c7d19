"""Delivery statistics: hourly rollups written by the event consumer, read by ``StatsService.GetStats``.

Why rollups: at 150 M messages a day the events table grows by ~600 M rows a day; counting them per query
cannot stay fast. The consumer instead adds each new event to one row per (tenant, hour, class, provider)
— plus one row per tag of the message — in the same transaction that records the event, so the figures are
exactly as deduplicated as the timeline. A month of stats for a tenant is then a few thousand rows.

Provider-call latencies go into a fixed log-spaced histogram per row: histograms add up element-wise across rows
(``reports.sum_buckets``) and percentiles are read from the sum, with a relative error bounded by the bucket width
(25 %). The sender reports each provider call in exactly one event carrying its latency: ATTEMPTED for a call
that failed and will be retried, SENT for the call that took the message, FAILED for a call the provider
rejected for good (see :data:`LATENCY_EVENTS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

import psycopg
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import FieldViolation, InvalidArgument
from services.reports.models import EventType

BUCKET_GROWTH = 1.25
"""Each latency bucket's upper bound is this many times the previous one's."""
BUCKET_COUNT = 54
"""Bucket 0 holds [0, 1] ms, bucket i (1 <= i < 53) holds (1.25^(i-1), 1.25^i] ms (1.25^52 ~ 110 s), and the last
bucket everything above."""
MAX_RANGE = timedelta(days=400)

# Which counter each event type adds to; the others count nowhere. DEAD_LETTERED is not counted: the sender
# follows it with FAILED for the same message, which is.
COUNTER_BY_EVENT: dict[EventType, str] = {
    EventType.ACCEPTED: "accepted",
    EventType.SENT: "sent",
    EventType.DELIVERED: "delivered",
    EventType.BOUNCED: "bounced",
    EventType.FAILED: "failed",
    EventType.REJECTED: "failed",
    EventType.COMPLAINED: "complained",
    EventType.OPENED: "opened",
    EventType.CLICKED: "clicked",
    EventType.UNSUBSCRIBED: "unsubscribed",
}
# Events that report one provider call and its latency (webhook events carry none).
LATENCY_EVENTS = frozenset({EventType.ATTEMPTED, EventType.SENT, EventType.FAILED})
COUNTERS = ("accepted", "sent", "delivered", "bounced", "failed", "complained", "opened", "clicked", "unsubscribed")


class StatsGrouping(StrEnum):
    """How figures are cut."""

    NONE = "none"
    DAY = "day"
    HOUR = "hour"
    PROVIDER = "provider"
    MESSAGE_CLASS = "message_class"
    TAG = "tag"


def bucket_index(latency_ms: float) -> int:
    """The histogram bucket of one latency."""
    if latency_ms <= 1:
        return 0
    return min(BUCKET_COUNT - 1, math.ceil(math.log(latency_ms) / math.log(BUCKET_GROWTH) - 1e-9))


def percentile(buckets: Sequence[int], quantile: float) -> float:
    """Estimate a quantile (0..1) of the latencies counted in ``buckets`` (0.0 when there are none).

    The value is interpolated linearly inside the bucket holding the wanted rank.
    """
    total = sum(buckets)
    if total == 0:
        return 0.0
    rank = quantile * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            lower = 0.0 if index == 0 else BUCKET_GROWTH ** (index - 1)
            if index == BUCKET_COUNT - 1:
                return lower  # open-ended bucket: its lower bound is all we know
            upper = BUCKET_GROWTH**index
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return BUCKET_GROWTH ** (BUCKET_COUNT - 2)


@dataclass
class _RollupRow:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    buckets: list[int] = field(default_factory=list)


RollupKey = tuple[str, datetime, str, str, str]
"""(tenant, hour, message class, provider, tag)."""


class StatsRollup:
    """The increments one batch of new events makes to the hourly rows."""

    def __init__(self) -> None:
        self._rows: dict[RollupKey, _RollupRow] = {}

    def add(self, *, tenant_id: str, event_type: EventType, event_time: datetime, message_class: str,
            provider: str, tags: Sequence[str], latency_ms: int) -> None:
        """Count one new event under the all-messages row and under each of the message's tags."""
        counter = COUNTER_BY_EVENT.get(event_type)
        has_latency = latency_ms > 0 and event_type in LATENCY_EVENTS
        if counter is None and not has_latency:
            return
        hour = event_time.replace(minute=0, second=0, microsecond=0)
        rows = self._rows
        for tag in ("", *dict.fromkeys(t for t in tags if t)) if tags else ("",):
            key = (tenant_id, hour, message_class, provider, tag)
            row = rows.get(key)
            if row is None:
                row = rows[key] = _RollupRow()
            if counter is not None:
                row.counters[counter] += 1
            if has_latency:
                if not row.buckets:
                    row.buckets = [0] * BUCKET_COUNT
                row.buckets[bucket_index(latency_ms)] += 1

    def __len__(self) -> int:
        return len(self._rows)

    async def write(self, conn: psycopg.AsyncConnection) -> None:
        """Add the increments to ``reports.stats_hourly`` (in the caller's transaction).

        Rows are written in key order so that concurrent consumers lock them in the same order (no deadlocks).
        """
        if not self._rows:
            return
        rows = []
        for (tenant_id, hour, message_class, provider, tag), row in sorted(self._rows.items(), key=_by_key):
            rows.append({"tenant_id": tenant_id, "hour": hour.isoformat(), "message_class": message_class,
                         "provider": provider, "tag": tag, **row.counters, "latency_buckets": row.buckets})
        await conn.execute(_ADD_ROLLUPS, (json.dumps(rows, separators=(",", ":")),))


def _by_key(item: tuple[RollupKey, _RollupRow]) -> RollupKey:
    return item[0]


_ADD_ROLLUPS = f"""
INSERT INTO reports.stats_hourly AS s (tenant_id, hour, message_class, provider, tag, {", ".join(COUNTERS)},
    latency_buckets)
SELECT r.tenant_id, r.hour, r.message_class, r.provider, r.tag, {", ".join(f"r.{c}" for c in COUNTERS)},
    r.latency_buckets
FROM json_to_recordset(%s::json) AS r(tenant_id text, hour timestamptz, message_class text, provider text, tag text,
    {", ".join(f"{c} bigint" for c in COUNTERS)}, latency_buckets bigint[])
ON CONFLICT (tenant_id, hour, message_class, provider, tag) DO UPDATE SET
    {", ".join(f"{c} = s.{c} + excluded.{c}" for c in COUNTERS)},
    latency_buckets = CASE WHEN cardinality(excluded.latency_buckets) = 0 THEN s.latency_buckets
                           ELSE reports.add_buckets(s.latency_buckets, excluded.latency_buckets) END
"""


@dataclass(frozen=True)
class StatsQuery:
    """Which figures a tenant asks for."""

    tenant_id: str
    start: datetime
    end: datetime
    group_by: StatsGrouping = StatsGrouping.NONE
    message_class: str = ""
    """Only this class when set."""


@dataclass(frozen=True)
class StatsFigures:
    """Counts and latency percentiles of one group (or of the whole range)."""

    key: str
    accepted: int = 0
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    failed: int = 0
    complained: int = 0
    opened: int = 0
    clicked: int = 0
    unsubscribed: int = 0
    latency_ms_p50: float = 0.0
    latency_ms_p99: float = 0.0


@dataclass(frozen=True)
class StatsReport:
    """The figures per group and in total."""

    rows: tuple[StatsFigures, ...]
    total: StatsFigures


_GROUP_EXPRESSIONS: dict[StatsGrouping, str] = {
    StatsGrouping.DAY: "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    StatsGrouping.HOUR: """to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":00:00Z"')""",
    StatsGrouping.PROVIDER: "provider",
    StatsGrouping.MESSAGE_CLASS: "message_class",
    StatsGrouping.TAG: "tag",
}


class StatsReader:
    """Answers stats queries from the hourly rollups (resolution: one hour; ``start`` is rounded down to it)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def get(self, query: StatsQuery) -> StatsReport:
        """Figures of ``query``'s tenant over [start, end), grouped as asked, plus the total."""
        if query.end <= query.start:
            raise InvalidArgument("end_time must be after start_time",
                                  field_violations=[FieldViolation("end_time", "must be after start_time")])
        if query.end - query.start > MAX_RANGE:
            raise InvalidArgument(f"the range may span at most {MAX_RANGE.days} days",
                                  field_violations=[FieldViolation("start_time", "range too long")])
        filters = "tenant_id = %s AND hour >= date_trunc('hour', %s::timestamptz) AND hour < %s"
        params: list[object] = [query.tenant_id, query.start, query.end]
        if query.message_class:
            filters += " AND message_class = %s"
            params.append(query.message_class)
        sums = ", ".join(f"sum({c})::bigint" for c in COUNTERS) + ", reports.sum_buckets(latency_buckets)"
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT '', {sums} FROM reports.stats_hourly WHERE {filters} AND tag = ''",
                                     params)
            total_row = await cur.fetchone()
            rows: list[tuple[object, ...]] = []
            if query.group_by is not StatsGrouping.NONE:
                expression = _GROUP_EXPRESSIONS[query.group_by]
                tag_filter = "tag <> ''" if query.group_by is StatsGrouping.TAG else "tag = ''"
                cur = await conn.execute(
                    f"""SELECT {expression} AS key, {sums} FROM reports.stats_hourly
                        WHERE {filters} AND {tag_filter} GROUP BY key ORDER BY key""",
                    params,
                )
                rows = list(await cur.fetchall())
        assert total_row is not None  # an aggregate without GROUP BY always returns one row
        return StatsReport(rows=tuple(_figures(r) for r in rows), total=_figures(total_row))


def _figures(row: Sequence[object]) -> StatsFigures:
    key, *counts, buckets = row
    values = {name: int(count or 0) for name, count in zip(COUNTERS, counts, strict=True)}  # type: ignore[call-overload]
    histogram = [int(b) for b in (buckets or [])]  # type: ignore[attr-defined]
    return StatsFigures(
        key=str(key),
        **values,
        latency_ms_p50=percentile(histogram, 0.50),
        latency_ms_p99=percentile(histogram, 0.99),
    )
