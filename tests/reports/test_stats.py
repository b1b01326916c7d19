"""GetStats: counts by day, hour, provider, class and tag, with latency percentiles of provider calls."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from esp.v1 import common_pb2, messages_pb2, reports_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.reports.latency_histograms import BUCKET_COUNT, bucket_index, percentile
from tests.reports.builders import accepted, attempted, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M, R = messages_pb2, reports_pb2


def _t(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@pytest.fixture(scope="module")
async def stats_tenant(reports: ReportsService) -> str:
    """A tenant with five messages over two days (see the expectations in each test)."""
    tenant = new_id("tenant-")
    m1, m2, m3, m4, m5 = (new_id() for _ in range(5))
    first_accept = accepted(tenant, m1, _t(5, 10, 5), message_class="otp", tags=["login"])
    await reports.publish([
        first_accept,
        attempted(tenant, m1, _t(5, 10, 5), provider="ses-eu", latency_ms=100, message_class="otp"),
        sent(tenant, m1, _t(5, 10, 5), provider="ses-eu", provider_message_id="s1", message_class="otp"),
        sender_event(tenant, m1, M.MESSAGE_EVENT_TYPE_DELIVERED, _t(5, 10, 6), provider="ses-eu", message_class="otp"),
        accepted(tenant, m2, _t(5, 10, 20), message_class="otp", tags=["login"]),
        attempted(tenant, m2, _t(5, 10, 20), provider="ses-eu", latency_ms=100, message_class="otp"),
        sent(tenant, m2, _t(5, 10, 20), provider="ses-eu", provider_message_id="s2", message_class="otp"),
        sender_event(tenant, m2, M.MESSAGE_EVENT_TYPE_BOUNCED, _t(5, 11, 2), provider="ses-eu", message_class="otp",
                     recipient="alice@example.com", bounce_type="hard"),
        accepted(tenant, m3, _t(5, 11, 30), message_class="bulk", tags=["promo", "march"]),
        attempted(tenant, m3, _t(5, 11, 30), provider="mailgun-main", latency_ms=2000, message_class="bulk",
                  outcome=M.ATTEMPT_OUTCOME_RETRYABLE),
        attempted(tenant, m3, _t(5, 11, 31), provider="mailgun-main", latency_ms=2000, message_class="bulk",
                  attempt=2),
        sent(tenant, m3, _t(5, 11, 31), provider="mailgun-main", provider_message_id="<m3@mg>", message_class="bulk"),
        sender_event(tenant, m3, M.MESSAGE_EVENT_TYPE_DELIVERED, _t(5, 11, 40), provider="mailgun-main",
                     message_class="bulk"),
        sender_event(tenant, m3, M.MESSAGE_EVENT_TYPE_OPENED, _t(5, 12, 10), provider="mailgun-main",
                     message_class="bulk"),
        sender_event(tenant, m3, M.MESSAGE_EVENT_TYPE_CLICKED, _t(5, 12, 11), provider="mailgun-main",
                     message_class="bulk", url="https://example.com/sale"),
        accepted(tenant, m4, _t(5, 23, 50)),
        # The sender dead-letters and then fails a message it gave up on: one failure.
        sender_event(tenant, m4, M.MESSAGE_EVENT_TYPE_DEAD_LETTERED, _t(5, 23, 55), reason="attempts exhausted"),
        sender_event(tenant, m4, M.MESSAGE_EVENT_TYPE_FAILED, _t(5, 23, 55), reason="no provider accepts it",
                     final=True),
        accepted(tenant, m5, _t(6, 0, 10)),
    ])
    # A producer's retry of an event already recorded must not count twice.
    await reports.publish([first_accept], msg_id_suffix="-again")

    async def all_counted() -> bool:
        total = (await _stats(reports, tenant)).total
        return (total.accepted, total.sent, total.delivered, total.bounced, total.failed, total.opened,
                total.clicked) == (5, 3, 2, 1, 1, 1, 1)

    await eventually(all_counted, what="every event counted")
    return tenant


async def _stats(reports: ReportsService, tenant: str, group_by: int = R.STATS_GROUPING_UNSPECIFIED,
                 message_class: int = common_pb2.MESSAGE_CLASS_UNSPECIFIED) -> reports_pb2.GetStatsResponse:
    return await reports.stats.GetStats(
        R.GetStatsRequest(start_time=_stamp(_t(5, 0)), end_time=_stamp(_t(7, 0)), group_by=group_by,
                          message_class=message_class),
        metadata=caller(tenant))


def _by_key(response: reports_pb2.GetStatsResponse) -> dict[str, reports_pb2.StatsRow]:
    return {row.key: row for row in response.rows}


async def test_totals_count_each_event_once(reports: ReportsService, stats_tenant: str):
    total = (await _stats(reports, stats_tenant)).total

    assert (total.accepted, total.sent, total.delivered, total.bounced, total.failed, total.complained,
            total.opened, total.clicked, total.unsubscribed) == (5, 3, 2, 1, 1, 0, 1, 1, 0)


async def test_latency_percentiles_come_from_attempt_latencies(reports: ReportsService, stats_tenant: str):
    total = (await _stats(reports, stats_tenant)).total

    # Latencies 100, 100, 2000, 2000 ms; the histogram's buckets are 25 % wide.
    assert total.latency_ms_p50 == pytest.approx(100, rel=0.25)
    assert total.latency_ms_p99 == pytest.approx(2000, rel=0.25)


async def test_grouping_by_day(reports: ReportsService, stats_tenant: str):
    rows = _by_key(await _stats(reports, stats_tenant, R.STATS_GROUPING_DAY))

    assert sorted(rows) == ["2024-03-05", "2024-03-06"]
    assert rows["2024-03-05"].accepted == 4
    assert rows["2024-03-06"].accepted == 1


async def test_grouping_by_hour(reports: ReportsService, stats_tenant: str):
    rows = _by_key(await _stats(reports, stats_tenant, R.STATS_GROUPING_HOUR))

    assert sorted(rows) == ["2024-03-05T10:00:00Z", "2024-03-05T11:00:00Z", "2024-03-05T12:00:00Z",
                            "2024-03-05T23:00:00Z", "2024-03-06T00:00:00Z"]
    ten = rows["2024-03-05T10:00:00Z"]
    assert (ten.accepted, ten.sent, ten.delivered) == (2, 2, 1)
    assert rows["2024-03-05T11:00:00Z"].bounced == 1


async def test_grouping_by_provider(reports: ReportsService, stats_tenant: str):
    rows = _by_key(await _stats(reports, stats_tenant, R.STATS_GROUPING_PROVIDER))

    assert (rows["ses-eu"].sent, rows["ses-eu"].delivered, rows["ses-eu"].bounced) == (2, 1, 1)
    assert (rows["mailgun-main"].sent, rows["mailgun-main"].clicked) == (1, 1)
    assert rows["mailgun-main"].latency_ms_p50 == pytest.approx(2000, rel=0.25)
    assert rows["ses-eu"].latency_ms_p99 == pytest.approx(100, rel=0.25)


async def test_grouping_by_message_class(reports: ReportsService, stats_tenant: str):
    rows = _by_key(await _stats(reports, stats_tenant, R.STATS_GROUPING_MESSAGE_CLASS))

    assert {key: row.accepted for key, row in rows.items()} == {"otp": 2, "bulk": 1, "transactional": 2}


async def test_grouping_by_tag_counts_a_message_under_each_of_its_tags(reports: ReportsService, stats_tenant: str):
    rows = _by_key(await _stats(reports, stats_tenant, R.STATS_GROUPING_TAG))

    assert {key: row.accepted for key, row in rows.items()} == {"login": 2, "promo": 1, "march": 1}
    assert rows["login"].bounced == 1
    assert rows["promo"].delivered == 1


async def test_filtering_by_message_class(reports: ReportsService, stats_tenant: str):
    total = (await _stats(reports, stats_tenant, message_class=common_pb2.MESSAGE_CLASS_OTP)).total

    assert (total.accepted, total.sent, total.bounced) == (2, 2, 1)


async def test_stats_of_another_tenant_are_empty(reports: ReportsService, stats_tenant: str):
    response = await _stats(reports, new_id("tenant-"), R.STATS_GROUPING_DAY)

    assert list(response.rows) == []
    assert response.total.accepted == 0


def test_every_latency_lands_in_a_bucket_whose_bounds_hold_it():
    for latency in (0, 1, 2, 99, 100, 101, 1999, 2000, 110_000):
        index = bucket_index(latency)
        assert 0 <= index < BUCKET_COUNT
        if 0 < index < BUCKET_COUNT - 1:
            assert 1.25 ** (index - 1) < latency <= 1.25**index


def test_percentile_of_an_empty_histogram_is_zero():
    assert percentile([0] * BUCKET_COUNT, 0.5) == 0.0


def test_percentile_stays_within_a_bucket_of_the_true_value():
    latencies = list(range(10, 1010, 10))  # 10 .. 1000 ms
    buckets = [0] * BUCKET_COUNT
    for latency in latencies:
        buckets[bucket_index(latency)] += 1

    assert percentile(buckets, 0.5) == pytest.approx(500, rel=0.25)
    assert percentile(buckets, 0.99) == pytest.approx(990, rel=0.25)


async def test_latency_percentiles_count_every_provider_call_including_the_successful_send(reports: ReportsService):
    # The sender reports each provider call once: ATTEMPTED when it failed and will be retried, SENT when the
    # provider took the message, FAILED when the provider rejected it for good.
    tenant, sent_first_time, rejected = new_id("tenant-"), new_id(), new_id()
    await reports.publish([
        accepted(tenant, sent_first_time, _t(6, 9)),
        sender_event(tenant, sent_first_time, M.MESSAGE_EVENT_TYPE_SENT, _t(6, 9, 1), provider="ses-eu",
                     provider_message_id="l1", attempt=1, outcome=M.ATTEMPT_OUTCOME_ACCEPTED, latency_ms=300,
                     final=True),
        accepted(tenant, rejected, _t(6, 9)),
        attempted(tenant, rejected, _t(6, 9, 1), provider="ses-eu", latency_ms=100,
                  outcome=M.ATTEMPT_OUTCOME_RETRYABLE),
        sender_event(tenant, rejected, M.MESSAGE_EVENT_TYPE_FAILED, _t(6, 9, 2), provider="ses-eu", attempt=2,
                     outcome=M.ATTEMPT_OUTCOME_PERMANENT, latency_ms=3000, reason="550 no such user", final=True),
    ])

    async def settled() -> reports_pb2.StatsRow | None:
        total = (await _stats(reports, tenant)).total
        return total if (total.sent, total.failed) == (1, 1) else None

    total = await eventually(settled, what="the send and the failure counted")

    # Latencies 100, 300 and 3000 ms.
    assert total.latency_ms_p50 == pytest.approx(300, rel=0.25)
    assert total.latency_ms_p99 == pytest.approx(3000, rel=0.25)
