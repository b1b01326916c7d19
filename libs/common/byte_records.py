"""A byte stream cut into records — lines, or CSV records whose quoted fields may span lines — in bounded memory,
whatever the chunk boundaries.

The recipient lists of the campaigns service (an uploaded object streamed from S3), of the gateway (a REST body as it
streams in) and of the CLI (a file read in chunks), and the gateway's NDJSON frames, are all cut here.

Records are cut on bytes, before decoding: ``"``, ``,`` and ``\\n`` are ASCII, and in UTF-8 an ASCII byte never occurs
inside a multi-byte character, so a cut is exact whatever the text, and a record's invalid UTF-8 stays that record's
problem. A chunk may end anywhere: inside a quoted field, between the two quotes of ``""``, inside a ``\\r\\n``, a
multi-byte character or a byte order mark.

What is held at once is the record in progress, up to a limit: past it only its length is counted, and the record is
reported as :class:`Oversize` once it ends — a missing newline never makes a reader buffer the whole stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Oversize", "Record", "RecordSplitter", "Unterminated", "records", "split_records"]

_QUOTE = 0x22
_COMMA = 0x2C
_NEWLINE_OR_QUOTE = re.compile(b'[\n"]')
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Oversize:
    """A record longer than the limit: skipped to its end, only its length kept."""

    size: int


@dataclass(frozen=True, slots=True)
class Unterminated:
    """The stream ended inside a quoted CSV field."""


Record = bytes | Oversize | Unterminated
"""One record: its bytes without the ``\\n`` that ended it (the ``\\r`` of a CRLF stays on it), or why it has none."""


class RecordSplitter:
    """Cuts a stream of chunks into records: ``\\n`` ends one (the ``\\r`` of a CRLF stays on it); with
    ``csv_quotes``, not inside a quoted field.

    CSV quoting as Python's ``csv`` reader reads it: a quote opens a quoted field only at the start of a field (a
    quote inside an unquoted field is literal, as spreadsheets take it); inside one, ``""`` is a quote and a lone
    ``"`` closes it.
    """

    def __init__(self, max_record_bytes: int, *, csv_quotes: bool = False) -> None:
        self.max_record_bytes = max_record_bytes
        """Past this length a record is no longer kept (may be changed between records)."""
        self._csv = csv_quotes
        self._parts: list[bytes] = []  # the record in progress, from earlier chunks (dropped once over the limit)
        self._size = 0  # its length so far, counted on past the limit
        self._in_quotes = False
        self._quote_pending = False  # inside quotes, the last chunk ended on '"': a close, or the first of '""'?
        self._last_byte = -1  # the record in progress' last byte so far (-1: nothing yet)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the record in progress (not yet ended by a newline)."""
        return self._size

    def feed(self, chunk: bytes) -> list[Record]:
        """The records that ``chunk`` ends, in order."""
        out: list[Record] = []
        start = pos = 0
        end = len(chunk)
        while pos < end:
            if self._quote_pending:
                self._quote_pending = False
                if chunk[pos] == _QUOTE:
                    pos += 1  # '""' split by the chunk boundary: a quote, still inside the field
                    continue
                self._in_quotes = False  # the '"' before the boundary closed the field
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
            if self._csv:
                match = _NEWLINE_OR_QUOTE.search(chunk, pos)
                if match is None:
                    break
                hit = match.start()
                if chunk[hit] == _QUOTE:
                    previous = chunk[hit - 1] if hit > start else self._last_byte
                    self._in_quotes = previous in (-1, _COMMA)  # at the start of a field
                    pos = hit + 1
                    continue
            else:
                hit = chunk.find(b"\n", pos)
                if hit < 0:
                    break
            out.append(self._finish(chunk, start, hit))
            start = pos = hit + 1
        if start < end:
            self._keep(chunk, start, end)
        return out

    def close(self) -> Record | None:
        """The last record when the stream does not end with a newline (None when nothing is left)."""
        if self._size == 0:
            return None
        unterminated = self._in_quotes and not self._quote_pending
        record = self._finish(b"", 0, 0)
        return Unterminated() if unterminated and not isinstance(record, Oversize) else record

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        self._size += end - start
        self._last_byte = chunk[end - 1]
        if self._size <= self.max_record_bytes:
            self._parts.append(chunk[start:end])
        elif self._parts:
            self._parts.clear()  # over the limit: only its length is counted from now on

    def _finish(self, chunk: bytes, start: int, end: int) -> Record:
        size = self._size + end - start
        record: Record
        if size > self.max_record_bytes:
            record = Oversize(size)
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


class _StreamStart:
    """Drops a UTF-8 byte order mark starting a stream (when asked to), even when it is split between chunks."""

    def __init__(self, strip_bom: bool) -> None:
        self._head: bytes | None = b"" if strip_bom else None  # the first bytes, until a mark is ruled out

    def strip(self, chunk: bytes) -> bytes:
        """``chunk`` without the mark, or ``b""`` while the stream so far is too short to tell."""
        if self._head is None:
            return chunk
        head = self._head + chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._head = head
            return b""
        self._head = None
        return head.removeprefix(_BOM)

    def end(self, splitter: RecordSplitter) -> list[Record]:
        """The records left at the end of the stream (a stream shorter than a mark, starting like one, included)."""
        out = splitter.feed(self._head or b"")
        last = splitter.close()
        return out if last is None else [*out, last]


async def records(chunks: AsyncIterable[bytes], splitter: RecordSplitter, *,
                  strip_bom: bool = False) -> AsyncIterator[Record]:
    """Every record of a streamed body cut by ``splitter``, blank ones included (callers number rows), each as soon
    as the chunk that ends it has arrived; with ``strip_bom``, a UTF-8 byte order mark starting the body is dropped."""
    start = _StreamStart(strip_bom)
    async for chunk in chunks:
        for record in splitter.feed(start.strip(chunk)):
            yield record
    for record in start.end(splitter):
        yield record


def split_records(chunks: Iterable[bytes], splitter: RecordSplitter, *, strip_bom: bool = False) -> Iterator[Record]:
    """:func:`records` of chunks read synchronously (a file read in pieces)."""
    start = _StreamStart(strip_bom)
    for chunk in chunks:
        yield from splitter.feed(start.strip(chunk))
    yield from start.end(splitter)
