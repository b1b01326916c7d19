"""Delivery statistics: hourly rollups written by the event consumer, read by ``StatsService.GetStats``.

Why rollups: at 150 M messages a day the events table grows by ~600 M rows a day; counting them per query
cannot stay fast. The consumer instead adds each new event to one row per (tenant, hour, class, provider,
campaign) — plus one row per tag of the message — in the same transaction that records the event, so the figures
are exactly as deduplicated as the timeline. A month of stats for a tenant is then a few thousand rows. Messages
of no campaign share campaign id '', so the campaign dimension adds rows only per campaign sending in an hour, and
a campaign's figures are its own rows (``stats_hourly_by_campaign``), read without touching any message row.

The campaign and tags of a message come with its ACCEPTED event. Events recorded before it (the stream does
not promise order) are counted under no campaign and no tag, and remembered per message in
``reports.stats_before_accept``; the batch that records the ACCEPTED event moves them to the message's campaign
and adds them under its tags (:meth:`StatsRollup.attribute_early`), so a campaign's figures are exact whatever
the order.

Provider-call latencies go into a fixed log-spaced histogram per row: histograms add up element-wise across rows
(``reports.sum_buckets``) and percentiles are read from the sum, with a relative error bounded by the bucket width
(25 %). The sender reports each provider call in exactly one event carrying its latency: ATTEMPTED for a call
that failed and will be retried, SENT for the call that took the message, FAILED for a call the provider
rejected for good (see :data:`LATENCY_EVENTS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

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
    EventType.CANCELLED: "cancelled",
}
# Events that report one provider call and its latency (webhook events carry none).
LATENCY_EVENTS = frozenset({EventType.ATTEMPTED, EventType.SENT, EventType.FAILED})
COUNTERS = ("accepted", "sent", "delivered", "bounced", "failed", "complained", "opened", "clicked", "unsubscribed",
            "cancelled")
CAMPAIGN_PREFIX = "campaigns/"
"""A campaign's resource name is ``campaigns/{id}``; the rollups keep the id."""


class StatsGrouping(StrEnum):
    """How figures are cut."""

    NONE = "none"
    DAY = "day"
    HOUR = "hour"
    PROVIDER = "provider"
    MESSAGE_CLASS = "message_class"
    TAG = "tag"
    CAMPAIGN = "campaign"


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


def campaign_id_of(campaign: str) -> str:
    """The id of a campaign named ``campaigns/{id}`` (a message's ``campaign``); '' for a message of none."""
    return campaign.removeprefix(CAMPAIGN_PREFIX)


@dataclass
class _RollupRow:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    buckets: list[int] = field(default_factory=list)

    def count(self, counter: str | None, bucket: int | None) -> None:
        if counter is not None:
            self.counters[counter] += 1
        if bucket is not None:
            if not self.buckets:
                self.buckets = [0] * BUCKET_COUNT
            self.buckets[bucket] += 1

    def add(self, counters: Mapping[str, int], buckets: Sequence[int], sign: int) -> None:
        for name, value in counters.items():
            self.counters[name] += sign * value
        if buckets:
            if not self.buckets:
                self.buckets = [0] * BUCKET_COUNT
            for index, value in enumerate(buckets[:BUCKET_COUNT]):
                self.buckets[index] += sign * value


RollupKey = tuple[str, datetime, str, str, str, str]
"""(tenant, hour, message class, provider, tag, campaign id)."""
EarlyKey = tuple[str, str, datetime, str, str]
"""(tenant, message id, hour, message class, provider)."""


class EarlyCount(NamedTuple):
    """What one message's events recorded before its ACCEPTED event added to one row of no campaign and no tag."""

    tenant_id: str
    message_id: str
    hour: datetime
    message_class: str
    provider: str
    counters: Mapping[str, int]
    buckets: Sequence[int]


class StatsRollup:
    """The increments one batch of new events makes to the hourly rows."""

    def __init__(self) -> None:
        self._rows: dict[RollupKey, _RollupRow] = {}
        self._early: dict[EarlyKey, _RollupRow] = {}

    def add(self, *, tenant_id: str, message_id: str, event_type: EventType, event_time: datetime,
            message_class: str, provider: str, tags: Sequence[str], campaign_id: str, latency_ms: int,
            accepted_seen: bool) -> None:
        """Count one new event under its campaign's row and under each of the message's tags.

        ``accepted_seen`` False (the message's ACCEPTED event is not recorded yet, so its campaign and tags are
        not known) also remembers the count for :meth:`attribute_early`.
        """
        counter = COUNTER_BY_EVENT.get(event_type)
        bucket = bucket_index(latency_ms) if latency_ms > 0 and event_type in LATENCY_EVENTS else None
        if counter is None and bucket is None:
            return
        hour = event_time.replace(minute=0, second=0, microsecond=0)
        rows = self._rows
        for tag in ("", *dict.fromkeys(t for t in tags if t)) if tags else ("",):
            key = (tenant_id, hour, message_class, provider, tag, campaign_id)
            row = rows.get(key)
            if row is None:
                row = rows[key] = _RollupRow()
            row.count(counter, bucket)
        if not accepted_seen:
            early_key = (tenant_id, message_id, hour, message_class, provider)
            early = self._early.get(early_key)
            if early is None:
                early = self._early[early_key] = _RollupRow()
            early.count(counter, bucket)

    def attribute_early(self, early: EarlyCount, *, campaign_id: str, tags: Sequence[str]) -> None:
        """Move counts made before the message's ACCEPTED event from the row of no campaign to its campaign's,
        and add them under each of its tags (they were counted under none)."""
        targets = [("", campaign_id)] if campaign_id else []
        targets += [(tag, campaign_id) for tag in dict.fromkeys(t for t in tags if t)]
        if not targets:
            return
        base = (early.tenant_id, early.hour, early.message_class, early.provider)
        if campaign_id:
            self._row((*base, "", "")).add(early.counters, early.buckets, -1)
        for tag, campaign in targets:
            self._row((*base, tag, campaign)).add(early.counters, early.buckets, 1)

    def _row(self, key: RollupKey) -> _RollupRow:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _RollupRow()
        return row

    def __len__(self) -> int:
        return len(self._rows)

    async def write(self, conn: psycopg.AsyncConnection) -> None:
        """Add the increments to ``reports.stats_hourly``, and the counts made before their message's ACCEPTED
        event to ``reports.stats_before_accept`` (in the caller's transaction).

        Rows are written in key order so that concurrent consumers lock them in the same order (no deadlocks).
        """
        if self._rows:
            rows = [{"tenant_id": tenant_id, "hour": hour.isoformat(), "message_class": message_class,
                     "provider": provider, "tag": tag, "campaign_id": campaign_id, **row.counters,
                     "latency_buckets": row.buckets}
                    for (tenant_id, hour, message_class, provider, tag, campaign_id), row
                    in sorted(self._rows.items(), key=_by_key)]
            await conn.execute(_ADD_ROLLUPS, (json.dumps(rows, separators=(",", ":")),))
        if self._early:
            early = [{"tenant_id": tenant_id, "message_id": message_id, "hour": hour.isoformat(),
                      "message_class": message_class, "provider": provider, **row.counters,
                      "latency_buckets": row.buckets}
                     for (tenant_id, message_id, hour, message_class, provider), row
                     in sorted(self._early.items(), key=_by_early_key)]
            await conn.execute(_ADD_EARLY, (json.dumps(early, separators=(",", ":")),))


def _by_key(item: tuple[RollupKey, _RollupRow]) -> RollupKey:
    return item[0]


def _by_early_key(item: tuple[EarlyKey, _RollupRow]) -> EarlyKey:
    return item[0]


def _upsert(table: str, key_columns: Sequence[tuple[str, str]]) -> str:
    """Add rows of counters and histograms to ``table`` (one JSON recordset parameter)."""
    keys = ", ".join(name for name, _ in key_columns)
    return f"""
INSERT INTO {table} AS s ({keys}, {", ".join(COUNTERS)}, latency_buckets)
SELECT {", ".join(f"r.{name}" for name, _ in key_columns)}, {", ".join(f"r.{c}" for c in COUNTERS)}, r.latency_buckets
FROM json_to_recordset(%s::json) AS r({", ".join(f"{name} {kind}" for name, kind in key_columns)},
    {", ".join(f"{c} bigint" for c in COUNTERS)}, latency_buckets bigint[])
ON CONFLICT ({keys}) DO UPDATE SET
    {", ".join(f"{c} = s.{c} + excluded.{c}" for c in COUNTERS)},
    latency_buckets = CASE WHEN cardinality(excluded.latency_buckets) = 0 THEN s.latency_buckets
                           ELSE reports.add_buckets(s.latency_buckets, excluded.latency_buckets) END
"""


_ADD_ROLLUPS = _upsert("reports.stats_hourly", (
    ("tenant_id", "text"), ("hour", "timestamptz"), ("message_class", "text"), ("provider", "text"),
    ("tag", "text"), ("campaign_id", "text"),
))
_ADD_EARLY = _upsert("reports.stats_before_accept", (
    ("tenant_id", "text"), ("message_id", "text"), ("hour", "timestamptz"), ("message_class", "text"),
    ("provider", "text"),
))
_CLAIM_EARLY = f"""
DELETE FROM reports.stats_before_accept AS b
USING json_to_recordset(%s::json) AS k(tenant_id text, message_id text)
WHERE b.tenant_id = k.tenant_id AND b.message_id = k.message_id
RETURNING b.tenant_id, b.message_id, b.hour, b.message_class, b.provider, {", ".join(f"b.{c}" for c in COUNTERS)},
    b.latency_buckets
"""


async def start_claim_early(conn: psycopg.AsyncConnection,
                            messages: Iterable[tuple[str, str]]) -> psycopg.AsyncCursor | None:
    """Queue taking out the counts made before the ACCEPTED event of these (tenant, message) pairs, recorded
    now; :func:`claimed_early` reads them.

    Queue it after the merge of these messages' rows: a transaction that counted one of their events before
    the ACCEPTED event holds that message's row until it commits, so its counts are visible by then."""
    keys = sorted(set(messages))
    if not keys:
        return None
    rows = [{"tenant_id": tenant_id, "message_id": message_id} for tenant_id, message_id in keys]
    return await conn.execute(_CLAIM_EARLY, (json.dumps(rows, separators=(",", ":")),))


async def claimed_early(cursor: psycopg.AsyncCursor | None) -> list[EarlyCount]:
    """The counts :func:`start_claim_early` took out."""
    if cursor is None:
        return []
    claimed = []
    for tenant_id, message_id, hour, message_class, provider, *counts, buckets in await cursor.fetchall():
        claimed.append(EarlyCount(tenant_id, message_id, hour, message_class, provider,
                                  dict(zip(COUNTERS, counts, strict=True)), list(buckets or [])))
    return claimed


async def forget_early_counts(conn: psycopg.AsyncConnection, older_than: timedelta) -> None:
    """Drop counts waiting longer than ``older_than`` for an ACCEPTED event (it will not come: ingest publishes
    it from its outbox within seconds), so the table stays as small as the reordering it covers."""
    await conn.execute("DELETE FROM reports.stats_before_accept WHERE recorded_at < now() - %s", (older_than,))


@dataclass(frozen=True)
class StatsQuery:
    """Which figures a tenant asks for."""

    tenant_id: str
    start: datetime
    end: datetime
    group_by: StatsGrouping = StatsGrouping.NONE
    message_class: str = ""
    """Only this class when set."""
    campaign_id: str = ""
    """Only this campaign's messages when set."""


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
    cancelled: int = 0
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
    StatsGrouping.CAMPAIGN: f"'{CAMPAIGN_PREFIX}' || campaign_id",
}
# Each grouping reads the rows of no tag (tag = '' counts every message once), except TAG, which reads the others.
_ROW_FILTERS: dict[StatsGrouping, str] = {
    StatsGrouping.TAG: "tag <> ''",
    StatsGrouping.CAMPAIGN: "tag = '' AND campaign_id <> ''",
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
        if query.campaign_id:
            # "<> ''" spelled out: a generic plan (psycopg prepares a statement run often) cannot derive it from
            # "= %s", and without it the partial index stats_hourly_by_campaign is out of reach.
            filters += " AND campaign_id = %s AND campaign_id <> ''"
            params.append(query.campaign_id)
        sums = ", ".join(f"sum({c})::bigint" for c in COUNTERS) + ", reports.sum_buckets(latency_buckets)"
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT '', {sums} FROM reports.stats_hourly WHERE {filters} AND tag = ''",
                                     params)
            total_row = await cur.fetchone()
            rows: list[tuple[object, ...]] = []
            if query.group_by is not StatsGrouping.NONE:
                expression = _GROUP_EXPRESSIONS[query.group_by]
                row_filter = _ROW_FILTERS.get(query.group_by, "tag = ''")
                cur = await conn.execute(
                    f"""SELECT {expression} AS key, {sums} FROM reports.stats_hourly
                        WHERE {filters} AND {row_filter} GROUP BY key ORDER BY key""",
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
