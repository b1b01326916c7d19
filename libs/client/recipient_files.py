"""A recipient list read from a CSV or JSON Lines file one row at a time and cut into ``AddCampaignRecipients``
frames, for ``esp campaign add-recipients``.

The file is never held whole: a row is read, turned into a ``CampaignRecipient`` and put in the frame being built;
a frame holds at most ``FRAME_ROWS`` recipients (and about ``FRAME_BYTES`` of text), and is handed to gRPC, which
sends it before asking for the next. What stays in memory beyond one frame grows only with the rows that were *not*
sent (see :class:`RowNumbers`) and is capped for the errors kept to show.

Rows are numbered as the mesh numbers them in an import (``ImportCampaignRecipients``): 1-based, in CSV the header
is row 1 and a record whose quoted field spans several lines is one row, in JSON Lines the line number; blank rows
are skipped but keep their number. The mesh numbers a *streamed* recipient by its position in the stream, so
:class:`RowNumbers` turns those positions back into the file's rows.

The CLI refuses only what it cannot turn into a recipient (a CSV record with the wrong number of columns or invalid
UTF-8, a line that is not a JSON object, a variable that is an array or object); addresses, names and the limits on
variables are checked by the mesh, which reports them with the row number too.
"""

from __future__ import annotations

import bisect
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from esp.v1 import campaigns_pb2, common_pb2

__all__ = [
    "FRAME_BYTES",
    "FRAME_ROWS",
    "MAX_LINE_BYTES",
    "MAX_PROBLEMS_KEPT",
    "FileFormat",
    "RecipientFileError",
    "RecipientReader",
    "RowNumbers",
    "RowProblem",
    "file_format",
]

FRAME_ROWS = 500
"""Recipients per frame."""
FRAME_BYTES = 1024 * 1024
"""A frame is sent once its text adds up to about this much, even short of ``FRAME_ROWS`` (ingest takes messages of
up to 4 MiB; 500 rows near the mesh's 64 KiB row limit would be 32 MiB)."""
MAX_LINE_BYTES = 1024 * 1024
"""A JSON line longer than this is refused unread (the mesh refuses rows over 64 KiB anyway)."""
MAX_PROBLEMS_KEPT = 100
"""Rows refused by the CLI that are kept to show (as the mesh keeps its first 100); the rest are only counted."""


class FileFormat(StrEnum):
    """The recipient list formats."""

    CSV = "csv"
    JSONL = "jsonl"


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


class RowNumbers:
    """Maps a recipient's position in the stream (as the mesh reports it) to its row in the file.

    Positions and rows advance together except where the CLI skipped rows (blank, or refused); only those jumps are
    kept, as (first position, its row) runs, so the memory is that of the skipped rows, not of the file.
    """

    def __init__(self) -> None:
        self._positions: list[int] = []
        self._rows: list[int] = []

    def record(self, position: int, row: int) -> None:
        """The recipient at stream ``position`` (1-based) is file row ``row``."""
        if self._positions and row - self._rows[-1] == position - self._positions[-1]:
            return
        self._positions.append(position)
        self._rows.append(row)

    def row_of(self, position: int) -> int:
        """The file row of stream ``position`` (``position`` itself before anything was recorded)."""
        run = bisect.bisect_right(self._positions, position) - 1
        if run < 0:
            return position
        return self._rows[run] + position - self._positions[run]


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
    sent: int = 0
    """Recipients handed to the stream."""
    numbers: RowNumbers = field(default_factory=RowNumbers)

    def check(self) -> None:
        """Refuse a file that cannot be read: missing, not a file, or (CSV) with an unusable header."""
        if not self.path.is_file():
            raise RecipientFileError(f"{self.path}: no such file")
        if self.fmt is FileFormat.CSV:
            with self._open_csv() as fh:
                _csv_header(self.path, csv.reader(fh))

    def frames(self) -> Iterator[campaigns_pb2.AddCampaignRecipientsRequest]:
        """The recipients in frames; the first names the campaign, and there is always at least one."""
        batch: list[campaigns_pb2.CampaignRecipient] = []
        size = 0
        first = True
        rows = self._csv_rows() if self.fmt is FileFormat.CSV else self._jsonl_rows()
        for row, parsed in rows:
            if isinstance(parsed, str):
                self._refuse(RowProblem(row, parsed))
                continue
            self.sent += 1
            self.numbers.record(self.sent, row)
            batch.append(parsed)
            size += parsed.ByteSize()
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

    def _open_csv(self) -> IO[str]:
        # surrogateescape: a byte that is not UTF-8 costs the row it is in (found by _has_undecodable), not the file.
        return self.path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")

    def _csv_rows(self) -> Iterator[tuple[int, campaigns_pb2.CampaignRecipient | str]]:
        with self._open_csv() as fh:
            reader = csv.reader(fh)
            header = _csv_header(self.path, reader)
            folded = [name.casefold() for name in header]
            email_at = folded.index("email")
            name_at = folded.index("name") if "name" in folded else None
            variables = [(i, name) for i, name in enumerate(header) if i not in (email_at, name_at)]
            row = 1
            while True:
                row += 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # the reader carries on at the next line
                    yield row, f"not valid CSV: {exc}"
                    continue
                if not fields:
                    continue  # a blank line: skipped, its number kept
                if len(fields) != len(header):
                    yield row, f"{len(fields)} columns where the header has {len(header)}"
                    continue
                if any(_has_undecodable(f) for f in fields):
                    yield row, "not valid UTF-8; save the file as UTF-8"
                    continue
                recipient = campaigns_pb2.CampaignRecipient(
                    address=common_pb2.EmailAddress(email=fields[email_at].strip(" \t"),
                                                    name=fields[name_at].strip(" \t") if name_at is not None else ""),
                    variables={name: fields[i] for i, name in variables})
                yield row, recipient

    def _jsonl_rows(self) -> Iterator[tuple[int, campaigns_pb2.CampaignRecipient | str]]:
        with self.path.open("rb") as fh:
            row = 0
            while True:
                line = fh.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                row += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest of the line unread
                        line = fh.readline(MAX_LINE_BYTES)
                    yield row, f"line longer than {MAX_LINE_BYTES} bytes"
                    continue
                if row == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield row, "not valid UTF-8; save the file as UTF-8"
                    continue
                yield row, _jsonl_recipient(text)


def _has_undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    """The header's column names, or :class:`RecipientFileError` naming every problem."""
    try:
        names = next(reader, None)
    except csv.Error as exc:
        raise RecipientFileError(f"{path.name}: the header row is not valid CSV: {exc}") from exc
    if names is None:
        raise RecipientFileError(f"{path.name}: the file is empty; a header row naming an 'email' column is needed")
    names = [n.strip() for n in names]
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        folded = name.casefold()
        if not name:
            problems.append(f"column {i + 1} has no name")
        elif folded in seen:
            problems.append(f"column {i + 1} {name!r} repeats column {seen[folded] + 1}")
        elif _has_undecodable(name):
            problems.append(f"column {i + 1} is not valid UTF-8")
        else:
            seen[folded] = i
    if "email" not in seen:
        problems.append(f"no 'email' column (the header has {', '.join(repr(n) for n in names[:20])})")
    if problems:
        raise RecipientFileError(f"{path.name}: the header row is not usable: " + "; ".join(problems))
    return names


def _refuse_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _variable_text(key: str, value: object) -> str | None:
    """A JSON value as a variable's text (as the mesh's import renders it): None for null; ValueError for an array
    or an object."""
    if isinstance(value, str):
        return value
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    kind = "an array" if isinstance(value, list) else "an object"
    raise ValueError(f"variable {key!r} is {kind}; a value is a string, number or boolean")


def _jsonl_recipient(text: str) -> campaigns_pb2.CampaignRecipient | str:
    """One JSON line as a recipient, or why it is not one. ``{"email", "name", "variables": {...}}``; any other key
    is a variable too (flat form), and one in ``variables`` wins over a flat one of the same name."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        return f"not valid JSON: {exc or 'nested too deeply'}"
    if not isinstance(value, dict):
        return "not a JSON object {\"email\": ...}"
    email, name = value.get("email"), value.get("name")
    if email is None or email == "":
        return "no email address"
    if not isinstance(email, str):
        return "email must be a string"
    if name is not None and not isinstance(name, str):
        return "name must be a string"
    nested = value.get("variables")
    if nested is not None and not isinstance(nested, dict):
        return "variables must be an object"
    variables: dict[str, str] = {}
    try:
        for source in ({k: v for k, v in value.items() if k not in ("email", "name", "variables")}, nested or {}):
            for key, item in source.items():
                rendered = _variable_text(key, item)
                if rendered is not None:
                    variables[key] = rendered
    except ValueError as exc:
        return str(exc)
    texts = (email, name or "", *variables, *variables.values())
    if any(_has_undecodable(t) for t in texts):
        return "a \\u escape encodes half of a surrogate pair, which is no character"
    return campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email=email.strip(" \t"),
                                                                           name=(name or "").strip(" \t")),
                                           variables=variables)
