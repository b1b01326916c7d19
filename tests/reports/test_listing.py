"""ListMessages: newest first, filters, opaque page tokens (AIP-158); ListMessageEvents pages."""

from __future__ import annotations

import grpc
import pytest
from esp.v1 import messages_pb2

from tests.reports.builders import accepted, at, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M = messages_pb2


async def _all_pages(reports: ReportsService, tenant: str, **filters: object) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    for _ in range(20):
        response = await reports.messages.ListMessages(
            M.ListMessagesRequest(page_size=2, page_token=token, **filters), metadata=caller(tenant))
        pages.append([m.id for m in response.messages])
        token = response.next_page_token
        if not token:
            return pages
    raise AssertionError("pagination did not end")


async def _tenant_with_messages(reports: ReportsService, count: int) -> tuple[str, list[str]]:
    """A fresh tenant with ``count`` accepted messages, one a minute; returns their ids oldest first."""
    tenant = new_id("tenant-")
    ids = [new_id() for _ in range(count)]
    await reports.publish([accepted(tenant, mid, at(8, minute), tags=["odd"] if minute % 2 else ["even"])
                           for minute, mid in enumerate(ids)])

    async def all_recorded() -> bool:
        response = await reports.messages.ListMessages(M.ListMessagesRequest(page_size=100), metadata=caller(tenant))
        return len(response.messages) == count

    await eventually(all_recorded, what=f"{count} messages")
    return tenant, ids


async def test_messages_are_listed_newest_first_across_pages(reports: ReportsService):
    tenant, ids = await _tenant_with_messages(reports, 5)

    pages = await _all_pages(reports, tenant)

    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


async def test_messages_can_be_filtered_by_tag(reports: ReportsService):
    tenant, ids = await _tenant_with_messages(reports, 5)

    pages = await _all_pages(reports, tenant, tag="odd")

    assert [mid for page in pages for mid in page] == [ids[3], ids[1]]


async def test_messages_can_be_filtered_by_state(reports: ReportsService):
    tenant, ids = await _tenant_with_messages(reports, 3)
    await reports.publish([sent(tenant, ids[1], at(8, 30), provider="ses-eu", provider_message_id="x")])

    async def only_sent() -> list[str]:
        response = await reports.messages.ListMessages(M.ListMessagesRequest(state=M.MESSAGE_STATE_SENT),
                                                       metadata=caller(tenant))
        return [m.id for m in response.messages]

    assert await eventually(only_sent, what="one sent message") == [ids[1]]


async def test_a_page_token_cannot_be_reused_with_other_filters(reports: ReportsService):
    tenant, _ids = await _tenant_with_messages(reports, 3)
    first = await reports.messages.ListMessages(M.ListMessagesRequest(page_size=1), metadata=caller(tenant))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.messages.ListMessages(
            M.ListMessagesRequest(page_size=1, page_token=first.next_page_token, tag="odd"), metadata=caller(tenant))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_garbled_page_token_is_invalid_argument(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.messages.ListMessages(M.ListMessagesRequest(page_token="not-a-token!"),
                                            metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_timeline_is_paged_in_the_order_events_happened(reports: ReportsService):
    tenant, message_id = new_id("tenant-"), new_id()
    envelopes = [accepted(tenant, message_id, at(7))] + [
        sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_OPENED, at(7, minute)) for minute in (5, 3, 4, 1)
    ]
    await reports.publish(envelopes)

    async def complete() -> bool:
        try:
            response = await reports.messages.ListMessageEvents(
                M.ListMessageEventsRequest(parent=f"messages/{message_id}", page_size=100), metadata=caller(tenant))
        except grpc.aio.AioRpcError:
            return False
        return len(response.events) == 5

    await eventually(complete, what="five events")
    times: list[int] = []
    token = ""
    for _ in range(10):
        response = await reports.messages.ListMessageEvents(
            M.ListMessageEventsRequest(parent=f"messages/{message_id}", page_size=2, page_token=token),
            metadata=caller(tenant))
        times += [e.event_time.ToDatetime().minute for e in response.events]
        token = response.next_page_token
        if not token:
            break

    assert times == [0, 1, 3, 4, 5]


async def test_a_malformed_message_name_is_invalid_argument(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.messages.GetMessage(M.GetMessageRequest(name="msgs/123"), metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
