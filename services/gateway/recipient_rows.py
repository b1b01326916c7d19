"""A recipient list (CSV or JSON Lines) read from a streamed body into rows, and the row numbers of a file mapped
from the stream positions the campaigns service reports.

The list is read by ``libs.common.recipient_lists``, as the service's own import reads it (formats, row numbers: in
CSV the header is row 1). What is read is passed on as written; judging addresses, names and variables is the
service's job. A row that cannot be read at all (malformed CSV or JSON, a wrong column count, not UTF-8, too long)
becomes a :class:`Row` with a ``refusal`` in the service's wording (``KIND: reason``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf.message import Message

from libs.common.byte_records import Record, RecordSplitter, records
from libs.common.errors import InvalidArgument
from libs.common.recipient_lists import MAX_ROW_BYTES, RecipientFormat, RowError, RowReader
from libs.common.recipient_lists import RowNumbers as StreamRows
from services.gateway.errors import bad_request

KEPT_REASONS = 1000
"""Reasons kept of rows the gateway could not read (the service reports the first 100 refusals)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One row of a recipient list as read: its number in the file, and either its values or why it is unreadable."""

    number: int
    email: str = ""
    name: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    refusal: str = ""
    """``KIND: reason`` (the service's wording) when the gateway could not read the row."""


class RowNumbers:
    """Stream positions (how the service numbers the recipients of a stream) → rows of the file, and the reasons of
    the rows sent as empty recipients."""

    def __init__(self) -> None:
        self._rows = StreamRows()
        self._reasons: dict[int, str] = {}

    def add(self, row: Row) -> None:
        """Account for ``row``, sent as the next recipient of the stream."""
        position = self._rows.add(row.number)
        if row.refusal and len(self._reasons) < KEPT_REASONS:
            self._reasons[position] = row.refusal

    def rewrite(self, response: Message) -> None:
        """Turn the stream positions of ``response.errors`` into file rows, with the gateway's reasons."""
        for error in getattr(response, "errors"):  # noqa: B009 - a dynamic message class
            reason = self._reasons.get(error.row)
            if reason:
                error.reason = reason
            error.row = self._rows.row_of(error.row)


async def _rows(lines: AsyncIterator[Record], fmt: RecipientFormat) -> AsyncIterator[Row]:
    reader = RowReader(fmt)
    try:
        async for record in lines:
            read = reader.read(record)
            if isinstance(read, RowError):
                yield Row(read.row_number, refusal=str(read))
            elif read is not None:
                yield Row(read.row_number, read.email, read.name, read.variables)
        reader.close()
    except InvalidArgument as exc:  # an unusable CSV header: the request fails, as a bad request
        raise bad_request(exc.message, [(v.field, v.description) for v in exc.field_violations]) from exc


async def csv_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[Row]:
    """CSV records as rows (the header is row 1 and is not yielded); a bad header fails the request (400)."""
    async for row in _rows(records(chunks, RecordSplitter(MAX_ROW_BYTES, csv_quotes=True), strip_bom=True),
                           RecipientFormat.CSV):
        yield row


async def jsonl_rows(lines: AsyncIterator[Record]) -> AsyncIterator[Row]:
    """JSON Lines records as rows (line numbers from 1; blank lines skipped, their numbers kept)."""
    async for row in _rows(lines, RecipientFormat.JSONL):
        yield row
