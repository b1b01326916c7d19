"""A recipient list (CSV or JSON Lines) read from a streamed body into rows, and the row numbers of a file mapped
from the stream positions the campaigns service reports.

What is read is passed on as written; judging addresses, names and variables is the service's job. A row that cannot
be read at all (malformed CSV or JSON, a wrong column count, not UTF-8, too long) becomes a :class:`Row` with a
``refusal`` in the service's wording (``KIND: reason``, the kinds ``ImportCampaignRecipients`` uses).

Row numbers count as an editor shows them, as ``ImportCampaignRecipients`` counts them: in CSV the header is row 1
and a record whose quoted field spans lines is one row; in JSON Lines the first line is row 1; blank lines are
skipped but keep their number.

CSV: a header row names an ``email`` column (any case); ``name`` is the display name and every other column a
variable named by its header. JSON Lines: ``{"email": ..., "name": ..., "variables": {...}}`` or flat (keys other
than ``email``, ``name`` and ``variables`` are variables too); a number or boolean becomes its JSON text, ``null``
leaves the variable out, an array or object refuses the row.
"""

from __future__ import annotations

import csv
import json
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf.message import Message

from services.gateway.body_streams import Oversize, Record, RecordSplitter, Unterminated, records
from services.gateway.errors import GatewayError, bad_request

MAX_ROW_BYTES = 64 * 1024
"""The longest recipient row read (what ImportCampaignRecipients allows); a longer one is refused, never held."""
KEPT_REASONS = 1000
"""Reasons kept of rows the gateway could not read (the service reports the first 100 refusals)."""
_JSON_FIELDS = frozenset({"email", "name", "variables"})


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
    the rows sent as empty recipients. Offsets are kept where they change, so memory grows with blank-line runs,
    never with rows."""

    def __init__(self) -> None:
        self.sent = 0
        self._positions = array("q")
        self._offsets = array("q")
        self._reasons: dict[int, str] = {}

    def add(self, row: Row) -> None:
        """Account for ``row``, sent as the next recipient of the stream."""
        self.sent += 1
        offset = row.number - self.sent
        if not self._offsets or self._offsets[-1] != offset:
            self._positions.append(self.sent)
            self._offsets.append(offset)
        if row.refusal and len(self._reasons) < KEPT_REASONS:
            self._reasons[self.sent] = row.refusal

    def row_of(self, position: int) -> int:
        """The file row of a stream position."""
        index = bisect_right(self._positions, position) - 1
        return position + self._offsets[index] if index >= 0 else position

    def rewrite(self, response: Message) -> None:
        """Turn the stream positions of ``response.errors`` into file rows, with the gateway's reasons."""
        for error in getattr(response, "errors"):  # noqa: B009 - a dynamic message class
            reason = self._reasons.get(error.row)
            if reason:
                error.reason = reason
            error.row = self.row_of(error.row)


@dataclass(frozen=True, slots=True)
class _Columns:
    count: int
    email: int
    name: int | None
    variables: tuple[tuple[int, str], ...]


def _unreadable(number: int, record: Oversize | Unterminated) -> Row:
    if isinstance(record, Oversize):
        return Row(number, refusal=f"TOO_LONG: row of {record.size} bytes; at most {MAX_ROW_BYTES}")
    return Row(number, refusal="MALFORMED_CSV: the file ends inside a quoted field (a quote is not closed)")


def _decoded(number: int, record: bytes) -> str | Row:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Row(
            number,
            refusal=f"INVALID_UTF8: not valid UTF-8 (byte 0x{record[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8",
        )


async def csv_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[Row]:
    """CSV records as rows (the header is row 1 and is not yielded); a bad header fails the request (400)."""
    columns: _Columns | None = None
    number = 0
    async for record in records(chunks, RecordSplitter(MAX_ROW_BYTES, csv_quotes=True), strip_bom=True):
        number += 1
        if columns is None:
            columns = _csv_header(record)
            continue
        if not isinstance(record, bytes):
            yield _unreadable(number, record)
            continue
        record = record.removesuffix(b"\r")
        if not record:
            continue  # a blank line: skipped, its number kept
        text = _decoded(number, record)
        if isinstance(text, Row):
            yield text
            continue
        try:
            values = next(csv.reader((text,)), [])
        except csv.Error as exc:
            yield Row(number, refusal=f"MALFORMED_CSV: not valid CSV: {exc}")
            continue
        if len(values) != columns.count:
            yield Row(
                number,
                refusal=f"WRONG_COLUMN_COUNT: {len(values)} columns where the header has {columns.count}",
            )
            continue
        yield Row(
            number,
            email=values[columns.email],
            name=values[columns.name] if columns.name is not None else "",
            variables={key: values[index] for index, key in columns.variables},
        )
    if columns is None:
        raise bad_request(
            "the recipient list's CSV header is not usable",
            [("header", "the body is empty: a CSV header row naming an 'email' column is required")],
        )


def _csv_header(record: Record) -> _Columns:
    def refuse(*problems: str) -> GatewayError:
        return bad_request(
            "the recipient list's CSV header is not usable", [("header", problem) for problem in problems]
        )

    if isinstance(record, Oversize):
        raise refuse(f"the header row is longer than {MAX_ROW_BYTES} bytes")
    if not isinstance(record, bytes):
        raise refuse("the file ends inside a quoted field of the header")
    try:
        text = record.removesuffix(b"\r").decode("utf-8")
        names = [name.strip() for name in next(csv.reader((text,)), [])]
    except UnicodeDecodeError as exc:
        raise refuse("the header row is not valid UTF-8") from exc
    except csv.Error as exc:
        raise refuse(f"the header row is not valid CSV: {exc}") from exc
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        folded = name.casefold()
        if not name:
            problems.append(f"column {index + 1} has no name")
        elif folded in seen:
            problems.append(f"column {index + 1} {name!r} repeats column {seen[folded] + 1} (names ignore case)")
        else:
            seen[folded] = index
    if "email" not in seen:
        problems.append(f"no 'email' column (the header has {', '.join(repr(n) for n in names[:20])})")
    if problems:
        raise refuse(*problems)
    variables = tuple((i, name) for i, name in enumerate(names) if name.casefold() not in ("email", "name"))
    return _Columns(len(names), seen["email"], seen.get("name"), variables)


async def jsonl_rows(lines: AsyncIterator[Record]) -> AsyncIterator[Row]:
    """JSON Lines records as rows (line numbers from 1; blank lines skipped, their numbers kept)."""
    number = 0
    async for record in lines:
        number += 1
        if not isinstance(record, bytes):
            yield _unreadable(number, record)
            continue
        if len(record) > MAX_ROW_BYTES:
            yield _unreadable(number, Oversize(len(record)))
            continue
        if not record.strip():
            continue
        text = _decoded(number, record.removesuffix(b"\r"))
        yield text if isinstance(text, Row) else _json_row(number, text)


def _refuse_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _json_row(number: int, text: str) -> Row:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return Row(number, refusal=f"MALFORMED_JSON: not valid JSON: {exc.msg} at column {exc.colno}")
    except (ValueError, RecursionError) as exc:
        return Row(number, refusal=f"MALFORMED_JSON: not valid JSON: {exc or 'nested too deeply'}")
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        return Row(number, refusal=f'NOT_AN_OBJECT: {kind} where an object {{"email": ...}} was expected')
    email, name, nested = value.get("email"), value.get("name"), value.get("variables")
    if email is not None and not isinstance(email, str):
        return Row(number, refusal="INVALID_ADDRESS: email must be a string")
    if name is not None and not isinstance(name, str):
        return Row(number, refusal="INVALID_NAME: name must be a string")
    if nested is not None and not isinstance(nested, dict):
        return Row(number, refusal="BAD_VARIABLE: variables must be an object")
    variables: dict[str, str] = {}
    flat = ((key, item) for key, item in value.items() if key not in _JSON_FIELDS)
    for key, item in (*(nested or {}).items(), *flat):
        if key in variables:
            return Row(number, refusal=f"BAD_VARIABLE: variable {key!r} is given twice (flat and in variables)")
        if isinstance(item, bool | int | float):
            variables[key] = json.dumps(item)
        elif isinstance(item, str):
            variables[key] = item
        elif item is not None:
            kind = "an array" if isinstance(item, list) else "an object"
            return Row(number, refusal=f"BAD_VARIABLE: variable {key!r} is {kind}; a value is a string, number "
                        "or boolean")
    row = Row(number, email=email or "", name=name or "", variables=variables)
    try:
        for piece in (row.email, row.name, *variables, *variables.values()):
            piece.encode("utf-8")
    except UnicodeEncodeError:
        return Row(number, refusal="MALFORMED_JSON: a \\u escape encodes half of a surrogate pair")
    return row
