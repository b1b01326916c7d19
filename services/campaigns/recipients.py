"""A campaign's recipient list: CSV or JSON Lines read from a byte stream in bounded memory, every row accounted for.

Recipients arrive as an uploaded object streamed from S3 (``libs.common.s3.stream_object``), as a plain request body
(:func:`body_chunks`), or one by one through the client-streaming RPC (:func:`validate_recipient`). Every path ends
in the same check, so a recipient refused by one is refused by all — and by ingest: the address and the display name
are checked by ``libs.common.addresses``, the one definition a send request uses too (after trimming the spaces and
tabs a spreadsheet cell may carry around them).

Formats
    CSV (RFC 4180) with a header row. The column named ``email`` (any case) is required, ``name`` is optional, and
    every other column is a per-recipient variable named after its header. Quoted fields may hold commas, quotes
    (doubled) and line breaks; a UTF-8 byte order mark and CRLF or LF line ends are accepted. A quote inside an
    unquoted field is taken literally, as Python's ``csv`` module and spreadsheets do.

    JSON Lines: one object a line, ``{"email": ..., "name": ..., "variables": {...}}``, or flat: every key beside
    ``email`` and ``name`` is a variable (the ``variables`` object wins over a flat key of the same name). A
    variable is a string, or a number or boolean written out as JSON writes it (``12``, ``0.5``, ``true``); ``null``
    leaves the variable out (the template's missing-variable policy applies); an array or object refuses the row.

Row numbers
    1-based and counted as a spreadsheet shows them: in CSV **the header is row 1 and the first recipient row 2**; a
    record whose quoted field spans several physical lines is one row. In JSON Lines the first line is row 1. Blank
    lines are skipped without an error, but keep their number, so a reported row number is where the customer's
    editor shows that row. Each :class:`RecipientBatch` says how many blank rows it skipped, so recipients + errors
    + blank rows = every row read.

Bounded memory
    The stream is split into rows at the byte level as chunks arrive (a chunk may end anywhere: inside a quoted
    field, a ``\\r\\n`` or a multi-byte character), and rows are handed on in batches of at most ``batch_size`` rows
    and about ``RecipientLimits.max_batch_bytes`` bytes. What is held at once is one chunk, one row in progress (at most
    ``max_row_bytes``: a longer row is skipped to its end and reported, never buffered) and one batch — never the
    list. Rows are decoded one by one, so invalid UTF-8 costs only the row it is in. Measured: 200,000 CSV rows
    (5 columns) peak at about 1.5 MiB of traced memory with 64 KiB chunks, 7.5 MiB with S3's 1 MiB chunks; the parsed
    list would take over 150 MB.

Limits (:class:`RecipientLimits`)
    A row of at most 64 KiB, 100 variables, variable names of 128 characters and values of 8 KiB; a display name of
    256 characters (``libs.common.addresses``, as ingest). A row over a limit is a ``TOO_LONG`` or
    ``TOO_MANY_VARIABLES`` row error.

Speed
    On the 2-core development machine (parser alone, best of 3): about 165,000 CSV rows/s and 125,000 JSON lines/s,
    a third of it the address check.

Not done here
    Duplicates within a campaign and suppressed addresses are dropped and counted later, in the database (a unique
    key per campaign and address; the tenant's suppression list): a set of the addresses seen would grow with the
    list, which is what this module must not do.

A malformed CSV header (no ``email`` column, a repeated or empty column name, too many variables) fails the whole
import with ``InvalidArgument`` before any row is yielded. Anything wrong with one row is a :class:`RowError` for
that row, and the rows after it proceed.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from libs.common.addresses import check_mailbox, has_control
from libs.common.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_LIMITS",
    "Recipient",
    "RecipientBatch",
    "RecipientFormat",
    "RecipientLimits",
    "RowError",
    "RowErrorKind",
    "body_chunks",
    "parse_recipients",
    "validate_recipient",
]


class RecipientFormat(StrEnum):
    """The formats a recipient list may be uploaded in."""

    CSV = "csv"
    """RFC 4180 CSV with a header row."""
    JSONL = "jsonl"
    """JSON Lines: one object a line."""


@dataclass(frozen=True, slots=True)
class RecipientLimits:
    """Caps on one recipient, so that no row can take unbounded memory or time."""

    max_row_bytes: int = 64 * 1024
    """One row as uploaded (CSV record or JSON line, quotes and line ends included); for a recipient streamed one by
    one, the characters of its address, name, variable names and values together."""
    max_variables: int = 100
    """Variables per recipient (in CSV: the columns other than ``email`` and ``name``)."""
    max_variable_name_chars: int = 128
    max_variable_value_chars: int = 8 * 1024
    max_batch_bytes: int = 4 * 1024 * 1024
    """A batch ends when its rows add up to this many bytes, even short of ``batch_size`` rows: 1,000 rows of 64 KiB
    would otherwise be a 64 MiB batch."""

    def __post_init__(self) -> None:
        for field, value in (("max_row_bytes", self.max_row_bytes), ("max_variables", self.max_variables),
                             ("max_variable_name_chars", self.max_variable_name_chars),
                             ("max_variable_value_chars", self.max_variable_value_chars),
                             ("max_batch_bytes", self.max_batch_bytes)):
            if value < 1:
                raise ValueError(f"RecipientLimits.{field} must be positive, not {value}")


DEFAULT_LIMITS = RecipientLimits()
"""The limits an import runs with unless told otherwise."""


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
class Recipient:
    """A valid recipient: the address in canonical form, the display name and the template variables."""

    row_number: int
    """1-based; in CSV the header is row 1 (see the module docstring); in a stream, the recipient's position."""
    email: str
    name: str
    variables: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RowError:
    """A refused row: where it is, why (for people) and which kind of problem (for code)."""

    row_number: int
    reason: str
    kind: RowErrorKind


@dataclass(frozen=True, slots=True)
class RecipientBatch:
    """Consecutive rows of a list: the valid recipients and the refused rows, each in row order."""

    recipients: tuple[Recipient, ...]
    errors: tuple[RowError, ...]
    blank_rows: int
    """Blank lines skipped in this batch's span of rows."""
    last_row: int
    """The number of the last row this batch covers: every row up to it has been accounted for, so an import can
    resume after it."""


_JSON_FIELDS = frozenset({"email", "name", "variables"})
_PADDING = " \t"
"""Trimmed from around an address and a name (a spreadsheet cell's stray padding). Only these: a line break around
an address stays, and is refused as ingest refuses it."""


def _problems(email: str, name: str, variables: Mapping[str, str], limits: RecipientLimits,
              *, check_names: bool) -> tuple[str, str, list[tuple[RowErrorKind, str]]]:
    """The canonical address and name and every problem of one recipient (the shared check of every path)."""
    problems: list[tuple[RowErrorKind, str]] = []
    email = email.strip(_PADDING)
    name = name.strip(_PADDING)
    canonical = ""
    checked, mailbox_problems = check_mailbox(email, name, cached=False)  # a list's addresses do not repeat
    if not email:
        problems.append((RowErrorKind.MISSING_EMAIL, "no email address"))
    elif checked is None:
        problems += [(RowErrorKind.INVALID_ADDRESS, p.description) for p in mailbox_problems if p.part == "email"]
    else:
        canonical = checked
    problems += [(RowErrorKind.INVALID_NAME, f"name: {p.description}") for p in mailbox_problems if p.part == "name"]
    if len(variables) > limits.max_variables:
        problems.append((RowErrorKind.TOO_MANY_VARIABLES,
                         f"{len(variables)} variables; at most {limits.max_variables}"))
        return canonical, name, problems
    size = len(email) + len(name)
    for key, value in variables.items():
        size += len(key) + len(value)
        if check_names:
            name_problem = _variable_name_problem(key, limits)
            if name_problem is not None:
                problems.append(name_problem)
        if len(value) > limits.max_variable_value_chars:
            problems.append((RowErrorKind.TOO_LONG, f"variable {_shown(key)}: value longer than "
                                                    f"{limits.max_variable_value_chars} characters"))
        elif "\x00" in value:
            problems.append((RowErrorKind.BAD_VARIABLE, f"variable {_shown(key)}: NUL is not allowed in a value"))
    if size > limits.max_row_bytes:
        problems.append((RowErrorKind.TOO_LONG, f"longer than {limits.max_row_bytes} characters in all"))
    return canonical, name, problems


def _variable_name_problem(key: str, limits: RecipientLimits) -> tuple[RowErrorKind, str] | None:
    if not key.strip():
        return RowErrorKind.BAD_VARIABLE, "a variable has an empty name"
    if len(key) > limits.max_variable_name_chars:
        return RowErrorKind.TOO_LONG, (f"variable {_shown(key)}: name longer than {limits.max_variable_name_chars} "
                                       "characters")
    if has_control(key):
        return RowErrorKind.BAD_VARIABLE, f"variable {_shown(key)}: control characters are not allowed in a name"
    return None


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut short when long (a reason never repeats a whole oversized value)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _row(row_number: int, email: str, name: str, variables: Mapping[str, str], limits: RecipientLimits,
         *, check_names: bool = True) -> Recipient | RowError:
    canonical, name, problems = _problems(email, name, variables, limits, check_names=check_names)
    if problems:
        return RowError(row_number, "; ".join(text for _, text in problems), problems[0][0])
    return Recipient(row_number, canonical, name, variables)


def validate_recipient(row_number: int, email: str, name: str = "", variables: Mapping[str, str] | None = None,
                       limits: RecipientLimits = DEFAULT_LIMITS) -> Recipient | RowError:
    """One recipient already parsed (a ``CampaignRecipient`` of the client-streaming RPC, translated by the server)
    checked exactly as a CSV or JSON Lines row is: a :class:`Recipient` with the canonical address, or a
    :class:`RowError` naming every problem. ``row_number`` is the recipient's 1-based position in the stream.
    Spaces and tabs around the address and the name are trimmed."""
    return _row(row_number, email, name, dict(variables or {}), limits)


async def body_chunks(body: bytes, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """A request body already in memory, as the chunk stream :func:`parse_recipients` reads."""
    for start in range(0, len(body), chunk_bytes):
        yield body[start:start + chunk_bytes]


# -- splitting a byte stream into rows -------------------------------------------------------------------------------
# Rows are split on bytes, before decoding: '"', ',' and '\n' are ASCII, and in UTF-8 an ASCII byte never occurs inside
# a multi-byte character, so a split is exact whatever the text, and a row's invalid UTF-8 stays that row's problem.
_QUOTE = 0x22
_COMMA = 0x2C
_NEWLINE_OR_QUOTE = re.compile(b'[\n"]')
_BOM = b"\xef\xbb\xbf"


class _Oversize:
    """A row longer than the limit: skipped to its end, only its length kept."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Unterminated:
    """The last row of a CSV ended inside a quoted field."""

    __slots__ = ()


_Record = bytes | _Oversize | _Unterminated


class _RowSplitter:
    """Cuts a stream of chunks into rows (records), ``\\n`` ends a row; in CSV, not inside a quoted field.

    The CSV states are Python's ``csv`` reader's, followed only as far as quotes decide where a record ends: a quote
    opens a quoted field only at the start of a field; inside one, ``""`` is a quote and a lone ``"`` closes it.
    """

    def __init__(self, max_row_bytes: int, *, csv_quotes: bool) -> None:
        self._max = max_row_bytes
        self._csv = csv_quotes
        self._parts: list[bytes] = []  # the row in progress, from earlier chunks
        self._size = 0  # its length so far (counted on even when it is over the limit and no longer kept)
        self._in_quotes = False
        self._quote_pending = False  # in quotes, the last chunk ended on '"': closing, or the first of '""'?
        self._last_byte = -1  # the row in progress' last byte (for "is this quote at the start of a field")

    def feed(self, chunk: bytes) -> list[_Record]:
        """The rows that ``chunk`` completes, in order."""
        out: list[_Record] = []
        start = 0  # where the row in progress starts in this chunk
        pos = 0
        end = len(chunk)
        while pos < end:
            if self._quote_pending:
                self._quote_pending = False
                if chunk[pos] == _QUOTE:
                    pos += 1
                    continue
                self._in_quotes = False
            if self._in_quotes:
                quote = chunk.find(b'"', pos)
                if quote < 0:
                    pos = end
                elif quote + 1 == end:
                    self._quote_pending = True
                    pos = end
                elif chunk[quote + 1] == _QUOTE:
                    pos = quote + 2
                else:
                    self._in_quotes = False
                    pos = quote + 1
                continue
            if not self._csv:
                newline = chunk.find(b"\n", pos)
                if newline < 0:
                    break
                hit = newline
            else:
                match = _NEWLINE_OR_QUOTE.search(chunk, pos)
                if match is None:
                    break
                hit = match.start()
                if chunk[hit] == _QUOTE:
                    if hit > start:
                        at_field_start = chunk[hit - 1] == _COMMA
                    else:  # the row's first byte in this chunk: the row's start, or after its last byte so far
                        at_field_start = self._size == 0 or self._last_byte == _COMMA
                    self._in_quotes = at_field_start
                    pos = hit + 1
                    continue
            out.append(self._finish(chunk, start, hit))
            start = pos = hit + 1
        if start < end:
            self._keep(chunk, start, end)
        return out

    def close(self) -> _Record | None:
        """The last row when the stream does not end with a line end (None when nothing is left)."""
        if self._size == 0:
            return None
        unterminated = self._in_quotes and not self._quote_pending
        record = self._finish(b"", 0, 0)
        return _Unterminated() if unterminated and not isinstance(record, _Oversize) else record

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        self._size += end - start
        self._last_byte = chunk[end - 1]
        if self._size <= self._max:
            self._parts.append(chunk[start:end])
        elif self._parts:
            self._parts.clear()  # over the limit: only its length is counted from now on

    def _finish(self, chunk: bytes, start: int, end: int) -> _Record:
        size = self._size + end - start
        record: _Record
        if size > self._max:
            record = _Oversize(size)
        elif self._parts:
            self._parts.append(chunk[start:end])
            record = b"".join(self._parts)
        else:
            record = chunk[start:end]
        self._parts.clear()
        self._size = 0
        self._in_quotes = self._quote_pending = False
        self._last_byte = -1
        return record


async def _records(chunks: AsyncIterable[bytes], splitter: _RowSplitter) -> AsyncIterator[list[_Record]]:
    """The stream's rows, a chunk's worth at a time, with a leading byte order mark removed."""
    head = b""
    started = False
    async for chunk in chunks:
        if not started:
            head += chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                continue  # too short to tell whether a BOM starts the stream
            chunk = head.removeprefix(_BOM)
            started = True
        if chunk:
            yield splitter.feed(chunk)
    if not started:
        yield splitter.feed(head)
    last = splitter.close()
    if last is not None:
        yield [last]


# -- decoding rows ---------------------------------------------------------------------------------------------------
def _decode(row_number: int, record: bytes) -> str | RowError:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(row_number, f"not valid UTF-8 (byte 0x{record[exc.start]:02x} at offset {exc.start}); "
                                    "save the file as UTF-8", RowErrorKind.INVALID_UTF8)


def _record_error(row_number: int, record: _Oversize | _Unterminated, limits: RecipientLimits) -> RowError:
    if isinstance(record, _Oversize):
        return RowError(row_number, f"row of {record.size} bytes; at most {limits.max_row_bytes}",
                        RowErrorKind.TOO_LONG)
    return RowError(row_number, "the file ends inside a quoted field (a quote is not closed)",
                    RowErrorKind.MALFORMED_CSV)


@dataclass(frozen=True, slots=True)
class _CsvColumns:
    """What the header says each column is."""

    count: int
    email: int
    name: int | None
    variables: tuple[tuple[int, str], ...]


def _csv_fields(text: str) -> list[str]:
    """One CSV record's fields (raises ``csv.Error``)."""
    return next(csv.reader((text,)), [])


def _csv_header(record: _Record | None, limits: RecipientLimits) -> _CsvColumns:
    """The columns, or ``InvalidArgument`` listing every problem of the header."""
    def refuse(*violations: FieldViolation) -> InvalidArgument:
        return InvalidArgument("the recipient list's CSV header is not usable", reason="MALFORMED_RECIPIENT_HEADER",
                               field_violations=violations)

    if record is None:
        raise refuse(FieldViolation("header", "the file is empty: a CSV header row naming an 'email' column is "
                                              "required"))
    if not isinstance(record, bytes):
        raise refuse(FieldViolation("header", _record_error(1, record, limits).reason))
    text = _decode(1, record.removesuffix(b"\r"))
    if isinstance(text, RowError):
        raise refuse(FieldViolation("header", text.reason))
    try:
        names = [name.strip() for name in _csv_fields(text)]
    except csv.Error as exc:
        raise refuse(FieldViolation("header", f"not valid CSV: {exc}")) from exc
    problems: list[FieldViolation] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        where = f"header[{i}]"
        folded = name.casefold()
        if not name:
            problems.append(FieldViolation(where, f"column {i + 1} has no name"))
        elif folded in seen:
            problems.append(FieldViolation(where, f"column {i + 1} {_shown(name)} repeats column {seen[folded] + 1} "
                                                  "(names are compared ignoring case)", "DUPLICATE_COLUMN"))
        else:
            seen[folded] = i
            if folded not in ("email", "name"):
                problem = _variable_name_problem(name, limits)
                if problem is not None:
                    problems.append(FieldViolation(where, problem[1]))
    if "email" not in seen:
        problems.append(FieldViolation("header", "no 'email' column (the header has "
                                                 f"{', '.join(_shown(n) for n in names[:20])})", "MISSING_EMAIL"))
    variables = tuple((i, name) for i, name in enumerate(names) if name.casefold() not in ("email", "name"))
    if len(variables) > limits.max_variables:
        problems.append(FieldViolation("header", f"{len(variables)} variable columns; at most "
                                                 f"{limits.max_variables}", "TOO_MANY_VARIABLES"))
    if problems:
        raise refuse(*problems)
    return _CsvColumns(len(names), seen["email"], seen.get("name"), variables)


def _csv_row(row_number: int, record: bytes, columns: _CsvColumns, limits: RecipientLimits) -> Recipient | RowError:
    text = _decode(row_number, record)
    if isinstance(text, RowError):
        return text
    try:
        fields = _csv_fields(text)
    except csv.Error as exc:
        return RowError(row_number, f"not valid CSV: {exc}", RowErrorKind.MALFORMED_CSV)
    if len(fields) != columns.count:
        return RowError(row_number, f"{len(fields)} columns where the header has {columns.count}",
                        RowErrorKind.WRONG_COLUMN_COUNT)
    name = fields[columns.name] if columns.name is not None else ""
    variables = {key: fields[i] for i, key in columns.variables}
    return _row(row_number, fields[columns.email], name, variables, limits, check_names=False)


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


def _jsonl_row(row_number: int, text: str, limits: RecipientLimits) -> Recipient | RowError:
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
    if len(raw) > limits.max_variables:  # before converting any of them
        return RowError(row_number, f"{len(raw)} variables; at most {limits.max_variables}",
                        RowErrorKind.TOO_MANY_VARIABLES)
    variables: dict[str, str] = {}
    for key, item in raw.items():
        try:
            rendered = _variable_text(item)
        except TypeError as exc:
            return RowError(row_number, f"variable {_shown(key)} is {exc}; a value is a string, number or boolean",
                            RowErrorKind.BAD_VARIABLE)
        if rendered is not None:
            variables[key] = rendered
    if "\\u" in text and not _encodable(email, name, variables):
        return RowError(row_number, "a \\u escape encodes half of a surrogate pair, which is no character",
                        RowErrorKind.MALFORMED_JSON)
    return _row(row_number, email, name, variables, limits)


# -- the import ------------------------------------------------------------------------------------------------------
async def parse_recipients(chunks: AsyncIterable[bytes], fmt: RecipientFormat | str, *, batch_size: int = 1000,
                           limits: RecipientLimits = DEFAULT_LIMITS) -> AsyncIterator[RecipientBatch]:
    """Parse a recipient list (CSV with a header row, or JSON Lines) from ``chunks``, yielding batches of rows.

    ``chunks`` may split the input anywhere. Each batch holds at most ``batch_size`` rows (recipients plus errors)
    and about ``limits.max_batch_bytes`` bytes of input; batches come in row order and together account for every
    row (see the module docstring for numbering: in CSV the header is row 1 and the first recipient row 2).
    Duplicates and suppressed addresses are not looked for here: the database counts them.

    Raises ``InvalidArgument`` for an unknown format and, before any batch, for an unusable CSV header.
    """
    try:
        fmt = RecipientFormat(fmt)
    except ValueError:
        raise InvalidArgument(f"unknown recipient list format {fmt!r}; one of: csv, jsonl",
                              field_violations=[FieldViolation("format", "csv or jsonl")]) from None
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    is_csv = fmt is RecipientFormat.CSV
    splitter = _RowSplitter(limits.max_row_bytes, csv_quotes=is_csv)
    columns: _CsvColumns | None = None
    row_number = 0
    recipients: list[Recipient] = []
    errors: list[RowError] = []
    blank = 0
    batch_bytes = 0

    def batch() -> RecipientBatch:
        nonlocal recipients, errors, blank, batch_bytes
        done = RecipientBatch(tuple(recipients), tuple(errors), blank, row_number)
        recipients, errors, blank, batch_bytes = [], [], 0, 0
        return done

    async for records in _records(chunks, splitter):
        for record in records:
            row_number += 1
            if is_csv and columns is None:
                columns = _csv_header(record, limits)
                continue
            if isinstance(record, bytes):
                batch_bytes += len(record)
                if record.endswith(b"\r"):
                    record = record[:-1]
                if not record or (not is_csv and not record.strip()):
                    blank += 1
                    continue
                if columns is not None:
                    item = _csv_row(row_number, record, columns, limits)
                else:
                    text = _decode(row_number, record)
                    item = text if isinstance(text, RowError) else _jsonl_row(row_number, text, limits)
            else:
                item = _record_error(row_number, record, limits)
            if isinstance(item, Recipient):
                recipients.append(item)
            else:
                errors.append(item)
            if len(recipients) + len(errors) >= batch_size or batch_bytes >= limits.max_batch_bytes:
                yield batch()
    if is_csv and columns is None:
        _csv_header(None, limits)  # raises: no header row at all
    if recipients or errors or blank:
        yield batch()
