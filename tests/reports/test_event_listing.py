"""EventService.ListEvents through the running reports service: a tenant's message events oldest first, filtered,
in AIP-158 pages. Events are recorded straight into the service's database by the recorder (as its consumer would),
so each test reads exactly what it recorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
import psycopg
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, events_pb2, events_pb2_grpc, messages_pb2

from libs.common.timestamps import to_timestamp
from services.reports.envelopes import decode_envelope
from services.reports.recorder import record_events
from tests.reports.builders import accepted, at, attempted, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M = messages_pb2


def _events(reports: ReportsService) -> events_pb2_grpc.EventServiceStub:
    return events_pb2_grpc.EventServiceStub(reports.channel)


async def _record(reports: ReportsService, envelopes: Sequence[queue_pb2.EventEnvelope]) -> None:
    """Record ``envelopes`` as one consumer batch."""
    conn = await psycopg.AsyncConnection.connect(reports.settings.postgres_dsn, autocommit=True)
    async with conn, conn.transaction():
        await record_events(conn, [decode_envelope(e.SerializeToString()) for e in envelopes])


async def _list(reports: ReportsService, tenant: str, **request: Any) -> list[events_pb2.Event]:
    """Every page of the tenant's events matching ``request``, two events a page."""
    listed: list[events_pb2.Event] = []
    token = ""
    for _ in range(50):
        response = await _events(reports).ListEvents(
            events_pb2.ListEventsRequest(page_size=2, page_token=token, **request), metadata=caller(tenant))
        listed += response.events
        token = response.next_page_token
        if not token:
            return listed
    raise AssertionError("pagination did not end")


async def _refused(reports: ReportsService, tenant: str, **request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _events(reports).ListEvents(events_pb2.ListEventsRequest(**request), metadata=caller(tenant))
    return error.value


def _ids(events: Sequence[events_pb2.Event]) -> list[str]:
    return [e.name.removeprefix("events/") for e in events]


def _event(tenant: str, message_id: str, event_type: int, when: datetime, **fields: Any) -> queue_pb2.EventEnvelope:
    return sender_event(tenant, message_id, event_type, when, **fields)


async def test_events_are_listed_oldest_first_across_pages(reports: ReportsService) -> None:
    tenant, first, second = new_id("tenant-"), new_id(), new_id()
    envelopes = [
        accepted(tenant, first, at(10)),
        accepted(tenant, second, at(10, 1)),
        sent(tenant, second, at(10, 2), provider="ses", provider_message_id=new_id()),
        sent(tenant, first, at(10, 3), provider="ses", provider_message_id=new_id()),
        _event(tenant, first, M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 4), recipient="alice@example.com"),
    ]
    await _record(reports, envelopes[3:])  # recorded out of order: listing goes by event time
    await _record(reports, envelopes[:3])

    listed = await _list(reports, tenant)

    assert _ids(listed) == [e.event.event_id for e in envelopes]


async def test_events_at_the_same_time_are_listed_in_name_order(reports: ReportsService) -> None:
    tenant = new_id("tenant-")
    envelopes = [accepted(tenant, new_id(), at(10), event_id=f"ev-{n}-{new_id()}") for n in (3, 1, 4, 2, 5)]
    await _record(reports, envelopes)

    listed = await _list(reports, tenant)

    assert _ids(listed) == sorted(e.event.event_id for e in envelopes)


async def test_a_listed_event_is_the_customer_event_with_its_sequence_and_message_summary(
        reports: ReportsService) -> None:
    tenant, message_id, campaign = new_id("tenant-"), new_id(), f"campaigns/{new_id()}"
    bounce = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, at(11, 5), recipient="bob@example.com",
                    provider="ses", reason="550 unknown user", bounce_type="hard", message_class="bulk")
    await _record(reports, [accepted(tenant, message_id, at(11), tags=["spring"], campaign=campaign,
                                     message_class="bulk", to=["alice@example.com", "bob@example.com"])])
    await _record(reports, [bounce])

    listed = await _list(reports, tenant, types=["message.bounced"])

    assert listed == [events_pb2.Event(
        name=f"events/{bounce.event.event_id}", type="message.bounced", event_time=to_timestamp(at(11, 5)),
        message=f"messages/{message_id}", sequence=2, recipient="bob@example.com", provider="ses", tags=["spring"],
        metadata={"order": "42"}, campaign=campaign, message_class=common_pb2.MESSAGE_CLASS_BULK,
        reason="550 unknown user", bounce_type="hard")]


async def test_attempted_events_are_never_listed(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    await _record(reports, [accepted(tenant, message_id, at(10)),
                            attempted(tenant, message_id, at(10, 1), provider="ses", latency_ms=90),
                            sent(tenant, message_id, at(10, 1), provider="ses", provider_message_id=new_id())])

    listed = await _list(reports, tenant)

    assert [e.type for e in listed] == ["message.accepted", "message.sent"]


async def test_events_can_be_filtered_by_type(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    await _record(reports, [
        accepted(tenant, message_id, at(10), to=["alice@example.com", "bob@example.com"]),
        sent(tenant, message_id, at(10, 1), provider="ses", provider_message_id=new_id()),
        _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 2), recipient="alice@example.com"),
        _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, at(10, 3), recipient="bob@example.com",
               bounce_type="soft"),
    ])

    listed = await _list(reports, tenant, types=["message.bounced", "message.delivered"])

    assert [e.type for e in listed] == ["message.delivered", "message.bounced"]


async def test_an_unknown_type_is_invalid_argument_naming_it(reports: ReportsService) -> None:
    error = await _refused(reports, new_id("tenant-"), types=["message.sent", "message.teleported"])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message.teleported" in (error.details() or "")
    assert "message.sent" not in (error.details() or "")


@pytest.mark.parametrize("account_type", ["account.low_balance", "campaign.paused"])
async def test_an_account_or_campaign_type_is_invalid_argument(reports: ReportsService, account_type: str) -> None:
    error = await _refused(reports, new_id("tenant-"), types=[account_type])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert account_type in (error.details() or "")


async def test_events_can_be_filtered_by_message(reports: ReportsService) -> None:
    tenant, wanted, other = new_id("tenant-"), new_id(), new_id()
    envelopes = [accepted(tenant, wanted, at(10)), accepted(tenant, other, at(10, 1)),
                 sent(tenant, other, at(10, 2), provider="ses", provider_message_id=new_id()),
                 sent(tenant, wanted, at(10, 3), provider="ses", provider_message_id=new_id())]
    await _record(reports, envelopes)

    listed = await _list(reports, tenant, message=f"messages/{wanted}")

    assert _ids(listed) == [envelopes[0].event.event_id, envelopes[3].event.event_id]


async def test_a_recipient_filter_matches_the_events_recipient_whatever_its_case(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    delivery = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 2), recipient="Carol@Example.COM")
    await _record(reports, [
        accepted(tenant, message_id, at(10), to=["alice@example.com"], ),
        delivery,
        _event(tenant, new_id(), M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 3), recipient="dave@example.com"),
    ])

    listed = await _list(reports, tenant, recipient="cAROL@example.com")

    assert _ids(listed) == [delivery.event.event_id]


async def test_a_recipient_filter_matches_whole_message_events_by_any_to_address(reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    acceptance = accepted(tenant, message_id, at(10), to=["alice@example.com", "Bob@Example.com"])
    sending = sent(tenant, message_id, at(10, 1), provider="ses", provider_message_id=new_id())
    await _record(reports, [acceptance, sending, accepted(tenant, new_id(), at(10, 2), to=["carol@example.com"])])

    listed = await _list(reports, tenant, recipient="bob@example.com")

    assert _ids(listed) == [acceptance.event.event_id, sending.event.event_id]


async def test_a_recipient_filter_leaves_out_reports_about_another_recipient_of_the_same_message(
        reports: ReportsService) -> None:
    tenant, message_id = new_id("tenant-"), new_id()
    acceptance = accepted(tenant, message_id, at(10), to=["alice@example.com", "bob@example.com"])
    about_alice = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, at(10, 2), recipient="alice@example.com")
    about_bob = _event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, at(10, 3), recipient="bob@example.com",
                       bounce_type="hard")
    await _record(reports, [acceptance, about_alice, about_bob])

    listed = await _list(reports, tenant, recipient="alice@example.com")

    assert _ids(listed) == [acceptance.event.event_id, about_alice.event.event_id]


async def test_events_can_be_filtered_by_tag(reports: ReportsService) -> None:
    tenant, tagged, untagged = new_id("tenant-"), new_id(), new_id()
    envelopes = [accepted(tenant, tagged, at(10), tags=["welcome", "spring"]),
                 accepted(tenant, untagged, at(10, 1), tags=["receipt"]),
                 sent(tenant, tagged, at(10, 2), provider="ses", provider_message_id=new_id())]
    await _record(reports, envelopes)

    listed = await _list(reports, tenant, tag="spring")

    assert _ids(listed) == [envelopes[0].event.event_id, envelopes[2].event.event_id]


async def test_events_can_be_filtered_by_campaign(reports: ReportsService) -> None:
    tenant, campaign_id = new_id("tenant-"), new_id()
    in_campaign, alone = new_id(), new_id()
    envelopes = [accepted(tenant, in_campaign, at(10), campaign=f"campaigns/{campaign_id}", message_class="bulk"),
                 accepted(tenant, alone, at(10, 1), campaign=f"campaigns/{new_id()}", message_class="bulk"),
                 sent(tenant, in_campaign, at(10, 2), provider="ses", provider_message_id=new_id(),
                      message_class="bulk")]
    await _record(reports, envelopes)

    listed = await _list(reports, tenant, campaign=f"campaigns/{campaign_id}")

    assert _ids(listed) == [envelopes[0].event.event_id, envelopes[2].event.event_id]


async def test_a_time_range_includes_its_start_and_excludes_its_end(reports: ReportsService) -> None:
    tenant = new_id("tenant-")
    envelopes = [accepted(tenant, new_id(), at(10, minute)) for minute in (0, 1, 2, 3)]
    await _record(reports, envelopes)

    listed = await _list(reports, tenant, start_time=to_timestamp(at(10, 1)), end_time=to_timestamp(at(10, 3)))

    assert _ids(listed) == [envelopes[1].event.event_id, envelopes[2].event.event_id]


async def test_a_time_range_ending_before_it_starts_is_invalid_argument(reports: ReportsService) -> None:
    error = await _refused(reports, new_id("tenant-"), start_time=to_timestamp(at(10, 5)),
                           end_time=to_timestamp(at(10, 1)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "end_time" in (error.details() or "")


async def test_a_page_token_cannot_be_used_with_other_filters(reports: ReportsService) -> None:
    tenant = new_id("tenant-")
    await _record(reports, [accepted(tenant, new_id(), at(10, minute), tags=["a"]) for minute in range(3)])
    first = await _events(reports).ListEvents(events_pb2.ListEventsRequest(page_size=1, tag="a"),
                                              metadata=caller(tenant))
    assert first.next_page_token

    error = await _refused(reports, tenant, page_size=1, page_token=first.next_page_token, tag="b")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_page_token_is_refused_for_another_tenant(reports: ReportsService) -> None:
    tenant = new_id("tenant-")
    await _record(reports, [accepted(tenant, new_id(), at(10, minute)) for minute in range(3)])
    first = await _events(reports).ListEvents(events_pb2.ListEventsRequest(page_size=1), metadata=caller(tenant))

    error = await _refused(reports, new_id("tenant-"), page_size=1, page_token=first.next_page_token)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_another_tenants_events_are_never_listed(reports: ReportsService) -> None:
    tenant, other_tenant, message_id = new_id("tenant-"), new_id("tenant-"), new_id()
    await _record(reports, [accepted(other_tenant, message_id, at(10), tags=["shared"]),
                            sent(other_tenant, message_id, at(10, 1), provider="ses", provider_message_id=new_id())])

    assert await _list(reports, tenant) == []
    assert await _list(reports, tenant, message=f"messages/{message_id}") == []
    assert await _list(reports, tenant, tag="shared") == []
    assert len(await _list(reports, other_tenant)) == 2
