"""Stats queries: the figures of any combination of dimensions and a time bucket, read from the rollups.

A query names a time range, the dimensions to group by (provider, message class, tag, campaign, mailbox provider,
and for platform admins tenant), an optional time bucket (minute, hour, day) and the metrics it wants. It is
answered from the coarsest rollup rows that tile its range (:func:`tiles`), each tile from the narrowest table that
has the columns the query needs (:func:`narrowest_table`): whole days from the day rows, the
hours at the range's edges from the hour rows, the minutes at their edges from ``rollup_minute`` while minutes are
kept (over ranges of at most two days: longer ones stop at hours); the finest rows used are rounded outward (a
range starting at 10:00:30 includes the minute of 10:00, or over a month the hour of 10:00). So a
30-day query reads ~30 rows per group instead of ~43,000 minute rows, whatever its edges.

Limits keep every query fast (never a query that times out): a range of at most ``MAX_RANGE``, a bucket no finer
than the range allows (``MAX_BUCKETS``), minute buckets only where minutes are still kept, at most ``MAX_GROUPS``
groups, and a statement timeout behind them all. Bad input is refused with INVALID_ARGUMENT naming the field and
the limit.

Latency percentiles come from the rows' histograms merged per group (latency_histograms.py), so any grouping gives
true percentiles. Rates: delivery = delivered / sent, bounce = bounced / sent, complaint = complained / delivered
(Gmail's spam rate is complaints over mail delivered), each 0 when its denominator is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import FieldViolation, InvalidArgument, PermissionDenied, ResourceExhausted
from services.reports.latency_histograms import BUCKET_COUNT, Percentiles, percentiles
from services.reports.rollups import CAMPAIGN_PREFIX, COUNTERS, HISTOGRAMS, ROLLUP_TABLES, Resolution, RollupTable

__all__ = [
    "COMPLAINT_RATE_CRITICAL",
    "COMPLAINT_RATE_WARNING",
    "DIMENSIONS",
    "MAX_RANGE",
    "METRICS",
    "ComplaintRateStatus",
    "StatsFigures",
    "StatsQuery",
    "StatsReader",
    "StatsReport",
    "tiles",
]

MAX_RANGE = timedelta(days=400)
MAX_BUCKETS: Mapping[Resolution, int] = {Resolution.MINUTE: 24 * 60, Resolution.HOUR: 31 * 24,
                                          Resolution.DAY: 400}
"""Most buckets one query may return per group: minutes over a day, hours over a month, days over MAX_RANGE."""
MAX_GROUPS = 50_000
"""Most rows one query may return; more means the dimensions are too fine for the range."""
MINUTE_EDGES_UP_TO = timedelta(days=2)
"""Ranges longer than this have their edges rounded out to whole hours, not minutes: a minute at the edge of a
month is noise, and the minute rows of an edge hour (full-key only) cost more to read than the month's day rows."""
STATEMENT_TIMEOUT = "15s"
COMPLAINT_RATE_WARNING = 0.001
"""Gmail's bulk-sender guidance: keep the spam rate below 0.1 %."""
COMPLAINT_RATE_CRITICAL = 0.003
"""… and never reach 0.3 %: Gmail then throttles or rejects the sender's mail."""

DIMENSIONS: Mapping[str, str] = {
    "provider": "provider",
    "message_class": "message_class",
    "tag": "tag",
    "campaign": "campaign_id",
    "mailbox_provider": "mailbox_provider",
    "tenant": "tenant_id",
}
"""Dimension name → rollup column."""
BUCKET_DIMENSION = "bucket"
"""The key of a row's time bucket among its dimension values."""
ADMIN_DIMENSIONS = frozenset({"tenant"})


class MetricKind(StrEnum):
    """How a metric is computed and shown."""

    COUNT = "count"
    RATE = "rate"
    AVERAGE = "average"
    LATENCY = "latency"


@dataclass(frozen=True)
class Metric:
    """One metric a query may ask for."""

    name: str
    kind: MetricKind
    admin_only: bool = False


def _metrics(*entries: Metric) -> Mapping[str, Metric]:
    return {metric.name: metric for metric in entries}


METRICS: Mapping[str, Metric] = _metrics(
    *(Metric(name, MetricKind.COUNT) for name in (
        "accepted", "sent", "delivered", "deferred", "bounced", "bounced_hard", "bounced_soft", "failed",
        "complained", "opened", "clicked", "unsubscribed", "cancelled", "suppressed", "provider_calls",
        "provider_errors", "provider_throttled", "credits_charged")),
    Metric("provider_cost_micros", MetricKind.COUNT, admin_only=True),
    *(Metric(name, MetricKind.RATE) for name in (
        "delivery_rate", "bounce_rate", "complaint_rate", "provider_error_rate", "provider_throttle_rate")),
    Metric("credits_per_delivered", MetricKind.AVERAGE),
    Metric("credits_per_thousand_delivered", MetricKind.AVERAGE),
    Metric("provider_cost_micros_per_delivered", MetricKind.AVERAGE, admin_only=True),
    Metric("provider_cost_micros_per_thousand_delivered", MetricKind.AVERAGE, admin_only=True),
    *(Metric(name, MetricKind.LATENCY) for name in ("send_latency", "delivery_latency", "provider_call_latency")),
)
"""Every metric, in the order rows and CSV columns list them."""
_HISTOGRAM_OF = {"send_latency": "send_latency", "delivery_latency": "delivery_latency",
                 "provider_call_latency": "call_latency"}
_LATENCY_COLUMNS = ("p50_ms", "p95_ms", "p99_ms", "count")


class ComplaintRateStatus(StrEnum):
    """A complaint rate against Gmail's thresholds."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class StatsFigures:
    """The figures of one group (or of the whole range)."""

    dimensions: Mapping[str, str]
    counters: Mapping[str, int]
    histograms: Mapping[str, Sequence[int]] = field(default_factory=dict)

    def count(self, name: str) -> int:
        """A summed counter (``bounced`` is hard + soft)."""
        if name == "bounced":
            return self.count("bounced_hard") + self.count("bounced_soft")
        return int(self.counters.get(name, 0))

    @property
    def key(self) -> str:
        """The group's dimension values joined with ``|`` (bucket first), '' for the total."""
        return "|".join(self.dimensions.values())

    def rate(self, name: str) -> float:
        """One of the RATE or AVERAGE metrics."""
        delivered = self.count("delivered")
        match name:
            case "delivery_rate":
                return _ratio(delivered, self.count("sent"))
            case "bounce_rate":
                return _ratio(self.count("bounced"), self.count("sent"))
            case "complaint_rate":
                return _ratio(self.count("complained"), delivered)
            case "provider_error_rate":
                return _ratio(self.count("provider_errors"), self.count("provider_calls"))
            case "provider_throttle_rate":
                return _ratio(self.count("provider_throttled"), self.count("provider_calls"))
            case "credits_per_delivered":
                return _ratio(self.count("credits_charged"), delivered)
            case "credits_per_thousand_delivered":
                return 1000 * _ratio(self.count("credits_charged"), delivered)
            case "provider_cost_micros_per_delivered":
                return _ratio(self.count("provider_cost_micros"), delivered)
            case "provider_cost_micros_per_thousand_delivered":
                return 1000 * _ratio(self.count("provider_cost_micros"), delivered)
        raise KeyError(name)

    def complaint_rate_status(self) -> ComplaintRateStatus:
        """The complaint rate against Gmail's thresholds."""
        rate = self.rate("complaint_rate")
        if rate >= COMPLAINT_RATE_CRITICAL:
            return ComplaintRateStatus.CRITICAL
        if rate >= COMPLAINT_RATE_WARNING:
            return ComplaintRateStatus.WARNING
        return ComplaintRateStatus.OK

    def latency(self, name: str) -> Percentiles:
        """``send_latency``, ``delivery_latency`` or ``provider_call_latency`` percentiles."""
        return percentiles(self.histograms.get(_HISTOGRAM_OF[name], ()))

    def cells(self, metric: str) -> list[str | int]:
        """The CSV cells of one metric (a latency has four, the complaint rate two); fractions as fixed-point text
        (6 decimals for rates, 3 for milliseconds), never in exponent notation."""
        kind = METRICS[metric].kind
        if kind is MetricKind.COUNT:
            return [self.count(metric)]
        if kind is MetricKind.LATENCY:
            figures = self.latency(metric)
            return [f"{figures.p50_ms:.3f}", f"{figures.p95_ms:.3f}", f"{figures.p99_ms:.3f}", figures.count]
        value = f"{self.rate(metric):.6f}"
        if metric == "complaint_rate":
            return [value, self.complaint_rate_status().value]
        return [value]


def _headers(metric: str) -> list[str]:
    kind = METRICS[metric].kind
    if kind is MetricKind.LATENCY:
        return [f"{metric}_{column}" for column in _LATENCY_COLUMNS]
    if metric == "complaint_rate":
        return [metric, "complaint_rate_status"]
    return [metric]


@dataclass(frozen=True)
class StatsReport:
    """The figures per group and in total."""

    dimensions: tuple[str, ...]
    """The rows' dimension names in key order (``bucket`` first when the query has one)."""
    metrics: tuple[str, ...]
    rows: tuple[StatsFigures, ...]
    total: StatsFigures

    def table_header(self) -> list[str]:
        """Column names of the report as a table (CSV): the dimensions, then each metric's columns."""
        return [*self.dimensions, *(h for metric in self.metrics for h in _headers(metric))]

    def table_rows(self) -> list[list[str | int]]:
        """One list of cells per group, matching :meth:`table_header`."""
        return [[*(row.dimensions.get(d, "") for d in self.dimensions),
                 *(cell for metric in self.metrics for cell in row.cells(metric))] for row in self.rows]


@dataclass(frozen=True)
class StatsQuery:
    """Which figures are asked for."""

    tenant_id: str
    """'' for every tenant (platform admins only)."""
    start: datetime
    end: datetime
    dimensions: tuple[str, ...] = ()
    bucket: Resolution | None = None
    metrics: tuple[str, ...] = ()
    """Empty: every metric the caller may see."""
    platform_admin: bool = False
    """Whether the caller may see every tenant and the providers' cost."""
    message_class: str = ""
    campaign_id: str = ""
    provider: str = ""
    tag: str = ""
    mailbox_provider: str = ""

    def checked(self, *, minutes_kept_since: datetime) -> StatsQuery:
        """This query once valid, with its metrics spelled out; INVALID_ARGUMENT or PERMISSION_DENIED naming what
        is wrong and the limit otherwise."""
        violations: list[FieldViolation] = []
        if self.end <= self.start:
            violations.append(FieldViolation("end_time", "must be after start_time"))
        elif self.end - self.start > MAX_RANGE:
            violations.append(FieldViolation("start_time", f"the range may span at most {MAX_RANGE.days} days"))
        elif self.bucket is not None:
            buckets = (self.end - self.start) / self.bucket.step
            limit = MAX_BUCKETS[self.bucket]
            if buckets > limit:
                violations.append(FieldViolation(
                    "bucket", f"{self.bucket.value} buckets over {_span(self.end - self.start)} would be "
                              f"{int(buckets)}; at most {limit} per query: choose a coarser bucket or a shorter range"))
            elif self.bucket is Resolution.MINUTE and self.start < minutes_kept_since:
                violations.append(FieldViolation(
                    "bucket", f"minute buckets are kept since {minutes_kept_since.isoformat()}: "
                              "choose hour or day buckets for older ranges"))
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        violations += [FieldViolation("dimensions", f"unknown dimension {d!r}; known: {', '.join(DIMENSIONS)}")
                       for d in unknown]
        if len(set(self.dimensions)) != len(self.dimensions):
            violations.append(FieldViolation("dimensions", "a dimension is named twice"))
        violations += [FieldViolation("metrics", f"unknown metric {m!r}; known: {', '.join(METRICS)}")
                       for m in self.metrics if m not in METRICS]
        if violations:
            raise InvalidArgument("; ".join(v.description for v in violations), field_violations=violations)
        if not self.platform_admin:
            hidden = [d for d in self.dimensions if d in ADMIN_DIMENSIONS]
            hidden += [m for m in self.metrics if METRICS[m].admin_only]
            if hidden or not self.tenant_id:
                raise PermissionDenied(f"only platform admins may ask for {', '.join(hidden) or 'every tenant'}",
                                       reason="PLATFORM_ADMIN_ONLY")
        metrics = self.metrics or tuple(m for m, spec in METRICS.items() if self.platform_admin or not spec.admin_only)
        return replace(self, metrics=tuple(dict.fromkeys(metrics)))

    @property
    def needs_histograms(self) -> bool:
        """Whether a latency metric is asked for (histograms are read only then)."""
        return any(METRICS[m].kind is MetricKind.LATENCY for m in self.metrics)


def _span(length: timedelta) -> str:
    hours = length.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def tiles(start: datetime, end: datetime, levels: Sequence[Resolution],
          minutes_kept_since: datetime) -> list[tuple[Resolution, datetime, datetime]]:
    """The rollup rows that cover [start, end): ``(resolution, from, to)`` meaning rows with ``from <= bucket <
    to``, coarsest first where whole buckets fit, finer ones at the edges. ``levels`` are the resolutions allowed,
    coarsest first; minutes are used only from ``minutes_kept_since`` on (hours are the finest before that). The
    finest level's rows are rounded outward: its first row may start before ``start``, its last end after ``end``."""
    if start >= end:
        return []
    resolution, finer = levels[0], list(levels[1:])
    if finer == [Resolution.MINUTE] and start < minutes_kept_since:
        finer = []
    if resolution is Resolution.MINUTE and start < minutes_kept_since:
        resolution = Resolution.HOUR
    if not finer:
        return [(resolution, resolution.floor(start), end)]
    low = resolution.floor(start)
    if low < start:
        low += resolution.step
    high = resolution.floor(end)
    if low >= high:
        return tiles(start, end, finer, minutes_kept_since)
    return [*tiles(start, low, finer, minutes_kept_since), (resolution, low, high),
            *tiles(high, end, finer, minutes_kept_since)]


_LEVELS: Mapping[Resolution | None, tuple[Resolution, ...]] = {
    None: (Resolution.DAY, Resolution.HOUR, Resolution.MINUTE),
    Resolution.DAY: (Resolution.DAY, Resolution.HOUR, Resolution.MINUTE),
    Resolution.HOUR: (Resolution.HOUR, Resolution.MINUTE),
    Resolution.MINUTE: (Resolution.MINUTE,),
}


class StatsReader:
    """Answers stats queries from the rollups."""

    def __init__(self, pool: AsyncConnectionPool, *, minute_retention: timedelta = timedelta(days=3)) -> None:
        self._pool = pool
        self._minute_retention = minute_retention

    def minutes_kept_since(self) -> datetime:
        """The oldest minute whose rows are surely still kept (retention drops whole days; an hour of margin)."""
        return Resolution.DAY.floor(datetime.now(UTC) - self._minute_retention) + timedelta(days=1, hours=1)

    async def get(self, query: StatsQuery) -> StatsReport:
        """Figures of ``query`` grouped as asked, plus the total (raises on bad input, see StatsQuery.checked)."""
        query = query.checked(minutes_kept_since=self.minutes_kept_since())
        columns = [DIMENSIONS[d] for d in query.dimensions]
        names = [*([BUCKET_DIMENSION] if query.bucket else []), *query.dimensions]
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
            try:
                rows = await self._groups(conn, query, columns)
                total_rows = (await self._groups(conn, replace(query, dimensions=(), bucket=None), [])
                              if "tag" in query.dimensions else None)
            except psycopg.errors.QueryCanceled:
                raise ResourceExhausted("the stats query took too long: narrow the range or the dimensions",
                                        reason="STATS_QUERY_TOO_SLOW") from None
        figures = tuple(StatsFigures(dict(zip(names, key, strict=True)), counters, histograms)
                        for key, (counters, histograms) in rows.items())
        if total_rows is not None:
            total = next(iter(total_rows.values()), ({}, {}))
        else:
            total = _merged(rows.values())
        return StatsReport(tuple(names), query.metrics, figures, StatsFigures({}, total[0], total[1]))

    async def _groups(self, conn: psycopg.AsyncConnection, query: StatsQuery,
                      columns: Sequence[str]) -> dict[tuple[str, ...], tuple[dict[str, int], dict[str, list[int]]]]:
        rollup, params = self._rollup_rows(query, columns)
        keys = [*(["k_bucket"] if query.bucket else []), *(f"k_{c}" for c in columns)]
        group = ", ".join(keys) or "()"
        order = f"ORDER BY {', '.join(keys)}" if keys else ""
        selected = ", ".join([*keys, *(f"sum({c})::bigint" for c in COUNTERS)])
        # A group whose every count is zero held only counts made before their message's ACCEPTED event, since
        # moved to the message's own group (rollups.attribute_early): it holds no event and is left out.
        counted = " OR ".join(f"sum({c}) <> 0" for c in COUNTERS)
        cur = await conn.execute(
            f"WITH r AS ({rollup}) SELECT {selected} FROM r GROUP BY {group} HAVING {counted} {order} "
            f"LIMIT {MAX_GROUPS + 1}",
            params)
        found: dict[tuple[str, ...], tuple[dict[str, int], dict[str, list[int]]]] = {}
        for row in await cur.fetchall():
            key = tuple(_key_text(v) for v in row[:len(keys)])
            found[key] = (dict(zip(COUNTERS, (int(v or 0) for v in row[len(keys):]), strict=True)), {})
        if len(found) > MAX_GROUPS:
            raise InvalidArgument(
                f"more than {MAX_GROUPS} groups: use fewer dimensions, a coarser bucket or a shorter range",
                field_violations=[FieldViolation("dimensions", f"at most {MAX_GROUPS} groups per query")])
        if query.needs_histograms and found:
            # Each row's histograms unnest to buckets 1..its longest (trailing empty buckets are not stored), so a
            # group's bucket numbers are 1..n without gaps and array_agg in bucket order rebuilds its histograms.
            inner_keys = ", ".join([*keys, "h.i"])
            sums = ", ".join(f"coalesce(sum(h.{h}), 0)::bigint AS {h}" for h in HISTOGRAMS)
            cur = await conn.execute(
                f"""WITH r AS ({rollup}),
                    b AS (SELECT {inner_keys}, {sums}
                          FROM r CROSS JOIN LATERAL unnest({", ".join(f"r.{h}" for h in HISTOGRAMS)})
                              WITH ORDINALITY AS h({", ".join(HISTOGRAMS)}, i)
                          GROUP BY {inner_keys})
                    SELECT {", ".join([*keys, *(f"array_agg({h} ORDER BY i)" for h in HISTOGRAMS)])}
                    FROM b GROUP BY {group}""",
                params)
            for row in await cur.fetchall():
                key = tuple(_key_text(v) for v in row[:len(keys)])
                if key not in found:  # a group of zeros, left out above (its latencies moved with its counts)
                    continue
                histograms = found[key][1]
                for name, values in zip(HISTOGRAMS, row[len(keys):], strict=True):
                    if values and any(values):  # None: no group at all had a histogram (an aggregate of nothing)
                        histograms[name] = list(values[:BUCKET_COUNT])
        return found

    def _rollup_rows(self, query: StatsQuery, columns: Sequence[str]) -> tuple[str, list[Any]]:
        """The UNION ALL of the tiles' rows, with key columns ``k_*``, and its parameters."""
        needed = _needed_columns(query, columns)
        parts: list[str] = []
        params: list[Any] = []
        bucket_key = [f"date_trunc('{query.bucket.value}', bucket, 'UTC') AS k_bucket"] if query.bucket else []
        selected = ", ".join([*bucket_key, *(f"{_KEY_EXPRESSIONS.get(c, c)} AS k_{c}" for c in columns), *COUNTERS,
                              *HISTOGRAMS])
        levels = _LEVELS[query.bucket]
        if query.bucket is not Resolution.MINUTE and query.end - query.start > MINUTE_EDGES_UP_TO:
            levels = tuple(level for level in levels if level is not Resolution.MINUTE)
        for resolution, low, high in tiles(query.start, query.end, levels, self.minutes_kept_since()):
            table = narrowest_table(resolution, needed)
            filters, filter_params = _filters(query, table)
            parts.append(f"SELECT {selected} FROM {table.name} WHERE bucket >= %s AND bucket < %s{filters}")
            params += [low, high, *filter_params]
        return " UNION ALL ".join(parts), params


def _needed_columns(query: StatsQuery, columns: Sequence[str]) -> set[str]:
    """The rollup key columns a query groups or filters by."""
    needed = set(columns)
    for column, value in (("tenant_id", query.tenant_id), ("message_class", query.message_class),
                          ("provider", query.provider), ("mailbox_provider", query.mailbox_provider),
                          ("campaign_id", query.campaign_id), ("tag", query.tag)):
        if value:
            needed.add(column)
    return needed


def narrowest_table(resolution: Resolution, columns: set[str]) -> RollupTable:
    """The rollup table of ``resolution`` with the fewest key columns that has every one of ``columns``."""
    return min((t for t in ROLLUP_TABLES if t.resolution is resolution and t.has(columns)),
               key=lambda table: len(table.keys))


_KEY_EXPRESSIONS = {"campaign_id": f"CASE WHEN campaign_id = '' THEN '' ELSE '{CAMPAIGN_PREFIX}' || campaign_id END"}
"""Key columns shown otherwise than stored: a campaign by its resource name."""


def _filters(query: StatsQuery, table: RollupTable) -> tuple[str, list[Any]]:
    """The WHERE clauses of ``query`` on ``table`` (which has every column they name)."""
    clauses: list[str] = []
    params: list[Any] = []
    if query.tenant_id:
        clauses.append("tenant_id = %s")
        params.append(query.tenant_id)
    for column, value in (("message_class", query.message_class), ("provider", query.provider),
                          ("mailbox_provider", query.mailbox_provider)):
        if value:
            clauses.append(f"{column} = %s")
            params.append(value)
    if query.campaign_id:
        # "<> ''" spelled out: a generic plan cannot derive it from "= %s", and without it the partial index
        # rollup_*_by_campaign is out of reach.
        clauses.append("campaign_id = %s AND campaign_id <> ''")
        params.append(query.campaign_id)
    if query.tag:
        clauses.append("tag = %s")
        params.append(query.tag)
    elif "tag" in query.dimensions:
        clauses.append("tag <> ''")
    elif table.has_tag_rows:
        clauses.append("tag = ''")  # the row of all messages: each message once (narrower tables hold only it)
    return "".join(f" AND {c}" for c in clauses), params


def _key_text(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def _merged(groups: Iterable[tuple[dict[str, int], dict[str, list[int]]]]
            ) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The groups added up (each message is in exactly one group unless grouped by tag)."""
    counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
    histograms: dict[str, list[int]] = {}
    for group_counters, group_histograms in groups:
        for name, value in group_counters.items():
            counters[name] += value
        for name, values in group_histograms.items():
            merged = histograms.setdefault(name, [0] * BUCKET_COUNT)
            for index, value in enumerate(values):
                merged[index] += value
    return counters, histograms

