"""A recipient list read from a CSV or JSON Lines file one row at a time and cut into ``AddCampaignRecipients``
frames, for ``esp campaign add-recipients``.

The file is never held whole: it is read in chunks, cut into rows and read as the mesh reads an imported list
(``libs.common.byte_records``, ``libs.common.recipient_lists``: the same formats, the same row numbers — in CSV the
header is row 1); a row is turned into a ``CampaignRecipient`` and put in the frame being built; a frame holds at
most ``FRAME_ROWS`` recipients (and about ``FRAME_BYTES`` of text), and is handed to gRPC, which sends it before
asking for the next. What stays in memory beyond one frame grows only with the rows that were *not* sent (the mesh
numbers a *streamed* recipient by its position in the stream, and :class:`RowNumbers` turns those positions back
into the file's rows) and is capped for the errors kept to show.

The CLI refuses only what it cannot turn into a recipient (a row it cannot read: too long, not UTF-8, a CSV record
with the wrong number of columns, a line that is not a JSON object or has no address, a variable that is an array or
object); addresses, names and the limits on variables are checked by the mesh, which reports them with the row
number too.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from esp.v1 import campaigns_pb2, common_pb2

from libs.common.byte_records import RecordSplitter, split_records
from libs.common.errors import InvalidArgument
from libs.common.recipient_lists import CELL_PADDING, RecipientFormat, RecipientRow, RowError, RowNumbers, RowReader

__all__ = [
    "FRAME_BYTES",
    "FRAME_ROWS",
    "MAX_LINE_BYTES",
    "MAX_PROBLEMS_KEPT",
    "FileFormat",
    "RecipientFileError",
    "RecipientReader",
    "RowProblem",
    "file_format",
]

FRAME_ROWS = 500
"""Recipients per frame."""
FRAME_BYTES = 1024 * 1024
"""A frame is sent once its text adds up to about this much, even short of ``FRAME_ROWS`` (ingest takes messages of
up to 4 MiB; 500 rows near the mesh's 64 KiB row limit would be 32 MiB)."""
MAX_LINE_BYTES = 1024 * 1024
"""A row (CSV record or JSON line) longer than this is refused unread (the mesh refuses rows over 64 KiB anyway)."""
MAX_PROBLEMS_KEPT = 100
"""Rows refused by the CLI that are kept to show (as the mesh keeps its first 100); the rest are only counted."""
_READ_BYTES = 64 * 1024  # the file is read in chunks of this size

FileFormat = RecipientFormat
"""The recipient list formats (``csv``, ``jsonl``)."""


class RecipientFileError(Exception):
    """The file cannot be read as a recipient list at all (an unusable CSV header, an unknown format)."""


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that was not added: its number in the file, its address when known, and why."""

    row: int
    reason: str
    address: str = ""


def file_format(path: Path, fmt: str | None) -> FileFormat:
    """``fmt`` when given, else told by the file name (.csv; .jsonl or .ndjson)."""
    if fmt:
        return FileFormat(fmt)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return FileFormat.CSV
    if suffix in (".jsonl", ".ndjson"):
        return FileFormat.JSONL
    raise RecipientFileError(f"{path.name}: cannot tell the format from the file name; pass --format csv|jsonl")


@dataclass
class RecipientReader:
    """Reads ``path`` as ``fmt``, yielding frames for ``campaign``; refused rows are collected as it goes.

    Call :meth:`check` first (it reads a CSV header, so an unusable file is refused before any RPC), then
    :meth:`frames` once.
    """

    path: Path
    fmt: FileFormat
    campaign: str
    frame_rows: int = FRAME_ROWS
    frame_bytes: int = FRAME_BYTES
    problems: list[RowProblem] = field(default_factory=list)
    """The first ``MAX_PROBLEMS_KEPT`` rows the CLI refused."""
    refused: int = 0
    """Rows the CLI refused (all of them)."""
    numbers: RowNumbers = field(default_factory=RowNumbers)
    """The file row of each recipient sent, by its position in the stream."""

    @property
    def sent(self) -> int:
        """Recipients handed to the stream."""
        return self.numbers.sent

    def check(self) -> None:
        """Refuse a file that cannot be read: missing, not a file, or (CSV) with an unusable header."""
        if not self.path.is_file():
            raise RecipientFileError(f"{self.path}: no such file")
        if self.fmt is FileFormat.CSV:
            with closing(self._rows()) as rows:
                next(rows, None)  # reads the header (and a row, if any)

    def frames(self) -> Iterator[campaigns_pb2.AddCampaignRecipientsRequest]:
        """The recipients in frames; the first names the campaign, and there is always at least one."""
        batch: list[campaigns_pb2.CampaignRecipient] = []
        size = 0
        first = True
        for row in self._rows():
            if isinstance(row, RowError):
                self._refuse(RowProblem(row.row_number, row.reason))
                continue
            self.numbers.add(row.row_number)
            recipient = campaigns_pb2.CampaignRecipient(
                address=common_pb2.EmailAddress(email=row.email.strip(CELL_PADDING),
                                                name=row.name.strip(CELL_PADDING)),
                variables=row.variables)
            batch.append(recipient)
            size += recipient.ByteSize()
            if len(batch) >= self.frame_rows or size >= self.frame_bytes:
                yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=self.campaign if first else "",
                                                                 recipients=batch)
                batch, size, first = [], 0, False
        if batch or first:
            yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=self.campaign if first else "",
                                                             recipients=batch)

    def _refuse(self, problem: RowProblem) -> None:
        self.refused += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)

    def _rows(self) -> Generator[RecipientRow | RowError, None, None]:
        reader = RowReader(self.fmt, max_row_bytes=MAX_LINE_BYTES)
        splitter = RecordSplitter(MAX_LINE_BYTES, csv_quotes=self.fmt is FileFormat.CSV)
        try:
            with self.path.open("rb") as fh:
                for record in split_records(iter(partial(fh.read, _READ_BYTES), b""), splitter, strip_bom=True):
                    row = reader.read(record)
                    if row is not None:
                        yield row
            reader.close()
        except InvalidArgument as exc:  # an unusable CSV header
            reasons = "; ".join(violation.description for violation in exc.field_violations)
            raise RecipientFileError(f"{self.path.name}: {exc.message}: {reasons}") from exc
