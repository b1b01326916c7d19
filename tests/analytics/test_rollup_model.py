"""The rollup model against a real Postgres: what each recorded event adds to the minute, hour and day rollups,
how a range is tiled over them, and day partitions with retention.

The recorder runs directly (``record_events`` on hand-built events, in a migrated reports database of this module's
own): no consumer or sweep races the test for the rows it reads.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.common.db import create_pool, migrate_services
from services.reports.latency_histograms import bucket_index
from services.reports.models import AcceptedMessage, EventType, Mailbox, MessageEventRecord
from services.reports.recorder import record_events
from services.reports.retention import EVENTS, ROLLUP_MINUTE, RetentionPolicy, RetentionWorker, partition_days
from services.reports.rollups import COUNTERS, ROLLUP_TABLES, Resolution
from services.reports.stats import (
    COMPLAINT_RATE_CRITICAL,
    COMPLAINT_RATE_WARNING,
    ComplaintRateStatus,
    StatsFigures,
    narrowest_table,
    tiles,
)

T0 = datetime(2024, 3, 5, 10, 0, 0, tzinfo=UTC)
"""The tests' events happen in March 2024 (the rollup tests' database has no partitions: they land in the
default partitions, as late events do)."""


@pytest.fixture(scope="module")
async def reports_dsn(new_database: Callable[[], str]) -> str:
    dsn = new_database()
    await migrate_services(dsn, ["reports"])
    return dsn


@pytest.fixture
async def conn(reports_dsn: str) -> AsyncIterator[psycopg.AsyncConnection]:
    connection = await psycopg.AsyncConnection.connect(reports_dsn, autocommit=True)
    async with connection:
        yield connection


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def event(tenant: str, message_id: str, event_type: EventType, when: datetime, **fields: Any) -> MessageEventRecord:
    """A message event as the consumer decodes it (a fresh event id unless given)."""
    return MessageEventRecord(event_id=fields.pop("event_id", _id("ev")), tenant_id=tenant, message_id=message_id,
                              event_type=event_type, event_time=when, message_class=fields.pop("message_class",
                                                                                              "transactional"),
                              **fields)


def accepted(tenant: str, message_id: str, when: datetime, *, to: str = "ann@gmail.com", tags: Sequence[str] = (),
             campaign: str = "", credits: int = 4, **fields: Any) -> MessageEventRecord:
    """The ACCEPTED event, carrying the message as ingest accepted it."""
    message = AcceptedMessage(message_class="transactional", sender=Mailbox("shop@example.net"), to=(Mailbox(to),),
                              subject="Hello", tags=tuple(tags), credits=credits, campaign=campaign, create_time=when)
    return event(tenant, message_id, EventType.ACCEPTED, when, accepted=message, **fields)


async def record(conn: psycopg.AsyncConnection, *events: MessageEventRecord) -> None:
    """One consumer batch, in one transaction."""
    async with conn.transaction():
        await record_events(conn, list(events))


_KEYS = ("message_class", "provider", "mailbox_provider", "tag", "campaign_id")


async def rollup_rows(conn: psycopg.AsyncConnection, tenant: str,
                      resolution: Resolution = Resolution.MINUTE) -> dict[tuple[str, ...], dict[str, Any]]:
    """The tenant's rollup rows of one table summed over time, keyed by (class, provider, mailbox provider, tag,
    campaign), with their counters and histograms; rows of nothing but zeros left out."""
    cur = await conn.execute(
        f"SELECT {', '.join(_KEYS)}, {', '.join(COUNTERS)}, call_latency, send_latency, delivery_latency "
        f"FROM {resolution.table} WHERE tenant_id = %s", (tenant,))
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for values in await cur.fetchall():
        key = tuple(values[:len(_KEYS)])
        row = rows.setdefault(key, {"histograms": {}})
        for name, value in zip(COUNTERS, values[len(_KEYS):len(_KEYS) + len(COUNTERS)], strict=True):
            row[name] = row.get(name, 0) + value
        for name, buckets in zip(("call_latency", "send_latency", "delivery_latency"), values[-3:], strict=True):
            merged = row["histograms"].setdefault(name, {})
            for index, count in enumerate(buckets or []):
                if count:
                    merged[index] = merged.get(index, 0) + count
    return {key: row for key, row in rows.items()
            if any(row[c] for c in COUNTERS) or any(any(h.values()) for h in row["histograms"].values())}


def counters(row: Mapping[str, Any], *names: str) -> dict[str, int]:
    """The row's non-zero counters (or the named ones)."""
    return {n: row[n] for n in (names or COUNTERS) if names or row[n]}


def _ms(later: datetime, earlier: datetime) -> float:
    return (later - earlier) / timedelta(milliseconds=1)


# -- what events add -----------------------------------------------------------------------------------------------
async def test_events_recorded_before_their_accepted_event_end_up_under_its_campaign_tags_and_mailbox_provider(
        conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = _id("tenant"), _id("msg")
    sent_at, delivered_at = T0 + timedelta(seconds=2), T0 + timedelta(seconds=9)
    await record(conn,
                 event(tenant, message_id, EventType.SENT, sent_at, provider="ses-1", latency_ms=120,
                       provider_cost_micros=250),
                 event(tenant, message_id, EventType.DELIVERED, delivered_at, provider="ses-1"))
    await record(conn, accepted(tenant, message_id, T0, to="ann@gmail.com", tags=("promo", "spring"),
                                campaign="campaigns/c-1", credits=4))

    got = await rollup_rows(conn, tenant)
    sent_counts = {"sent": 1, "delivered": 1, "provider_calls": 1, "credits_charged": 4, "provider_cost_micros": 250}
    latencies = {"call_latency": {bucket_index(120): 1}, "send_latency": {bucket_index(_ms(sent_at, T0)): 1},
                 "delivery_latency": {bucket_index(_ms(delivered_at, T0)): 1}}
    no_latencies: dict[str, dict[int, int]] = {"call_latency": {}, "send_latency": {}, "delivery_latency": {}}
    # Each row once: the row of all messages ('') and one per tag; the early counts left no row of their own.
    assert {key: (counters(row), row["histograms"]) for key, row in got.items()} == {
        **{("transactional", "", "gmail", tag, "c-1"): ({"accepted": 1}, no_latencies)
           for tag in ("", "promo", "spring")},
        **{("transactional", "ses-1", "gmail", tag, "c-1"): (sent_counts, latencies)
           for tag in ("", "promo", "spring")},
    }
    cur = await conn.execute("SELECT count(*) FROM reports.rollup_before_accept WHERE tenant_id = %s", (tenant,))
    assert await cur.fetchone() == (0,)


async def test_an_early_event_redelivered_after_the_accepted_event_counts_once(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = _id("tenant"), _id("msg")
    sent = event(tenant, message_id, EventType.SENT, T0 + timedelta(seconds=1), provider="ses-1", latency_ms=80)
    await record(conn, sent)
    await record(conn, accepted(tenant, message_id, T0, tags=("promo",)))
    await record(conn, sent)

    got = await rollup_rows(conn, tenant)
    for tag in ("", "promo"):
        row = got[("transactional", "ses-1", "gmail", tag, "")]
        assert counters(row, "sent", "provider_calls", "credits_charged") == {
            "sent": 1, "provider_calls": 1, "credits_charged": 4}
        assert sum(row["histograms"]["send_latency"].values()) == 1


async def test_a_redelivered_event_never_counts_twice(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = _id("tenant"), _id("msg")
    batch = [accepted(tenant, message_id, T0),
             event(tenant, message_id, EventType.SENT, T0 + timedelta(seconds=1), provider="ses-1", latency_ms=90,
                   provider_cost_micros=100),
             event(tenant, message_id, EventType.DELIVERED, T0 + timedelta(seconds=5), provider="ses-1")]
    await record(conn, *batch, batch[1])  # twice within a batch ...
    before = await rollup_rows(conn, tenant)
    await record(conn, *batch)  # ... and the whole batch again

    after = await rollup_rows(conn, tenant)
    assert after == before
    assert counters(after[("transactional", "ses-1", "gmail", "", "")]) == {
        "sent": 1, "delivered": 1, "provider_calls": 1, "credits_charged": 4, "provider_cost_micros": 100}


async def test_a_failed_event_for_a_suppressed_recipient_counts_suppressed_not_failed(
        conn: psycopg.AsyncConnection) -> None:
    tenant, suppressed_id, failed_id = _id("tenant"), _id("msg"), _id("msg")
    await record(conn, accepted(tenant, suppressed_id, T0), accepted(tenant, failed_id, T0),
                 event(tenant, suppressed_id, EventType.FAILED, T0 + timedelta(seconds=1),
                       reason="recipient suppressed", attributes={"reason_code": "SUPPRESSED"}),
                 event(tenant, failed_id, EventType.FAILED, T0 + timedelta(seconds=1), reason="no provider took it"))

    row = (await rollup_rows(conn, tenant))[("transactional", "", "gmail", "", "")]
    assert counters(row, "accepted", "suppressed", "failed", "provider_calls") == {
        "accepted": 2, "suppressed": 1, "failed": 1, "provider_calls": 0}


async def test_a_throttled_attempt_counts_throttled_and_a_failed_one_an_error(conn: psycopg.AsyncConnection) -> None:
    tenant, message_id = _id("tenant"), _id("msg")
    await record(conn, accepted(tenant, message_id, T0),
                 event(tenant, message_id, EventType.ATTEMPTED, T0 + timedelta(seconds=1), provider="ses-1",
                       outcome="throttled", latency_ms=30, attempt=1),
                 event(tenant, message_id, EventType.ATTEMPTED, T0 + timedelta(seconds=2), provider="ses-1",
                       outcome="retryable", latency_ms=40, attempt=2),
                 event(tenant, message_id, EventType.SENT, T0 + timedelta(seconds=3), provider="ses-1",
                       latency_ms=50, attempt=3))

    row = (await rollup_rows(conn, tenant))[("transactional", "ses-1", "gmail", "", "")]
    assert counters(row, "provider_calls", "provider_throttled", "provider_errors", "sent") == {
        "provider_calls": 3, "provider_throttled": 1, "provider_errors": 1, "sent": 1}
    assert row["histograms"]["call_latency"] == {bucket_index(30): 1, bucket_index(40): 1, bucket_index(50): 1}


async def test_the_minute_hour_and_day_tables_agree(conn: psycopg.AsyncConnection) -> None:
    tenant = _id("tenant")
    moments = [T0 + timedelta(minutes=m) for m in (0, 1, 59, 61, 120, 60 * 14 - 1, 60 * 14 + 5)]  # two days
    for number, moment in enumerate(moments):
        message_id = _id("msg")
        await record(conn, accepted(tenant, message_id, moment, tags=("t",) if number % 2 else ()),
                     event(tenant, message_id, EventType.SENT, moment + timedelta(seconds=30), provider="ses-1",
                           latency_ms=10 * (number + 1), provider_cost_micros=100),
                     event(tenant, message_id, EventType.BOUNCED, moment + timedelta(seconds=50), provider="ses-1",
                           bounce_type="hard" if number % 3 else "soft"))

    tables = {resolution: await rollup_rows(conn, tenant, resolution) for resolution in Resolution}
    assert tables[Resolution.MINUTE] == tables[Resolution.HOUR] == tables[Resolution.DAY]
    per_bucket: dict[Resolution, dict[datetime, int]] = {}
    for resolution in Resolution:
        cur = await conn.execute(f"SELECT bucket, sum(sent) FROM {resolution.table} WHERE tenant_id = %s "
                                 "AND tag = '' GROUP BY bucket", (tenant,))
        per_bucket[resolution] = {bucket: int(total) for bucket, total in await cur.fetchall() if total}
    for coarse in (Resolution.HOUR, Resolution.DAY):
        folded: dict[datetime, int] = {}
        for minute, total in per_bucket[Resolution.MINUTE].items():
            folded[coarse.floor(minute)] = folded.get(coarse.floor(minute), 0) + total
        assert folded == per_bucket[coarse]
    assert len(per_bucket[Resolution.DAY]) == 2


async def test_the_narrower_tables_hold_the_full_tables_rows_of_all_messages_summed(
        conn: psycopg.AsyncConnection) -> None:
    tenant = _id("tenant")
    for number, to in enumerate(("a@gmail.com", "b@yahoo.com", "c@example.org", "d@gmail.com")):
        message_id, moment = _id("msg"), T0 + timedelta(minutes=7 * number)
        await record(conn, accepted(tenant, message_id, moment, to=to, tags=("x", "y") if number % 2 else (),
                                    campaign="campaigns/spring" if number < 2 else ""),
                     event(tenant, message_id, EventType.SENT, moment + timedelta(seconds=3), provider="ses-1",
                           latency_ms=20 + number, provider_cost_micros=90),
                     event(tenant, message_id, EventType.DELIVERED, moment + timedelta(seconds=9), provider="ses-1"))

    summed = ", ".join([*(f"sum({c})::bigint" for c in COUNTERS),
                        *(f"reports.sum_buckets({h})" for h in ("call_latency", "send_latency", "delivery_latency"))])
    for resolution in (Resolution.HOUR, Resolution.DAY):
        narrow = {t.keys: t.name for t in ROLLUP_TABLES if t.resolution is resolution and not t.has_tag_rows}
        cur = await conn.execute(f"SELECT bucket, message_class, provider, {summed} FROM {resolution.table} "
                                 "WHERE tenant_id = %s AND tag = '' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (tenant,))
        full = await cur.fetchall()
        cur = await conn.execute(f"SELECT bucket, message_class, provider, {summed} "
                                 f"FROM {narrow[('tenant_id', 'message_class', 'provider')]} "
                                 "WHERE tenant_id = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (tenant,))
        assert await cur.fetchall() == full
        assert sum(row[3 + COUNTERS.index("delivered")] for row in full) == 4
    cur = await conn.execute("SELECT sum(delivered) FROM reports.rollup_day_platform")
    platform = (await cur.fetchone() or (0,))[0]
    cur = await conn.execute("SELECT sum(delivered) FROM reports.rollup_day WHERE tag = ''")
    assert platform == (await cur.fetchone() or (0,))[0]


@pytest.mark.parametrize(("resolution", "columns", "table"), [
    (Resolution.DAY, {"tenant_id", "provider"}, "reports.rollup_day_by_provider"),
    (Resolution.DAY, {"provider", "message_class"}, "reports.rollup_day_platform"),
    (Resolution.HOUR, {"tenant_id", "mailbox_provider"}, "reports.rollup_hour"),
    (Resolution.DAY, {"tenant_id", "tag"}, "reports.rollup_day"),
    (Resolution.DAY, {"tenant_id", "campaign_id"}, "reports.rollup_day"),
    (Resolution.MINUTE, {"tenant_id", "provider"}, "reports.rollup_minute"),
])
def test_a_query_reads_the_narrowest_table_with_every_column_it_needs(resolution: Resolution, columns: set[str],
                                                                      table: str) -> None:
    assert narrowest_table(resolution, columns).name == table


# -- complaint-rate status -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("complained", "delivered", "status"), [
    (0, 1000, ComplaintRateStatus.OK), (0, 0, ComplaintRateStatus.OK), (9, 10_000, ComplaintRateStatus.OK),
    (1, 1000, ComplaintRateStatus.WARNING), (29, 10_000, ComplaintRateStatus.WARNING),
    (3, 1000, ComplaintRateStatus.CRITICAL), (1, 3, ComplaintRateStatus.CRITICAL),
])
def test_the_complaint_rate_status_compares_with_0_1_and_0_3_percent(complained: int, delivered: int,
                                                                     status: ComplaintRateStatus) -> None:
    figures = StatsFigures({}, {"complained": complained, "delivered": delivered})

    assert (COMPLAINT_RATE_WARNING, COMPLAINT_RATE_CRITICAL) == (0.001, 0.003)
    assert figures.complaint_rate_status() is status


# -- tiling a range ------------------------------------------------------------------------------------------------
_ORIGIN = datetime(2024, 1, 1, tzinfo=UTC)
_LEVELS = [(Resolution.DAY, Resolution.HOUR, Resolution.MINUTE), (Resolution.HOUR, Resolution.MINUTE),
           (Resolution.MINUTE,)]
_RANK = {Resolution.MINUTE: 0, Resolution.HOUR: 1, Resolution.DAY: 2}


def _ceil(resolution: Resolution, moment: datetime) -> datetime:
    floor = resolution.floor(moment)
    return floor if floor == moment else floor + resolution.step


def _unimodal(ranks: Sequence[int]) -> bool:
    """Rising to one peak, then falling."""
    peak = ranks.index(max(ranks))
    return (all(a <= b for a, b in pairwise(ranks[:peak + 1]))
            and all(a >= b for a, b in pairwise(ranks[peak:])))


@given(start_s=st.integers(0, 90 * 86_400), length_s=st.integers(1, 70 * 86_400),
       kept_h=st.integers(0, 160 * 24), levels=st.sampled_from(_LEVELS))
def test_tiles_cover_every_minute_of_the_range_exactly_once_coarsest_in_the_middle(
        start_s: int, length_s: int, kept_h: int, levels: tuple[Resolution, ...]) -> None:
    start = _ORIGIN + timedelta(seconds=start_s)
    end = start + timedelta(seconds=length_s)
    kept_since = _ORIGIN + timedelta(hours=kept_h)

    found = tiles(start, end, levels, kept_since)

    # Each tile reads the rows of its resolution with low <= bucket < high: these minutes.
    spans = [(_ceil(r, low), _ceil(r, high)) for r, low, high in found]
    assert all(a < b for a, b in spans), found
    assert all(a[1] == b[0] for a, b in pairwise(spans)), found  # contiguous, never overlapping
    first, last = found[0][0], found[-1][0]
    assert start - first.step < spans[0][0] <= start and end <= spans[-1][1] < end + last.step, found
    assert _unimodal([_RANK[r] for r, _, _ in found]), found
    coarser = {Resolution.MINUTE: Resolution.HOUR, Resolution.HOUR: Resolution.DAY}
    for resolution, low, high in found:
        if resolution is Resolution.MINUTE:
            assert low >= kept_since, (found, kept_since)  # minutes only where they are still kept
        parent = coarser.get(resolution)
        if parent is not None and parent in levels:  # a finer tile never holds a whole bucket of the coarser one
            a, b = max(_ceil(resolution, low), start), min(_ceil(resolution, high), end)
            assert _ceil(parent, a) + parent.step > b, (found, resolution, a, b)


# -- partitions and retention --------------------------------------------------------------------------------------
async def _partitions_holding(conn: psycopg.AsyncConnection, table: str, tenant: str) -> list[str]:
    """The partitions of ``table`` holding rows of ``tenant``."""
    cur = await conn.execute(f"SELECT DISTINCT tableoid::regclass::text FROM reports.{table} WHERE tenant_id = %s "
                             f"ORDER BY 1", (tenant,))
    return [name for (name,) in await cur.fetchall()]


def _day_name(table: str, day: date) -> str:
    return f"reports.{table}_p{day:%Y%m%d}"


async def test_retention_makes_partitions_ahead_moves_default_rows_and_drops_what_left_retention(
        new_database: Callable[[], str]) -> None:
    dsn = new_database()
    await migrate_services(dsn, ["reports"])
    policy = RetentionPolicy(events=timedelta(days=30), minute_rollups=timedelta(days=3),
                             hour_rollups=timedelta(days=400), day_rollups=timedelta(days=1100), days_ahead=3)
    today = date(2031, 1, 10)
    tenant = _id("tenant")
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        worker = RetentionWorker(pool, policy)
        async with pool.connection() as conn:
            await conn.set_autocommit(True)
            await worker.run_once(today=today)
            ahead = {today + timedelta(days=n) for n in range(4)}
            assert set(await partition_days(conn, EVENTS)) == ahead
            assert set(await partition_days(conn, ROLLUP_MINUTE)) == ahead

            # An event of a day without a partition lands in the default partition ...
            late = datetime(2031, 1, 20, 8, 30, tzinfo=UTC)
            await record(conn, accepted(tenant, _id("msg"), late))
            assert await _partitions_holding(conn, "events", tenant) == ["reports.events_default"]
            assert await _partitions_holding(conn, "rollup_minute", tenant) == ["reports.rollup_minute_default"]
            # ... and moves to its own once that day's partition is made.
            await worker.run_once(today=date(2031, 1, 18))
            assert await _partitions_holding(conn, "events", tenant) == [_day_name("events", late.date())]
            assert await _partitions_holding(conn, "rollup_minute", tenant) == [
                _day_name("rollup_minute", late.date())]

            old_hour, kept_hour = (datetime(2029, 12, 1, tzinfo=UTC), datetime(2030, 12, 1, tzinfo=UTC))
            old_day, kept_day = datetime(2028, 1, 1, tzinfo=UTC), datetime(2029, 1, 1, tzinfo=UTC)
            for table, buckets in (("rollup_hour", (old_hour, kept_hour)), ("rollup_day", (old_day, kept_day))):
                for bucket in buckets:
                    await conn.execute(f"INSERT INTO reports.{table} (tenant_id, bucket, message_class, provider, "
                                       "mailbox_provider, tag, campaign_id, sent) "
                                       "VALUES (%s, %s, 'bulk', '', '', '', '', 1)", (tenant, bucket))

            await worker.run_once(today=date(2031, 2, 1))
            # An event older than every partition lands in the default partition, and leaves with retention.
            await record(conn, accepted(tenant, _id("msg"), datetime(2030, 6, 1, tzinfo=UTC)))

            later = date(2031, 2, 25)  # events are kept 30 days (from Jan 26), minute rollups 3 (from Feb 22)
            await worker.run_once(today=later)
            next_days = {later + timedelta(days=n) for n in range(4)}
            assert set(await partition_days(conn, EVENTS)) == {date(2031, 2, n) for n in range(1, 5)} | next_days
            assert set(await partition_days(conn, ROLLUP_MINUTE)) == next_days
            assert await _partitions_holding(conn, "events", tenant) == []
            assert await _partitions_holding(conn, "rollup_minute", tenant) == []
            cur = await conn.execute("SELECT bucket FROM reports.rollup_hour WHERE tenant_id = %s AND sent = 1",
                                     (tenant,))
            # Hour rows are kept 400 days before 2031-02-25 (from 2030-01-21), day rows 1100 (from 2028-02-11).
            assert [b for (b,) in await cur.fetchall()] == [kept_hour]
            cur = await conn.execute("SELECT bucket FROM reports.rollup_day WHERE tenant_id = %s AND sent = 1",
                                     (tenant,))
            assert [b for (b,) in await cur.fetchall()] == [kept_day]
    finally:
        await pool.close()
