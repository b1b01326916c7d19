"""CSV exports: a tenant's events over a time range, written as CSV and handed out in chunks of about 64 KiB, for
any size (``EventService.ExportEvents``; the stats export reuses ``csv_chunks``).

The events are read in keyset pages (``EventReader.pages``, the ListEvents query), so memory stays at one page and
one chunk whatever the range holds, and the caller's flow control (gRPC, then HTTP) paces the reads: a slow
download slows the queries instead of filling memory. Events recorded while an export runs appear in it when their
time is still ahead of the page being read (a late webhook about an earlier moment does not): an export is a
consistent snapshot only of a range that is already complete.

The events CSV (RFC 4180, UTF-8, CRLF line ends, a header row, one row per event, oldest first):

- ``event_id``: the event's id (``events/{event_id}`` in the API); ``type``: ``message.delivered`` ...;
  ``time``: RFC 3339 in UTC with microseconds (``2024-03-01T10:00:00.000000Z``);
- ``message`` and ``campaign``: resource names as ``esp.v1.Event`` has them (``messages/{id}``, ``campaigns/{id}``);
- ``sequence``, ``recipient``, ``provider``, ``class`` (``otp``, ``transactional``, ``bulk``), ``reason``,
  ``bounce_type``, ``url``, ``attempt``: as in ``esp.v1.Event``;
- ``tags``: the message's tags joined with ``;`` (a tag holding ``;`` cannot be told apart: tags are short labels);
- ``metadata``: the message's metadata as a JSON object (keys sorted).

Formula injection (OWASP "CSV Injection"): customers open these files in spreadsheets, and recipients, tags,
metadata, reasons and URLs come from outside. A text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return would be evaluated as a formula, so it gets a leading ``'`` (the spreadsheet shows the text as
written, with the quote). A program reading the file must strip that quote from such cells to get the raw value;
numbers are never changed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta

from libs.common.errors import FieldViolation, InvalidArgument
from services.reports.customer_events import CUSTOMER_TYPES
from services.reports.event_listing import EventFilter, EventReader, ListedEvent

__all__ = [
    "CHUNK_BYTES",
    "CSV_CONTENT_TYPE",
    "EVENTS_EXPORT_MAX_RANGE",
    "EVENT_COLUMNS",
    "check_export_range",
    "csv_chunks",
    "event_row",
    "events_csv",
    "export_filename",
    "neutralise",
    "rfc3339",
]

EVENTS_EXPORT_MAX_RANGE = timedelta(days=30)
"""The longest range one events export may cover: the events' retention (older events are gone anyway)."""
EXPORT_PAGE_ROWS = 5000
"""Events read per query: large enough that the per-query cost vanishes, small enough to keep memory flat."""
CHUNK_BYTES = 64 * 1024
"""About how many bytes each chunk of CSV holds (one HttpBody message each)."""
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"

EVENT_COLUMNS = ("event_id", "type", "time", "message", "sequence", "recipient", "provider", "tags", "campaign",
                 "class", "reason", "bounce_type", "url", "attempt", "metadata")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

Cell = str | int


def check_export_range(start: datetime | None, end: datetime | None, *, limit: timedelta) -> None:
    """INVALID_ARGUMENT naming every bad field: both ends required, the end after the start, at most ``limit``."""
    violations: list[FieldViolation] = []
    if start is None:
        violations.append(FieldViolation("start_time", "required: the start of the range (inclusive)"))
    if end is None:
        violations.append(FieldViolation("end_time", "required: the end of the range (exclusive)"))
    if start is not None and end is not None:
        if end <= start:
            violations.append(FieldViolation("end_time", "must be after start_time"))
        elif end - start > limit:
            violations.append(FieldViolation(
                "end_time", f"the range may cover at most {_days(limit)} (the events' retention); "
                            f"this one covers {end - start}"))
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations),
                              field_violations=violations)


def neutralise(cell: str) -> str:
    """``cell`` with a leading ``'`` when a spreadsheet would read it as a formula (OWASP CSV injection)."""
    return f"'{cell}" if cell.startswith(_FORMULA_STARTS) else cell


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 with microseconds and ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_row(event: ListedEvent) -> list[Cell]:
    """One event's cells, in ``EVENT_COLUMNS`` order (text cells neutralised)."""
    text = [
        event.event_id, CUSTOMER_TYPES[event.event_type], rfc3339(event.event_time), f"messages/{event.message_id}",
    ]
    row: list[Cell] = [neutralise(cell) for cell in text]
    row.append(event.sequence)
    row += [neutralise(cell) for cell in (
        event.recipient, event.provider, ";".join(event.tags), event.campaign, event.message_class, event.reason,
        event.bounce_type, event.url)]
    row.append(event.attempt)
    row.append(neutralise(json.dumps(dict(event.metadata), sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":"))))
    return row


class _ByteBuffer:
    """What ``csv.writer`` writes into: UTF-8 bytes, taken out a chunk at a time."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, text: str) -> int:
        self.data += text.encode("utf-8")
        return len(text)

    def take(self) -> bytes:
        taken = bytes(self.data)
        self.data.clear()
        return taken


async def csv_chunks(header: Sequence[str], rows: AsyncIterable[Sequence[Cell]] | Iterable[Sequence[Cell]],
                     *, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
    """A header row, then ``rows``, as CSV in chunks of about ``chunk_bytes`` (the last one shorter; the header
    alone when there are no rows). Cells are written as given: neutralise text first (``neutralise``)."""
    buffer = _ByteBuffer()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    if isinstance(rows, AsyncIterable):
        async for row in rows:
            writer.writerow(row)
            if len(buffer.data) >= chunk_bytes:
                yield buffer.take()
    else:
        for row in rows:
            writer.writerow(row)
            if len(buffer.data) >= chunk_bytes:
                yield buffer.take()
    if buffer.data:
        yield buffer.take()


async def events_csv(reader: EventReader, tenant_id: str, query: EventFilter, *,
                     chunk_bytes: int = CHUNK_BYTES, rows_per_page: int = EXPORT_PAGE_ROWS) -> AsyncIterator[bytes]:
    """The tenant's events matching ``query`` over its range, as CSV chunks (see the module's description).

    Everything is checked before the first chunk (the range, the event types), so a bad request fails before any
    byte is sent: INVALID_ARGUMENT naming the field.
    """
    check_export_range(query.start_time, query.end_time, limit=EVENTS_EXPORT_MAX_RANGE)
    query.event_types()  # unknown types are refused here, not after the header went out

    async def rows() -> AsyncIterator[list[Cell]]:
        async for page in reader.pages(tenant_id, query, rows_per_page):
            for event in page:
                yield event_row(event)

    async for chunk in csv_chunks(EVENT_COLUMNS, rows(), chunk_bytes=chunk_bytes):
        yield chunk


def export_filename(kind: str, start: datetime, end: datetime) -> str:
    """``{kind}-20240301T000000Z-20240331T000000Z.csv``: what a download is saved as."""
    def stamp(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")

    return f"{kind}-{stamp(start)}-{stamp(end)}.csv"


def _days(span: timedelta) -> str:
    return f"{span.days} days" if span == timedelta(days=span.days) else str(span)
