"""What each batch of new events adds to the rollups: counters, cost sums and latency histograms per minute, hour and
day, keyed by every dimension stats group by.

Why rollups: at 150 M messages a day the events table grows by ~600 M rows a day; counting them per query cannot
stay fast. The consumer adds each new event to its rows in the transaction that records the event, so the figures
are exactly as deduplicated as the timeline (an event counts only when its timeline insert was new) and a
redelivered event never counts twice. A row's key is (tenant, bucket, message class, provider, mailbox provider,
tag, campaign id). ``tag = ''`` is the row of all messages; a message with tags is counted once more under each of
them, so grouping by tag reads only tagged rows and every other grouping only untagged ones. The same increments go
to every table of :data:`ROLLUP_TABLES`: ``rollup_minute`` (short ranges, kept for days), ``rollup_hour`` and
``rollup_day`` (months) with the full key, and hour and day tables keyed by fewer columns (per tenant, class and
provider; per class and provider for the platform) holding the row of all messages only; a query reads the coarsest
rows that tile its range, each from the narrowest table with the columns it needs (stats.py).

The campaign, tags, recipient (for the mailbox provider), credits and accept time of a message come with its
ACCEPTED event. Events recorded before it (the stream does not promise order) are counted under no campaign, no tag
and no mailbox provider, and remembered per message in ``reports.rollup_before_accept`` with the times of SENT and
DELIVERED events; the batch that records the ACCEPTED event moves the counts to the message's rows, adds them under
its tags, and only then counts what needed the message: the credits charged and the accept → sent / delivered
latencies (:meth:`StatsRollup.attribute_early`).

What each event adds (``_increments``): ACCEPTED, SENT, DELIVERED, DEFERRED, COMPLAINED, OPENED, CLICKED,
UNSUBSCRIBED and CANCELLED their own counter; BOUNCED ``bounced_hard`` or ``bounced_soft`` (a bounce of unknown
type counts soft); FAILED and REJECTED ``failed``, except a FAILED event for a recipient found suppressed right
before the call, which counts ``suppressed``. Every provider call is reported in exactly one event carrying its
latency (ATTEMPTED for a call that failed and is retried, SENT for the call that took the message, FAILED for a
call the provider refused for good): those with a provider count ``provider_calls``, ATTEMPTED ones also
``provider_throttled`` (a 429-style answer) or ``provider_errors``, FAILED ones ``provider_errors``. SENT adds the
message's credits (what the ledger charges when a provider takes the email) and the provider's price at send time
(the sender puts it on the event). DEAD_LETTERED is not counted: the sender follows it with FAILED.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

import psycopg

from libs.common.event_types import REASON_CODE_ATTRIBUTE, SUPPRESSED_REASON_CODE
from services.reports.latency_histograms import BUCKET_COUNT, bucket_index
from services.reports.models import EventType, MessageEventRecord

__all__ = [
    "COUNTERS",
    "HISTOGRAMS",
    "ROLLUP_TABLES",
    "EarlyCount",
    "MessageFacts",
    "Resolution",
    "RollupTable",
    "StatsRollup",
    "campaign_id_of",
    "claimed_early",
    "forget_early_counts",
    "start_claim_early",
]

COUNTERS = ("accepted", "sent", "delivered", "deferred", "bounced_hard", "bounced_soft", "failed", "complained",
            "opened", "clicked", "unsubscribed", "cancelled", "suppressed", "provider_calls", "provider_errors",
            "provider_throttled", "credits_charged", "provider_cost_micros")
"""Summed columns of a rollup row."""
HISTOGRAMS = ("call_latency", "send_latency", "delivery_latency")
"""Latency histograms of a rollup row: one provider call, accept → sent, accept → delivered."""
_EARLY_COUNTERS = tuple(c for c in COUNTERS if c != "credits_charged")
"""What is counted of an event recorded before its message's ACCEPTED event (credits need the message)."""

_OWN_COUNTER: Mapping[EventType, str] = {
    EventType.ACCEPTED: "accepted",
    EventType.SENT: "sent",
    EventType.DELIVERED: "delivered",
    EventType.DEFERRED: "deferred",
    EventType.REJECTED: "failed",
    EventType.COMPLAINED: "complained",
    EventType.OPENED: "opened",
    EventType.CLICKED: "clicked",
    EventType.UNSUBSCRIBED: "unsubscribed",
    EventType.CANCELLED: "cancelled",
}
_CALL_EVENTS = frozenset({EventType.ATTEMPTED, EventType.SENT, EventType.FAILED})
_THROTTLED_OUTCOME = "throttled"
_HARD_BOUNCE = "hard"
CAMPAIGN_PREFIX = "campaigns/"
"""A campaign's resource name is ``campaigns/{id}``; the rollups keep the id."""


def campaign_id_of(campaign: str) -> str:
    """The id of a campaign named ``campaigns/{id}`` (a message's ``campaign``); '' for a message of none."""
    return campaign.removeprefix(CAMPAIGN_PREFIX)


class Resolution(StrEnum):
    """The time buckets rollups are kept in, finest first."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def table(self) -> str:
        """The full-key rollup table of this resolution."""
        return f"reports.rollup_{self.value}"

    @property
    def step(self) -> timedelta:
        """The length of one bucket."""
        return _STEPS[self]

    def floor(self, moment: datetime) -> datetime:
        """The start of the bucket holding ``moment`` (an aware UTC datetime)."""
        if self is Resolution.MINUTE:
            return moment.replace(second=0, microsecond=0)
        if self is Resolution.HOUR:
            return moment.replace(minute=0, second=0, microsecond=0)
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)


_STEPS = {Resolution.MINUTE: timedelta(minutes=1), Resolution.HOUR: timedelta(hours=1),
          Resolution.DAY: timedelta(days=1)}


_KEY_DIMENSIONS = ("tenant_id", "message_class", "provider", "mailbox_provider", "tag", "campaign_id")
"""A rollup key's columns besides its bucket, in :data:`RollupKey` order."""


@dataclass(frozen=True)
class RollupTable:
    """One rollup table: its resolution and the key columns (besides ``bucket``) it keeps.

    The full-key tables hold every row, tag rows included; the narrower ones hold the row of all messages only,
    summed over the columns they leave out, so a query that groups and filters by none of those reads far fewer
    rows (``stats.py`` picks the narrowest table that has what a query needs)."""

    name: str
    resolution: Resolution
    keys: tuple[str, ...]

    @property
    def has_tag_rows(self) -> bool:
        """Whether rows per tag are kept (the full-key tables)."""
        return "tag" in self.keys

    def has(self, columns: Iterable[str]) -> bool:
        """Whether every one of ``columns`` is a key column of this table."""
        return all(column in self.keys for column in columns)


ROLLUP_TABLES = (
    RollupTable("reports.rollup_minute", Resolution.MINUTE, _KEY_DIMENSIONS),
    RollupTable("reports.rollup_hour", Resolution.HOUR, _KEY_DIMENSIONS),
    RollupTable("reports.rollup_day", Resolution.DAY, _KEY_DIMENSIONS),
    RollupTable("reports.rollup_hour_by_provider", Resolution.HOUR, ("tenant_id", "message_class", "provider")),
    RollupTable("reports.rollup_day_by_provider", Resolution.DAY, ("tenant_id", "message_class", "provider")),
    RollupTable("reports.rollup_hour_platform", Resolution.HOUR, ("message_class", "provider")),
    RollupTable("reports.rollup_day_platform", Resolution.DAY, ("message_class", "provider")),
)
"""Every rollup table, each written with the same increments."""


class MessageFacts(NamedTuple):
    """What a message row says that the rollups need (known once its ACCEPTED event is recorded)."""

    message_class: str
    tags: tuple[str, ...]
    campaign_id: str
    mailbox_provider: str
    credits: int
    accept_time: datetime | None
    """When the message was accepted, or for a scheduled one when it was due (latencies start there)."""
    accepted_seen: bool


@dataclass
class _Row:
    counters: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, list[int]] = field(default_factory=dict)

    def apply(self, amounts: Sequence[tuple[str, int]], samples: Sequence[tuple[str, int]]) -> None:
        """Add each ``(counter, amount)`` and one latency to each ``(histogram, bucket index)``."""
        own = self.counters
        for name, amount in amounts:
            own[name] = own.get(name, 0) + amount
        for name, index in samples:
            buckets = self.histograms.get(name)
            if buckets is None:
                buckets = self.histograms[name] = [0] * BUCKET_COUNT
            buckets[index] += 1

    def add(self, counters: Mapping[str, int], histograms: Mapping[str, Sequence[int]], sign: int = 1) -> None:
        """Add (``sign`` 1) or take away (-1) counts and histograms."""
        own = self.counters
        for name, value in counters.items():
            if value:
                own[name] = own.get(name, 0) + sign * value
        for name, values in histograms.items():
            if not any(values):
                continue
            buckets = self.histograms.get(name)
            if buckets is None:
                buckets = self.histograms[name] = [0] * BUCKET_COUNT
            # Element-wise in C: folding a batch's minute rows into hours and days adds thousands of histograms,
            # and a Python loop over each one's buckets was most of the consumer's rollup time.
            values = values[:BUCKET_COUNT]
            buckets[:len(values)] = map(operator.add if sign == 1 else operator.sub, buckets, values)

    def copy(self) -> _Row:
        """What ``_Row().add(self.counters, self.histograms)`` makes (the non-zero counters and histograms), without
        adding bucket by bucket."""
        return _Row({name: value for name, value in self.counters.items() if value},
                    {name: values[:BUCKET_COUNT] + [0] * (BUCKET_COUNT - len(values))
                     for name, values in self.histograms.items() if any(values)})

    def as_json(self) -> dict[str, object]:
        """The row for the upsert's JSON: non-zero counters, and histograms without their trailing empty buckets
        (latencies fill the first ~40 of 80: half the JSON to encode and parse; ``add_buckets`` takes arrays of
        any length)."""
        return {**{name: value for name, value in self.counters.items() if value},
                **{name: _trimmed(values) for name, values in self.histograms.items() if any(values)}}


def _trimmed(values: list[int]) -> list[int]:
    end = len(values)
    while end and not values[end - 1]:
        end -= 1
    return values[:end]


@dataclass
class _EarlyRow(_Row):
    sent_times: list[str] = field(default_factory=list)
    delivered_times: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {**super().as_json(), "sent_times": self.sent_times, "delivered_times": self.delivered_times}


RollupKey = tuple[str, datetime, str, str, str, str, str]
"""(tenant, minute, message class, provider, mailbox provider, tag, campaign id)."""
EarlyKey = tuple[str, str, datetime, str, str]
"""(tenant, message id, minute, message class, provider)."""
_EARLY_KEY_COLUMNS = ("tenant_id", "message_id", "bucket", "message_class", "provider")


class EarlyCount(NamedTuple):
    """What one message's events recorded before its ACCEPTED event added to its row of no campaign, no tag and
    no mailbox provider, with the times of its SENT and DELIVERED events."""

    tenant_id: str
    message_id: str
    bucket: datetime
    message_class: str
    provider: str
    counters: Mapping[str, int]
    call_latency: Sequence[int]
    sent_times: Sequence[datetime]
    delivered_times: Sequence[datetime]


def _increments(event: MessageEventRecord) -> list[str]:
    """The counters one event adds 1 to (cost and credits aside)."""
    event_type = event.event_type
    counters: list[str] = []
    own = _OWN_COUNTER.get(event_type)
    if own is not None:
        counters.append(own)
    elif event_type is EventType.BOUNCED:
        counters.append("bounced_hard" if event.bounce_type == _HARD_BOUNCE else "bounced_soft")
    elif event_type is EventType.FAILED:
        suppressed = event.attributes.get(REASON_CODE_ATTRIBUTE) == SUPPRESSED_REASON_CODE
        counters.append("suppressed" if suppressed else "failed")
    if event_type in _CALL_EVENTS and event.provider:
        counters.append("provider_calls")
        if event_type is EventType.ATTEMPTED:
            counters.append("provider_throttled" if event.outcome == _THROTTLED_OUTCOME else "provider_errors")
        elif event_type is EventType.FAILED:
            counters.append("provider_errors")
    return counters


def _since_ms(moment: datetime, start: datetime) -> float:
    return max(0.0, (moment - start).total_seconds() * 1000)


def _message_fact_counts(amounts: list[tuple[str, int]], samples: list[tuple[str, int]], event_type: EventType,
                         event_time: datetime, facts: MessageFacts) -> None:
    """Append what needs the message: credits charged when it was sent, and the latency from its accept time to the
    send or the delivery."""
    if event_type is EventType.SENT:
        if facts.credits:
            amounts.append(("credits_charged", facts.credits))
        if facts.accept_time is not None:
            samples.append(("send_latency", bucket_index(_since_ms(event_time, facts.accept_time))))
    elif event_type is EventType.DELIVERED and facts.accept_time is not None:
        samples.append(("delivery_latency", bucket_index(_since_ms(event_time, facts.accept_time))))


class StatsRollup:
    """The increments one batch of new events makes to the rollup rows."""

    def __init__(self) -> None:
        self._rows: dict[RollupKey, _Row] = {}
        self._early: dict[EarlyKey, _EarlyRow] = {}

    def _row(self, key: RollupKey) -> _Row:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row()
        return row

    def _rows_of(self, tenant_id: str, minute: datetime, message_class: str, provider: str,
                 facts: MessageFacts) -> list[_Row]:
        """The message's row of all messages and its row under each of its tags."""
        base = (tenant_id, minute, message_class, provider, facts.mailbox_provider)
        tags = dict.fromkeys(t for t in facts.tags if t)
        return [self._row((*base, tag, facts.campaign_id)) for tag in ("", *tags)]

    def add(self, event: MessageEventRecord, facts: MessageFacts) -> None:
        """Count one new event under the message's rows; before its ACCEPTED event, under the row of no campaign,
        tag or mailbox provider, remembered for :meth:`attribute_early`."""
        counters = _increments(event)
        call_latency = event.latency_ms if event.latency_ms > 0 and event.event_type in _CALL_EVENTS else 0
        if not counters and not call_latency:
            return
        minute = event.event_time.replace(second=0, microsecond=0)
        message_class = event.message_class or facts.message_class
        if facts.accepted_seen:
            rows = self._rows_of(event.tenant_id, minute, message_class, event.provider, facts)
        else:
            rows = [self._row((event.tenant_id, minute, message_class, event.provider, "", "", ""))]
        # What the event adds, worked out once for all its rows (the row of all messages and one per tag).
        amounts = [(counter, 1) for counter in counters]
        if event.provider_cost_micros:
            amounts.append(("provider_cost_micros", event.provider_cost_micros))
        samples = [("call_latency", bucket_index(call_latency))] if call_latency else []
        if facts.accepted_seen:
            _message_fact_counts(amounts, samples, event.event_type, event.event_time, facts)
        for row in rows:
            row.apply(amounts, samples)
        if not facts.accepted_seen:
            key = (event.tenant_id, event.message_id, minute, message_class, event.provider)
            early = self._early.get(key)
            if early is None:
                early = self._early[key] = _EarlyRow()
            early.apply(amounts, samples)
            if event.event_type is EventType.SENT:
                early.sent_times.append(event.event_time.isoformat())
            elif event.event_type is EventType.DELIVERED:
                early.delivered_times.append(event.event_time.isoformat())

    @staticmethod
    def _count_message_facts(row: _Row, event_type: EventType, event_time: datetime, facts: MessageFacts) -> None:
        """What needs the message: credits charged when it was sent, and latencies from its accept time."""
        amounts: list[tuple[str, int]] = []
        samples: list[tuple[str, int]] = []
        _message_fact_counts(amounts, samples, event_type, event_time, facts)
        row.apply(amounts, samples)

    def attribute_early(self, early: EarlyCount, facts: MessageFacts) -> None:
        """Move counts made before the message's ACCEPTED event from its row of no campaign, tag and mailbox
        provider to its own rows, and count what needed the message."""
        base = (early.tenant_id, early.bucket, early.message_class, early.provider)
        histograms = {"call_latency": early.call_latency}
        targets = self._rows_of(early.tenant_id, early.bucket, early.message_class, early.provider, facts)
        unattributed = self._row((*base, "", "", ""))
        if targets[0] is not unattributed:
            unattributed.add(early.counters, histograms, -1)
            targets[0].add(early.counters, histograms)
        for row in targets[1:]:
            row.add(early.counters, histograms)
        for row in targets:
            for sent_time in early.sent_times:
                self._count_message_facts(row, EventType.SENT, sent_time, facts)
            for delivered_time in early.delivered_times:
                self._count_message_facts(row, EventType.DELIVERED, delivered_time, facts)

    def __len__(self) -> int:
        return len(self._rows)

    def rows_for(self, table: RollupTable) -> dict[tuple[object, ...], _Row]:
        """The increments folded into ``table``'s rows: keys ``(bucket, *table.keys)``.

        A row that only one row of the batch folds into is that row itself, not a copy (a batch usually spans a
        minute or two, so most hour and day rows are): treat the rows as read-only."""
        pick = operator.itemgetter(*(1 + _KEY_DIMENSIONS.index(k) if k != "tenant_id" else 0 for k in table.keys))
        floor = table.resolution.floor
        floors: dict[datetime, datetime] = {}
        folded: dict[tuple[object, ...], _Row] = {}
        shared: set[tuple[object, ...]] = set()
        for key, row in self._rows.items():
            if not table.has_tag_rows and key[5]:
                continue  # a tag row: narrower tables keep the row of all messages only
            bucket = floors.get(key[1])
            if bucket is None:
                bucket = floors[key[1]] = floor(key[1])
            target_key = (bucket, *pick(key))
            target = folded.get(target_key)
            if target is None:
                folded[target_key] = row
                shared.add(target_key)
                continue
            if target_key in shared:  # copy on the second write: the batch's own row stays as it is
                target = folded[target_key] = target.copy()
                shared.discard(target_key)
            target.add(row.counters, row.histograms)
        return folded

    async def write(self, conn: psycopg.AsyncConnection) -> None:
        """Add the increments to every rollup table and the counts made before their message's ACCEPTED event to
        ``reports.rollup_before_accept`` (in the caller's transaction).

        Rows are written in key order so that concurrent consumers lock them in the same order (no deadlocks).
        """
        if self._rows:
            bodies: dict[int, tuple[_Row, str]] = {}
            async with conn.pipeline():
                for table in ROLLUP_TABLES:
                    await conn.execute(_ADD_ROLLUPS[table.name], (_rows_json(table, self.rows_for(table), bodies),))
        if self._early:
            early = [{**dict(zip(_EARLY_KEY_COLUMNS, (k[0], k[1], k[2].isoformat(), *k[3:]), strict=True)),
                      **row.as_json()}
                     for k, row in sorted(self._early.items(), key=_by_early_key)]
            await conn.execute(_ADD_EARLY, (json.dumps(early, separators=(",", ":")),))


_quoted = functools.lru_cache(maxsize=1 << 16)(json.dumps)
"""A key column's value as a JSON string (a few hundred distinct values recur in every batch and table)."""
_iso = functools.lru_cache(maxsize=1 << 12)(datetime.isoformat)


def _row_body(row: _Row) -> str:
    """The JSON object of a row's figures without its opening brace, after a comma: what follows the key columns."""
    figures = row.as_json()
    return "," + json.dumps(figures, separators=(",", ":"))[1:] if figures else "}"


def _rows_json(table: RollupTable, rows: Mapping[tuple[object, ...], _Row], bodies: dict[int, tuple[_Row, str]]
               ) -> str:
    """The upsert's JSON recordset for ``table``, in key order (the lock order). A row's figures are encoded once
    for every table it is written to unchanged (``bodies``, by row: the minute, hour and day rows of a batch are
    mostly the same rows); the key columns are pieced together from cached strings."""
    names = [f',"{column}":' for column in table.keys]
    parts = []
    for key, row in sorted(rows.items(), key=_by_key):
        cached = bodies.get(id(row))
        if cached is None:
            cached = bodies[id(row)] = (row, _row_body(row))  # the row kept alive with it: ids are not reused
        bucket, *values = key
        parts.append("".join(['{"bucket":"', _iso(bucket), '"',
                              *[name + _quoted(value) for name, value in zip(names, values, strict=True)],
                              cached[1]]))
    return "[" + ",".join(parts) + "]"


def _by_key(item: tuple[tuple[object, ...], _Row]) -> tuple[object, ...]:
    return item[0]


def _by_table_key(item: tuple[tuple[object, ...], _Row]) -> tuple[str, ...]:
    bucket, *rest = item[0]
    return (bucket.isoformat(), *map(str, rest))  # type: ignore[attr-defined]


def _by_early_key(item: tuple[EarlyKey, _EarlyRow]) -> EarlyKey:
    return item[0]


def _merge_histogram(name: str) -> str:
    return (f"{name} = CASE WHEN cardinality(excluded.{name}) = 0 THEN s.{name}"
            f" ELSE reports.add_buckets(s.{name}, excluded.{name}) END")


def _upsert(table: str, key_columns: Sequence[tuple[str, str]], counters: Sequence[str],
            histograms: Sequence[str], appended: Sequence[str] = ()) -> str:
    """Add rows of counters and histograms to ``table`` (one JSON recordset parameter); ``appended`` array
    columns are concatenated."""
    keys = [name for name, _ in key_columns]
    values = [*counters, *histograms, *appended]
    declared = ", ".join([*(f"{name} {kind}" for name, kind in key_columns), *(f"{c} bigint" for c in counters),
                          *(f"{h} bigint[]" for h in histograms), *(f"{a} timestamptz[]" for a in appended)])
    selected = ", ".join([*(f"r.{k}" for k in keys), *(f"coalesce(r.{c}, 0)" for c in counters),
                          *(f"coalesce(r.{h}, '{{}}')" for h in histograms),
                          *(f"coalesce(r.{a}, '{{}}')" for a in appended)])
    updates = ", ".join([*(f"{c} = s.{c} + excluded.{c}" for c in counters), *map(_merge_histogram, histograms),
                         *(f"{a} = s.{a} || excluded.{a}" for a in appended)])
    return f"""
INSERT INTO {table} AS s ({", ".join([*keys, *values])})
SELECT {selected}
FROM json_to_recordset(%s::json) AS r({declared})
ON CONFLICT ({", ".join(keys)}) DO UPDATE SET {updates}
"""


_ADD_ROLLUPS = {table.name: _upsert(table.name, (("bucket", "timestamptz"), *((k, "text") for k in table.keys)),
                                    COUNTERS, HISTOGRAMS) for table in ROLLUP_TABLES}
_ADD_EARLY = _upsert("reports.rollup_before_accept", (
    ("tenant_id", "text"), ("message_id", "text"), ("bucket", "timestamptz"), ("message_class", "text"),
    ("provider", "text"),
), _EARLY_COUNTERS, ("call_latency",), ("sent_times", "delivered_times"))
_CLAIM_EARLY = f"""
DELETE FROM reports.rollup_before_accept AS b
USING json_to_recordset(%s::json) AS k(tenant_id text, message_id text)
WHERE b.tenant_id = k.tenant_id AND b.message_id = k.message_id
RETURNING b.tenant_id, b.message_id, b.bucket, b.message_class, b.provider,
    {", ".join(f"b.{c}" for c in _EARLY_COUNTERS)}, b.call_latency, b.sent_times, b.delivered_times
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
    for tenant_id, message_id, bucket, message_class, provider, *rest in await cursor.fetchall():
        counts, (call_latency, sent_times, delivered_times) = rest[:-3], rest[-3:]
        claimed.append(EarlyCount(tenant_id, message_id, bucket, message_class, provider,
                                  dict(zip(_EARLY_COUNTERS, counts, strict=True)), list(call_latency or []),
                                  list(sent_times or []), list(delivered_times or [])))
    return claimed


async def forget_early_counts(conn: psycopg.AsyncConnection, older_than: timedelta) -> None:
    """Drop counts waiting longer than ``older_than`` for an ACCEPTED event (it will not come: ingest publishes
    it from its outbox within seconds), so the table stays as small as the reordering it covers."""
    await conn.execute("DELETE FROM reports.rollup_before_accept WHERE recorded_at < now() - %s", (older_than,))
