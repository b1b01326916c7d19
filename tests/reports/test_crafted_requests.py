"""Crafted input the reports service must refuse as the caller's mistake, never let reach Postgres: a page token
whose fingerprint is right but whose cursor holds what no listing gives out, and a suppression note holding NUL.

A token's fingerprint is no secret (a hash of the tenant and the filters), so anyone can make one that passes it;
every cursor value is checked as strictly as a field of the request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest
from esp.v1 import events_pb2, events_pb2_grpc, messages_pb2, reports_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.reports.pagination import encode_page_token
from services.reports.suppressions import MAX_NOTE_CHARS
from tests.reports.builders import new_id
from tests.reports.conftest import ReportsService, caller

M, R = messages_pb2, reports_pb2
NO_EVENT_FILTERS = ["", "", "", "", "", "", ""]
"""``EventFilter.parameters()`` of a ListEvents request without filters."""
A_TIME = "2025-01-02T03:04:05+00:00"

Listing = Callable[[ReportsService, str, str], Awaitable[object]]


async def _messages(reports: ReportsService, tenant: str, token: str) -> object:
    return await reports.messages.ListMessages(M.ListMessagesRequest(page_token=token), metadata=caller(tenant))


async def _timeline(reports: ReportsService, tenant: str, token: str) -> object:
    return await reports.messages.ListMessageEvents(
        M.ListMessageEventsRequest(parent="messages/m-1", page_token=token), metadata=caller(tenant))


async def _events(reports: ReportsService, tenant: str, token: str) -> object:
    return await events_pb2_grpc.EventServiceStub(reports.channel).ListEvents(
        events_pb2.ListEventsRequest(page_token=token), metadata=caller(tenant))


async def _suppressions(reports: ReportsService, tenant: str, token: str) -> object:
    return await reports.suppressions.ListSuppressions(R.ListSuppressionsRequest(page_token=token),
                                                       metadata=caller(tenant))


LISTINGS: dict[str, tuple[Listing, Callable[[str], list[str]]]] = {
    # each listing, and the parameters its tokens are bound to for a tenant (a token for them passes the fingerprint)
    "messages": (_messages, lambda tenant: ["messages", tenant, "", ""]),
    "a message's events": (_timeline, lambda tenant: ["events", tenant, "m-1"]),
    "events": (_events, lambda tenant: [tenant, *NO_EVENT_FILTERS]),
    "suppressions": (_suppressions, lambda tenant: ["suppressions", tenant]),
}
TIMED_LISTINGS = ["messages", "a message's events", "events"]
"""The listings whose cursor starts with a timestamp."""
UNSTORABLE_TEXT = {
    "NUL": "m\x00-1",
    "another control character": "m\x1b-1",
    "a lone surrogate": "m\ud800",
}


async def _violations(call: Awaitable[object]) -> list[str]:
    """The fields a call that must be INVALID_ARGUMENT names; fails the test if it was answered otherwise."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    status = rpc_status.from_call(refused.value)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return fields


@pytest.mark.parametrize("text", UNSTORABLE_TEXT.values(), ids=UNSTORABLE_TEXT.keys())
@pytest.mark.parametrize("listing", LISTINGS.keys())
async def test_a_page_token_whose_cursor_holds_unstorable_text_is_invalid_argument(
        reports: ReportsService, listing: str, text: str) -> None:
    tenant = new_id("tenant-")
    call, parameters = LISTINGS[listing]
    first = A_TIME if listing in TIMED_LISTINGS else "a@example.com"
    token = encode_page_token([first, text], parameters(tenant))

    assert await _violations(call(reports, tenant, token)) == ["page_token"]


@pytest.mark.parametrize("listing", TIMED_LISTINGS)
@pytest.mark.parametrize("time", ["yesterday", "2025-13-01T00:00:00+00:00", "2025-01-02T03:04:05", "2025\x00"])
async def test_a_page_token_whose_time_is_no_timestamp_with_an_offset_is_invalid_argument(
        reports: ReportsService, listing: str, time: str) -> None:
    tenant = new_id("tenant-")
    call, parameters = LISTINGS[listing]
    token = encode_page_token([time, "m-1"], parameters(tenant))

    assert await _violations(call(reports, tenant, token)) == ["page_token"]


@pytest.mark.parametrize("listing", ["messages", "events"])
async def test_a_page_token_with_a_time_at_another_offset_resumes_the_listing(
        reports: ReportsService, listing: str) -> None:
    # The same instant written with another offset is still a cursor the listing can use (a new tenant: no items).
    tenant = new_id("tenant-")
    call, parameters = LISTINGS[listing]
    token = encode_page_token(["2025-01-02T05:04:05+02:00", "m-1"], parameters(tenant))

    page = await call(reports, tenant, token)

    assert page.next_page_token == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize("note", ["a\x00b", "\x00", "bell\x07", "escape\x1b[31m"])
async def test_a_suppression_note_holding_a_control_character_is_invalid_argument_and_suppresses_nothing(
        reports: ReportsService, note: str) -> None:
    tenant = new_id("tenant-")
    request = R.CreateSuppressionRequest(suppression=R.Suppression(email="ada@example.com", note=note))

    assert await _violations(reports.suppressions.CreateSuppression(request, metadata=caller(tenant))) == [
        "suppression.note"]
    listed = await reports.suppressions.ListSuppressions(R.ListSuppressionsRequest(), metadata=caller(tenant))
    assert list(listed.suppressions) == []


async def test_a_suppression_note_longer_than_the_limit_is_invalid_argument(reports: ReportsService) -> None:
    request = R.CreateSuppressionRequest(
        suppression=R.Suppression(email="ada@example.com", note="x" * (MAX_NOTE_CHARS + 1)))

    assert await _violations(reports.suppressions.CreateSuppression(request, metadata=caller(new_id("tenant-")))) == [
        "suppression.note"]


async def test_a_suppression_note_may_hold_tabs_and_line_breaks(reports: ReportsService) -> None:
    note = "asked by phone\tticket 42\r\nsee the CRM"
    request = R.CreateSuppressionRequest(suppression=R.Suppression(email="ada@example.com", note=note))

    created = await reports.suppressions.CreateSuppression(request, metadata=caller(new_id("tenant-")))

    assert created.note == note
