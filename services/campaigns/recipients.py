"""A campaign's recipient list: CSV or JSON Lines read from a byte stream in bounded memory, every row accounted for.

Recipients arrive as an uploaded object streamed from S3 (``libs.common.s3.stream_object``), as a plain request body
(:func:`body_chunks`), or one by one through the client-streaming RPC (:func:`validate_recipient`). Every path ends
in the same check, so a recipient refused by one is refused by all — and by ingest: the address and the display name
are checked by ``libs.common.addresses``, the one definition a send request uses too (after trimming the spaces and
tabs a spreadsheet cell may carry around them).

Formats and row numbers
    As ``libs.common.recipient_lists`` reads them (the gateway's plain bodies and the CLI read lists the same way):
    CSV with a header row (``email``, ``name``, every other column a variable) or JSON Lines (nested or flat
    variables); in CSV **the header is row 1 and the first recipient row 2**, a multi-line record is one row, blank
    lines keep their number. Each :class:`RecipientBatch` says how many blank rows it skipped, so recipients +
    errors + blank rows = every row read.

Bounded memory
    The stream is cut into rows at the byte level as chunks arrive (``libs.common.byte_records``: a chunk may end
    anywhere), and rows are handed on in batches of at most ``batch_size`` rows and about
    ``RecipientLimits.max_batch_bytes`` bytes. What is held at once is one chunk, one row in progress (at most
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

A malformed CSV header (no ``email`` column, a repeated or empty column name, a variable name over its limit, too
many variables) fails the whole import with ``InvalidArgument`` before any row is yielded. Anything wrong with one
row is a ``RowError`` for that row, and the rows after it proceed.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass

from libs.common.addresses import check_mailbox, has_control
from libs.common.byte_records import RecordSplitter, records
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.recipient_lists import (
    CELL_PADDING,
    MAX_ROW_BYTES,
    RecipientFormat,
    RowError,
    RowErrorKind,
    RowReader,
    shown,
)

__all__ = [
    "DEFAULT_LIMITS",
    "Recipient",
    "RecipientBatch",
    "RecipientLimits",
    "body_chunks",
    "parse_recipients",
    "validate_recipient",
]


@dataclass(frozen=True, slots=True)
class RecipientLimits:
    """Caps on one recipient, so that no row can take unbounded memory or time."""

    max_row_bytes: int = MAX_ROW_BYTES
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


@dataclass(frozen=True, slots=True)
class Recipient:
    """A valid recipient: the address in canonical form, the display name and the template variables."""

    row_number: int
    """1-based; in CSV the header is row 1 (see the module docstring); in a stream, the recipient's position."""
    email: str
    name: str
    variables: Mapping[str, str]


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


def _problems(email: str, name: str, variables: Mapping[str, str], limits: RecipientLimits,
              *, check_names: bool) -> tuple[str, str, list[tuple[RowErrorKind, str]]]:
    """The canonical address and name and every problem of one recipient (the shared check of every path)."""
    problems: list[tuple[RowErrorKind, str]] = []
    email = email.strip(CELL_PADDING)
    name = name.strip(CELL_PADDING)
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
            problems.append((RowErrorKind.TOO_LONG, f"variable {shown(key)}: value longer than "
                                                    f"{limits.max_variable_value_chars} characters"))
        elif "\x00" in value:
            problems.append((RowErrorKind.BAD_VARIABLE, f"variable {shown(key)}: NUL is not allowed in a value"))
    if size > limits.max_row_bytes:
        problems.append((RowErrorKind.TOO_LONG, f"longer than {limits.max_row_bytes} characters in all"))
    return canonical, name, problems


def _variable_name_problem(key: str, limits: RecipientLimits) -> tuple[RowErrorKind, str] | None:
    if not key.strip():
        return RowErrorKind.BAD_VARIABLE, "a variable has an empty name"
    if len(key) > limits.max_variable_name_chars:
        return RowErrorKind.TOO_LONG, (f"variable {shown(key)}: name longer than {limits.max_variable_name_chars} "
                                       "characters")
    if has_control(key):
        return RowErrorKind.BAD_VARIABLE, f"variable {shown(key)}: control characters are not allowed in a name"
    return None


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
    ``RowError`` naming every problem. ``row_number`` is the recipient's 1-based position in the stream.
    Spaces and tabs around the address and the name are trimmed."""
    return _row(row_number, email, name, dict(variables or {}), limits)


async def body_chunks(body: bytes, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """A request body already in memory, as the chunk stream :func:`parse_recipients` reads."""
    for start in range(0, len(body), chunk_bytes):
        yield body[start:start + chunk_bytes]


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

    def header_name_problem(name: str) -> str | None:
        problem = _variable_name_problem(name, limits)
        return None if problem is None else problem[1]

    reader = RowReader(fmt, max_row_bytes=limits.max_row_bytes, variable_name_problem=header_name_problem,
                       max_variables=limits.max_variables)
    recipients: list[Recipient] = []
    errors: list[RowError] = []
    blank_before = 0  # blank rows counted before this batch
    batch_bytes = 0

    def batch() -> RecipientBatch:
        nonlocal recipients, errors, blank_before, batch_bytes
        done = RecipientBatch(tuple(recipients), tuple(errors), reader.blank_rows - blank_before, reader.row_number)
        recipients, errors, blank_before, batch_bytes = [], [], reader.blank_rows, 0
        return done

    splitter = RecordSplitter(limits.max_row_bytes, csv_quotes=is_csv)
    async for record in records(chunks, splitter, strip_bom=True):
        row = reader.read(record)
        if isinstance(record, bytes) and not (is_csv and reader.row_number == 1):  # the header is in no batch
            batch_bytes += len(record)
        if row is None:
            continue
        # A CSV's variable names were judged once, in its header.
        item = row if isinstance(row, RowError) else _row(*row, limits, check_names=not is_csv)
        if isinstance(item, Recipient):
            recipients.append(item)
        else:
            errors.append(item)
        if len(recipients) + len(errors) >= batch_size or batch_bytes >= limits.max_batch_bytes:
            yield batch()
    reader.close()
    if recipients or errors or reader.blank_rows > blank_before:
        yield batch()

