"""A recipient list's records read as rows: what each row says (address, name, variables), as written, or why it
cannot be read — for the campaigns service's import, the gateway's plain ``:addRecipients`` bodies and the CLI's
``esp campaign add-recipients``, so that a list reads the same whichever way it is sent.

Formats
    CSV (RFC 4180) with a header row. The column named ``email`` (any case) is required, ``name`` is optional, and
    every other column is a per-recipient variable named after its header. Quoted fields may hold commas, quotes
    (doubled) and line breaks; a UTF-8 byte order mark and CRLF or LF line ends are accepted. A quote inside an
    unquoted field is taken literally, as Python's ``csv`` module and spreadsheets do.

    JSON Lines: one object a line, ``{"email": ..., "name": ..., "variables": {...}}``, or flat: every key beside
    ``email``, ``name`` and ``variables`` is a variable (the ``variables`` object wins over a flat key of the same
    name). A variable is a string, or a number or boolean written out as JSON writes it (``12``, ``0.5``, ``true``);
    ``null`` leaves the variable out (the template's missing-variable policy applies); an array or object refuses the
    row.

Row numbers
    1-based and counted as a spreadsheet shows them: in CSV **the header is row 1 and the first recipient row 2**; a
    record whose quoted field spans several physical lines is one row. In JSON Lines the first line is row 1. Blank
    lines are skipped without an error, but keep their number, so a reported row number is where the customer's
    editor shows that row. A list sent as a stream of recipients is numbered by the mesh in stream order;
    :class:`RowNumbers` turns those positions back into the file's rows.

What is judged here, and what is not
    A row that cannot be read at all is a :class:`RowError`: too long, not UTF-8, malformed CSV or JSON, a wrong
    column count, a JSON line that is not an object or has no address, a value of the wrong JSON type. Whether the
    address and the name are acceptable, and the limits on variables, are the campaigns service's to judge (its
    ``validate_recipient``): a :class:`RecipientRow` holds the values exactly as written, padding included.

Records come from :mod:`libs.common.byte_records` (``csv_quotes`` for CSV, a byte order mark dropped); a
:class:`RowReader` reads them in order.
"""

from __future__ import annotations

import csv
import json
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from libs.common.byte_records import Oversize, Record, Unterminated
from libs.common.errors import FieldViolation, InvalidArgument

__all__ = [
    "CELL_PADDING",
    "MAX_ROW_BYTES",
    "RecipientFormat",
    "RecipientRow",
    "RowError",
    "RowErrorKind",
    "RowNumbers",
    "RowReader",
    "shown",
]

MAX_ROW_BYTES = 64 * 1024
"""The longest row the mesh reads (a CSV record or JSON line, quotes and line ends included); a longer one is a
``TOO_LONG`` row error, skipped to its end and never held."""
CELL_PADDING = " \t"
"""Trimmed from around an address and a name before they are judged (a spreadsheet cell's stray padding). Only
these: a line break around an address stays, and is refused as ingest refuses it."""
_JSON_FIELDS = frozenset({"email", "name", "variables"})


class RecipientFormat(StrEnum):
    """The formats a recipient list may be written in."""

    CSV = "csv"
    """RFC 4180 CSV with a header row."""
    JSONL = "jsonl"
    """JSON Lines: one object a line."""


class RowErrorKind(StrEnum):
    """Why a row was refused, as a machine-readable code (the reason text says it for people)."""

    MISSING_EMAIL = "MISSING_EMAIL"
    INVALID_ADDRESS = "INVALID_ADDRESS"
    INVALID_NAME = "INVALID_NAME"
    WRONG_COLUMN_COUNT = "WRONG_COLUMN_COUNT"
    MALFORMED_CSV = "MALFORMED_CSV"
    INVALID_UTF8 = "INVALID_UTF8"
    MALFORMED_JSON = "MALFORMED_JSON"
    NOT_AN_OBJECT = "NOT_AN_OBJECT"
    UNKNOWN_FIELD = "UNKNOWN_FIELD"
    BAD_VARIABLE = "BAD_VARIABLE"
    """A variable of the wrong type (array, object), an empty or malformed name, or a NUL in its value."""
    TOO_MANY_VARIABLES = "TOO_MANY_VARIABLES"
    TOO_LONG = "TOO_LONG"
    """The row, a variable name or a variable value is over its limit."""


@dataclass(frozen=True, slots=True)
class RowError:
    """A refused row: where it is, why (for people) and which kind of problem (for code)."""

    row_number: int
    reason: str
    kind: RowErrorKind

    def __str__(self) -> str:
        """``KIND: reason``, as a response's ``errors[].reason`` says it."""
        return f"{self.kind.value}: {self.reason}"


class RecipientRow(NamedTuple):
    """A row as written: its number (see the module docstring) and its values, not yet judged. (A named tuple: one
    is made for every row of a list, at a third of a frozen dataclass's cost.)"""

    row_number: int
    email: str
    name: str
    variables: dict[str, str]


def shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut short when long (a reason never repeats a whole oversized value)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


@dataclass(frozen=True, slots=True)
class _CsvColumns:
    """What the header says each column is."""

    count: int
    email: int
    name: int | None
    variables: tuple[tuple[int, str], ...]


class RowReader:
    """Reads the records of one recipient list, in order, as rows; in CSV the first record is the header.

    A header that cannot be used (no ``email`` column, a repeated or empty column name, not UTF-8 or CSV) raises
    ``InvalidArgument`` (reason ``MALFORMED_RECIPIENT_HEADER``, a field violation for every problem) before any row;
    so does a CSV without any record, at :meth:`close`. ``variable_name_problem`` and ``max_variables`` let a caller
    that judges variables refuse their header columns too, in the same error.
    """

    def __init__(self, fmt: RecipientFormat, *, max_row_bytes: int = MAX_ROW_BYTES,
                 variable_name_problem: Callable[[str], str | None] | None = None,
                 max_variables: int | None = None) -> None:
        self.max_row_bytes = max_row_bytes
        """A longer row is refused ``TOO_LONG`` (records are normally cut at this limit already)."""
        self.row_number = 0
        """The number of the last record read."""
        self.blank_rows = 0
        """Blank rows skipped so far."""
        self._csv = fmt is RecipientFormat.CSV
        self._columns: _CsvColumns | None = None
        self._variable_name_problem = variable_name_problem
        self._max_variables = max_variables

    def read(self, record: Record) -> RecipientRow | RowError | None:
        """The next record's row, or None for the CSV header and for a blank row (counted in ``blank_rows``)."""
        self.row_number += 1
        number = self.row_number
        if self._csv and self._columns is None:
            self._columns = self._header(record)
            return None
        if not isinstance(record, bytes):
            return self._unreadable(number, record)
        if len(record) > self.max_row_bytes:
            return self._unreadable(number, Oversize(len(record)))
        record = record.removesuffix(b"\r")
        if not record or (not self._csv and not record.strip()):
            self.blank_rows += 1
            return None
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _not_utf8(number, record, exc)
        if self._columns is not None:
            return _csv_row(number, text, self._columns)
        return _jsonl_row(number, text)

    def close(self) -> None:
        """At the end of the list: ``InvalidArgument`` when a CSV had no header row at all."""
        if self._csv and self._columns is None:
            raise _refuse_header(FieldViolation("header", "the file is empty: a CSV header row naming an 'email' "
                                                          "column is required"))

    def _unreadable(self, number: int, record: Oversize | Unterminated) -> RowError:
        if isinstance(record, Oversize):
            return RowError(number, f"row of {record.size} bytes; at most {self.max_row_bytes}", RowErrorKind.TOO_LONG)
        return RowError(number, "the file ends inside a quoted field (a quote is not closed)",
                        RowErrorKind.MALFORMED_CSV)

    def _header(self, record: Record) -> _CsvColumns:
        if not isinstance(record, bytes) or len(record) > self.max_row_bytes:
            unreadable = Oversize(len(record)) if isinstance(record, bytes) else record
            raise _refuse_header(FieldViolation("header", self._unreadable(1, unreadable).reason))
        record = record.removesuffix(b"\r")
        try:
            names = [name.strip() for name in _csv_fields(record.decode("utf-8"))]
        except UnicodeDecodeError as exc:
            raise _refuse_header(FieldViolation("header", _not_utf8(1, record, exc).reason)) from exc
        except csv.Error as exc:
            raise _refuse_header(FieldViolation("header", f"not valid CSV: {exc}")) from exc
        problems: list[FieldViolation] = []
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            where = f"header[{i}]"
            folded = name.casefold()
            if not name:
                problems.append(FieldViolation(where, f"column {i + 1} has no name"))
            elif folded in seen:
                problems.append(FieldViolation(where, f"column {i + 1} {shown(name)} repeats column "
                                                      f"{seen[folded] + 1} (names are compared ignoring case)",
                                               "DUPLICATE_COLUMN"))
            else:
                seen[folded] = i
                judge = self._variable_name_problem
                problem = judge(name) if judge is not None and folded not in ("email", "name") else None
                if problem is not None:
                    problems.append(FieldViolation(where, problem))
        if "email" not in seen:
            problems.append(FieldViolation("header", "no 'email' column (the header has "
                                                     f"{', '.join(shown(n) for n in names[:20])})", "MISSING_EMAIL"))
        variables = tuple((i, name) for i, name in enumerate(names) if name.casefold() not in ("email", "name"))
        if self._max_variables is not None and len(variables) > self._max_variables:
            problems.append(FieldViolation("header", f"{len(variables)} variable columns; at most "
                                                     f"{self._max_variables}", "TOO_MANY_VARIABLES"))
        if problems:
            raise _refuse_header(*problems)
        return _CsvColumns(len(names), seen["email"], seen.get("name"), variables)


def _refuse_header(*violations: FieldViolation) -> InvalidArgument:
    return InvalidArgument("the recipient list's CSV header is not usable", reason="MALFORMED_RECIPIENT_HEADER",
                           field_violations=violations)


def _not_utf8(row_number: int, record: bytes, exc: UnicodeDecodeError) -> RowError:
    return RowError(row_number, f"not valid UTF-8 (byte 0x{record[exc.start]:02x} at offset {exc.start}); "
                                "save the file as UTF-8", RowErrorKind.INVALID_UTF8)


def _csv_fields(text: str) -> list[str]:
    """One CSV record's fields (raises ``csv.Error``)."""
    return next(csv.reader((text,)), [])


def _csv_row(row_number: int, text: str, columns: _CsvColumns) -> RecipientRow | RowError:
    try:
        fields = _csv_fields(text)
    except csv.Error as exc:
        return RowError(row_number, f"not valid CSV: {exc}", RowErrorKind.MALFORMED_CSV)
    if len(fields) != columns.count:
        return RowError(row_number, f"{len(fields)} columns where the header has {columns.count}",
                        RowErrorKind.WRONG_COLUMN_COUNT)
    name = fields[columns.name] if columns.name is not None else ""
    return RecipientRow(row_number, fields[columns.email], name, {key: fields[i] for i, key in columns.variables})


def _refuse_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _variable_text(value: object) -> str | None:
    """A JSON variable's value as text: None for null; raises TypeError for an array or object."""
    if isinstance(value, str):
        return value
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise TypeError(f"{'an array' if isinstance(value, list) else 'an object'}")


def _encodable(email: str, name: str, variables: Mapping[str, str]) -> bool:
    """False when a string holds a lone surrogate (only a JSON ``\\ud800`` escape can make one): no UTF-8 text,
    and so no Postgres text, can hold it."""
    try:
        for text in (email, name, *variables, *variables.values()):
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_row(row_number: int, text: str) -> RecipientRow | RowError:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return RowError(row_number, f"not valid JSON: {exc.msg} at column {exc.colno}", RowErrorKind.MALFORMED_JSON)
    except (ValueError, RecursionError) as exc:
        return RowError(row_number, f"not valid JSON: {exc or 'nested too deeply'}", RowErrorKind.MALFORMED_JSON)
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        return RowError(row_number, f"{kind} where an object {{\"email\": ...}} was expected",
                        RowErrorKind.NOT_AN_OBJECT)
    email = value.get("email")
    if email is None or email == "":
        return RowError(row_number, "no email address", RowErrorKind.MISSING_EMAIL)
    if not isinstance(email, str):
        return RowError(row_number, "email must be a string", RowErrorKind.INVALID_ADDRESS)
    name = value.get("name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        return RowError(row_number, "name must be a string", RowErrorKind.INVALID_NAME)
    nested = value.get("variables")
    if nested is not None and not isinstance(nested, dict):
        return RowError(row_number, "variables must be an object", RowErrorKind.BAD_VARIABLE)
    # Flat keys beside email and name are variables too (as a CSV's columns are); the "variables" object wins.
    raw = {key: item for key, item in value.items() if key not in _JSON_FIELDS}
    raw.update(nested or {})
    variables: dict[str, str] = {}
    for key, item in raw.items():
        try:
            rendered = _variable_text(item)
        except TypeError as exc:
            return RowError(row_number, f"variable {shown(key)} is {exc}; a value is a string, number or boolean",
                            RowErrorKind.BAD_VARIABLE)
        if rendered is not None:
            variables[key] = rendered
    if "\\u" in text and not _encodable(email, name, variables):
        return RowError(row_number, "a \\u escape encodes half of a surrogate pair, which is no character",
                        RowErrorKind.MALFORMED_JSON)
    return RecipientRow(row_number, email, name, variables)


class RowNumbers:
    """The file rows of the recipients sent as a stream (the mesh numbers those 1, 2, 3... in stream order).

    Positions and rows advance together except where rows were not sent (blank, or refused before sending); only the
    offsets where they change are kept, so memory grows with those runs, never with the rows.
    """

    def __init__(self) -> None:
        self.sent = 0
        """Recipients sent so far."""
        self._positions = array("q")
        self._offsets = array("q")

    def add(self, row_number: int) -> int:
        """Account for the recipient of file row ``row_number``, sent as the next of the stream; its position."""
        self.sent += 1
        offset = row_number - self.sent
        if not self._offsets or self._offsets[-1] != offset:
            self._positions.append(self.sent)
            self._offsets.append(offset)
        return self.sent

    def row_of(self, position: int) -> int:
        """The file row of stream ``position`` (``position`` itself before anything was sent)."""
        index = bisect_right(self._positions, position) - 1
        return position + self._offsets[index] if index >= 0 else position
