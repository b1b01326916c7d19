"""GetStats per campaign: the campaign grouping, the campaign filter, cancelled emails, and exact campaign totals
whatever order a message's events arrive in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2, reports_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.reports.builders import accepted, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M, R = messages_pb2, reports_pb2


def _t(hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, 8, hour, minute, tzinfo=UTC)


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _event(tenant: str, message_id: str, event_type: int, when: datetime,
           **fields: object) -> queue_pb2.EventEnvelope:
    """A bulk email's event as the sender (or a webhook) publishes it."""
    return sender_event(tenant, message_id, event_type, when, message_class="bulk", **fields)


def _outcomes(row: reports_pb2.StatsRow) -> tuple[int, ...]:
    return row.accepted, row.sent, row.delivered, row.bounced, row.complained, row.failed, row.cancelled


async def _stats(reports: ReportsService, tenant: str, *, group_by: int = R.STATS_GROUPING_UNSPECIFIED,
                 campaign: str = "") -> reports_pb2.GetStatsResponse:
    return await reports.stats.GetStats(
        R.GetStatsRequest(start_time=_stamp(_t(0)), end_time=_stamp(_t(23)), group_by=group_by, campaign=campaign),
        metadata=caller(tenant))


def _by_key(response: reports_pb2.GetStatsResponse) -> dict[str, reports_pb2.StatsRow]:
    return {row.key: row for row in response.rows}


class CampaignTenant:
    """A tenant with two campaigns and messages of none (see the expectations in each test)."""

    def __init__(self) -> None:
        self.tenant = new_id("tenant-")
        self.spring = f"campaigns/spring-{new_id()[:8]}"
        self.autumn = f"campaigns/autumn-{new_id()[:8]}"


@pytest.fixture(scope="module")
async def campaigns(reports: ReportsService) -> CampaignTenant:
    world = CampaignTenant()
    tenant, spring, autumn = world.tenant, world.spring, world.autumn
    s1, s2, s3, s4, a1, a2, n1 = (new_id() for _ in range(7))
    await reports.publish([
        # spring: delivered, bounced, cancelled, failed.
        accepted(tenant, s1, _t(9), message_class="bulk", campaign=spring, tags=["newsletter"]),
        sent(tenant, s1, _t(9, 1), provider="ses-eu", provider_message_id="ses-s1", message_class="bulk"),
        _event(tenant, s1, M.MESSAGE_EVENT_TYPE_DELIVERED, _t(9, 2), provider="ses-eu"),
        accepted(tenant, s2, _t(9), message_class="bulk", campaign=spring),
        sent(tenant, s2, _t(10, 1), provider="mailgun-main", provider_message_id="<s2@mg>", message_class="bulk"),
        _event(tenant, s2, M.MESSAGE_EVENT_TYPE_BOUNCED, _t(10, 5), provider="mailgun-main", bounce_type="soft"),
        accepted(tenant, s3, _t(9), message_class="bulk", campaign=spring),
        _event(tenant, s3, M.MESSAGE_EVENT_TYPE_CANCELLED, _t(11), final=True),
        accepted(tenant, s4, _t(9), message_class="bulk", campaign=spring),
        _event(tenant, s4, M.MESSAGE_EVENT_TYPE_FAILED, _t(10, 30), reason="550 no such user", final=True),
        # autumn: complained, cancelled.
        accepted(tenant, a1, _t(12), message_class="bulk", campaign=autumn),
        sent(tenant, a1, _t(12, 1), provider="ses-eu", provider_message_id="ses-a1", message_class="bulk"),
        _event(tenant, a1, M.MESSAGE_EVENT_TYPE_COMPLAINED, _t(12, 9), provider="ses-eu"),
        accepted(tenant, a2, _t(12), message_class="bulk", campaign=autumn),
        _event(tenant, a2, M.MESSAGE_EVENT_TYPE_CANCELLED, _t(13), final=True),
        # No campaign: a transactional email, delivered.
        accepted(tenant, n1, _t(9), tags=["newsletter"]),
        sent(tenant, n1, _t(9, 1), provider="ses-eu", provider_message_id="ses-n1"),
        sender_event(tenant, n1, M.MESSAGE_EVENT_TYPE_DELIVERED, _t(9, 3), provider="ses-eu"),
    ])

    async def all_counted() -> bool:
        return _outcomes((await _stats(reports, tenant)).total) == (7, 4, 2, 1, 1, 1, 2)

    await eventually(all_counted, what="every event counted")
    return world


async def test_cancelled_emails_are_counted(reports: ReportsService, campaigns: CampaignTenant):
    total = (await _stats(reports, campaigns.tenant)).total

    assert total.cancelled == 2


async def test_grouping_by_campaign_gives_a_row_per_campaign_and_leaves_out_messages_of_none(
        reports: ReportsService, campaigns: CampaignTenant):
    rows = _by_key(await _stats(reports, campaigns.tenant, group_by=R.STATS_GROUPING_CAMPAIGN))

    assert {key: _outcomes(row) for key, row in rows.items()} == {
        campaigns.spring: (4, 2, 1, 1, 0, 1, 1),
        campaigns.autumn: (2, 1, 0, 0, 1, 0, 1),
    }


async def test_the_campaign_filter_keeps_only_that_campaigns_messages_in_the_total(
        reports: ReportsService, campaigns: CampaignTenant):
    total = (await _stats(reports, campaigns.tenant, campaign=campaigns.spring)).total

    assert _outcomes(total) == (4, 2, 1, 1, 0, 1, 1)


@pytest.mark.parametrize("group_by, expected", [
    (R.STATS_GROUPING_PROVIDER, {"": (4, 0, 0, 0, 0, 1, 1), "ses-eu": (0, 1, 1, 0, 0, 0, 0),
                                 "mailgun-main": (0, 1, 0, 1, 0, 0, 0)}),
    (R.STATS_GROUPING_HOUR, {"2024-03-08T09:00:00Z": (4, 1, 1, 0, 0, 0, 0),
                             "2024-03-08T10:00:00Z": (0, 1, 0, 1, 0, 1, 0),
                             "2024-03-08T11:00:00Z": (0, 0, 0, 0, 0, 0, 1)}),
    (R.STATS_GROUPING_TAG, {"newsletter": (1, 1, 1, 0, 0, 0, 0)}),
    (R.STATS_GROUPING_CAMPAIGN, {"spring": (4, 2, 1, 1, 0, 1, 1)}),
])
async def test_the_campaign_filter_applies_to_every_grouping(reports: ReportsService, campaigns: CampaignTenant,
                                                             group_by: int, expected: dict[str, tuple[int, ...]]):
    rows = _by_key(await _stats(reports, campaigns.tenant, group_by=group_by, campaign=campaigns.spring))

    if group_by == R.STATS_GROUPING_CAMPAIGN:
        expected = {campaigns.spring: expected["spring"]}
    assert {key: _outcomes(row) for key, row in rows.items()} == expected


async def test_a_campaigns_total_needs_no_time_range(reports: ReportsService):
    tenant, campaign, message_id = new_id("tenant-"), f"campaigns/{new_id()}", new_id()
    weeks_ago = datetime.now(UTC) - timedelta(days=20)
    await reports.publish([
        accepted(tenant, message_id, weeks_ago, message_class="bulk", campaign=campaign),
        sent(tenant, message_id, weeks_ago + timedelta(minutes=1), provider="ses-eu", provider_message_id="ses-1",
             message_class="bulk"),
    ])

    async def campaign_total() -> reports_pb2.StatsRow | None:
        reply = await reports.stats.GetStats(R.GetStatsRequest(campaign=campaign), metadata=caller(tenant))
        return reply.total if reply.total.sent else None

    total = await eventually(campaign_total, what="the campaign's total over its whole life")
    assert (total.accepted, total.sent) == (1, 1)


async def test_events_recorded_before_accepted_are_counted_under_its_campaign_once_it_arrives(
        reports: ReportsService):
    tenant, campaign, message_id = new_id("tenant-"), f"campaigns/{new_id()}", new_id()
    await reports.publish([
        sent(tenant, message_id, _t(14, 1), provider="ses-eu", provider_message_id="ses-early", message_class="bulk"),
        _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, _t(14, 2), provider="ses-eu"),
    ])

    async def counted_without_campaign() -> bool:
        return (await _stats(reports, tenant)).total.delivered == 1

    await eventually(counted_without_campaign, what="the early events counted")
    await reports.publish([accepted(tenant, message_id, _t(14), message_class="bulk", campaign=campaign)])

    async def campaign_total() -> reports_pb2.StatsRow | None:
        total = (await _stats(reports, tenant, campaign=campaign)).total
        return total if total.accepted else None

    total = await eventually(campaign_total, what="the late ACCEPTED recorded")
    assert _outcomes(total) == (1, 1, 1, 0, 0, 0, 0)
    assert _outcomes((await _stats(reports, tenant)).total) == (1, 1, 1, 0, 0, 0, 0)
    rows = _by_key(await _stats(reports, tenant, group_by=R.STATS_GROUPING_CAMPAIGN))
    assert {key: _outcomes(row) for key, row in rows.items()} == {campaign: (1, 1, 1, 0, 0, 0, 0)}


async def test_events_recorded_before_accepted_are_counted_under_its_tags_once_it_arrives(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([sent(tenant, message_id, _t(15, 1), provider="ses-eu", provider_message_id="ses-tag")])

    async def counted() -> bool:
        return (await _stats(reports, tenant)).total.sent == 1

    await eventually(counted, what="the early SENT counted")
    await reports.publish([accepted(tenant, message_id, _t(15), tags=["receipt"])])

    async def tag_row() -> reports_pb2.StatsRow | None:
        rows = _by_key(await _stats(reports, tenant, group_by=R.STATS_GROUPING_TAG))
        return rows.get("receipt")

    row = await eventually(tag_row, what="the late ACCEPTED recorded")
    assert (row.accepted, row.sent) == (1, 1)


async def test_events_recorded_before_accepted_leave_no_empty_group_behind_once_it_arrives(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    # With the provider call's latency: its histogram is counted at once, under no mailbox provider, and moves too.
    await reports.publish([sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_SENT, _t(16, 1), provider="ses-eu",
                                        provider_message_id="ses-mbx", latency_ms=120, final=True)])

    async def counted() -> bool:
        return (await _stats(reports, tenant)).total.sent == 1

    await eventually(counted, what="the early SENT counted")
    await reports.publish([accepted(tenant, message_id, _t(16), to=["ada@gmail.com"])])

    async def by_mailbox() -> dict[str, tuple[int, int]] | None:
        reply = await reports.stats.GetStats(
            R.GetStatsRequest(start_time=_stamp(_t(0)), end_time=_stamp(_t(23)), dimensions=["mailbox_provider"]),
            metadata=caller(tenant))
        rows = {row.dimensions["mailbox_provider"]: (row.accepted, row.sent) for row in reply.rows}
        return rows if reply.total.accepted else None

    # The SENT counted under no mailbox provider moved to gmail's row: no row of zeros stays for "".
    assert await eventually(by_mailbox, what="the late ACCEPTED recorded") == {"gmail": (1, 1)}


async def test_a_campaigns_messages_add_no_rows_of_no_campaign_and_other_messages_none_of_a_campaign(
        reports: ReportsService, campaigns: CampaignTenant):
    async with await reports.connect_db() as conn:
        cur = await conn.execute(
            """SELECT provider, campaign_id, accepted FROM reports.rollup_hour
               WHERE tenant_id = %s AND tag = '' AND message_class = 'transactional'""", (campaigns.tenant,))
        of_no_campaign = await cur.fetchall()
        # Counts made before a message's ACCEPTED event are moved to its campaign's row when it comes (with two
        # batches in flight that happens here), which can leave a row of zeros behind: no counts, no figures.
        cur = await conn.execute(
            """SELECT coalesce(sum(accepted + sent + delivered + failed + provider_calls), 0) FROM reports.rollup_hour
               WHERE tenant_id = %s AND tag = '' AND message_class = 'bulk' AND campaign_id = ''""",
            (campaigns.tenant,))
        bulk_of_no_campaign = (await cur.fetchone() or (None,))[0]

    assert sorted(row for row in of_no_campaign if row[2] or row[0]) == [("", "", 1), ("ses-eu", "", 0)]
    assert bulk_of_no_campaign == 0


@pytest.mark.parametrize("campaign", ["spring", "campaigns/", "campaigns/a/b", "tenants/spring"])
async def test_a_malformed_campaign_filter_is_invalid_argument(reports: ReportsService, campaign: str):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.stats.GetStats(R.GetStatsRequest(campaign=campaign), metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = []
    for detail in rpc_status.from_call(error.value).details:  # type: ignore[arg-type]
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [v.field for v in bad_request.field_violations]
    assert violations == ["campaign"]
