"""Reading request bodies as they stream in, in bounded memory: NDJSON lines and the parts of a
``multipart/form-data`` body.

Nothing here holds a body: lines are cut by ``libs.common.byte_records`` (a line in progress is kept up to a limit,
and refused past it), and a multipart part is handed on in the pieces it arrives in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message as MimeHeaders

import grpc

from libs.common.byte_records import Oversize, RecordSplitter
from services.gateway.errors import GatewayError


async def ndjson_lines(chunks: AsyncIterator[bytes], max_line_bytes: int) -> AsyncIterator[bytes]:
    """Non-blank lines of a streamed body, each yielded as soon as it is complete. A line longer than
    ``max_line_bytes`` is refused as soon as it gets that long, so a missing newline cannot make the gateway read (or
    buffer) the whole upload."""
    splitter = RecordSplitter(max_line_bytes)
    async for chunk in chunks:
        for record in splitter.feed(chunk):
            if isinstance(record, bytes):
                if record.strip():
                    yield record
            else:
                raise _frame_too_long(max_line_bytes)
        if splitter.pending_bytes > max_line_bytes:
            raise _frame_too_long(max_line_bytes)
    last = splitter.close()
    if isinstance(last, bytes) and last.strip():
        yield last
    elif isinstance(last, Oversize):
        raise _frame_too_long(max_line_bytes)


def _frame_too_long(limit: int) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"a streamed request frame exceeds {limit} bytes")


# -- headers ---------------------------------------------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    """The lower-case ``type/subtype`` of a Content-Type value, without parameters (``""`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def header_parameter(value: str, header: str, parameter: str) -> str | None:
    """One parameter of a structured header value (quoted or not, RFC 2231 encoded or not)."""
    headers = MimeHeaders()
    headers[header] = value
    found = headers.get_param(parameter, header=header)
    if found is None:
        return None
    if isinstance(found, tuple):  # RFC 2231: (charset, language, text)
        return str(found[2])
    return str(found)


def disposition_filename(value: str | None) -> str | None:
    """The file name of a Content-Disposition value (``filename*=`` preferred over ``filename=``)."""
    if not value:
        return None
    headers = MimeHeaders()
    headers["content-disposition"] = value
    filename = headers.get_filename()
    return filename if filename else None


# -- multipart/form-data -------------------------------------------------------------------------------------------
@dataclass
class FormPart:
    """One part of a ``multipart/form-data`` body: its headers, then its bytes as they arrive (``chunks``)."""

    headers: dict[str, str]
    chunks: AsyncIterator[bytes]

    @property
    def name(self) -> str:
        """The form field name (``Content-Disposition: form-data; name=...``)."""
        return header_parameter(self.headers.get("content-disposition", ""), "content-disposition", "name") or ""

    @property
    def filename(self) -> str | None:
        """The file name when the part is a file."""
        return disposition_filename(self.headers.get("content-disposition"))

    @property
    def content_type(self) -> str:
        """The part's Content-Type as sent (``""`` when absent)."""
        return self.headers.get("content-type", "").strip()

    async def text(self, limit: int) -> str:
        """A small (non-file) part's value as text; 400 when longer than ``limit`` bytes or not UTF-8."""
        data = bytearray()
        async for piece in self.chunks:
            data += piece
            if len(data) > limit:
                raise _bad_form(f"form field {self.name!r} is longer than {limit} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad_form(f"form field {self.name!r} is not UTF-8") from exc


def _bad_form(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"multipart/form-data body: {message}")


class MultipartReader:
    """The parts of a ``multipart/form-data`` body (RFC 7578), one after the other, each part's content streamed.

    A part must be read to its end (or left: the next ``next_part`` skips what is left of it) before the next one.
    What is held at once is one body chunk and a boundary's length of look-behind.
    """

    def __init__(self, chunks: AsyncIterator[bytes], content_type: str, *, max_header_bytes: int = 16 * 1024) -> None:
        boundary = header_parameter(content_type, "content-type", "boundary")
        if not boundary or len(boundary) > 200:
            raise _bad_form("the Content-Type has no usable boundary parameter")
        self._chunks = chunks
        self._dash_boundary = b"--" + boundary.encode("latin-1", errors="replace")
        self._delimiter = b"\r\n" + self._dash_boundary
        self._max_header_bytes = max_header_bytes
        self._buffer = bytearray()
        self._eof = False
        self._state = "preamble"  # preamble → headers ⇄ body → done
        self._current: AsyncIterator[bytes] | None = None

    async def next_part(self) -> FormPart | None:
        """The next part, or None after the closing boundary."""
        if self._current is not None:
            async for _ in self._current:
                pass  # the caller left the rest of the previous part
            self._current = None
        if self._state == "preamble":
            await self._skip_preamble()
        if self._state == "done":
            return None
        headers = await self._read_headers()
        self._state = "body"
        self._current = self._body()
        return FormPart(headers, self._current)

    async def _fill(self) -> bool:
        while not self._eof:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._eof = True
            elif chunk:
                self._buffer += chunk
                return True
        return False

    async def _skip_preamble(self) -> None:
        while True:
            found = self._buffer.find(self._dash_boundary)  # a preamble, if any, is ignored
            if found >= 0:
                del self._buffer[: found + len(self._dash_boundary)]
                await self._after_boundary()
                return
            # Keep only what could still be the start of the boundary.
            keep = len(self._dash_boundary) + 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            if not await self._fill():
                raise _bad_form("no boundary line found")

    async def _after_boundary(self) -> None:
        """After a boundary: ``--`` ends the body, else (optional spaces, then) CRLF starts a part's headers."""
        while len(self._buffer) < 2 and await self._fill():
            pass
        if self._buffer[:2] == b"--":
            self._state = "done"
            return
        while True:
            newline = self._buffer.find(b"\r\n")
            if newline >= 0:
                if self._buffer[:newline].strip(b" \t"):
                    raise _bad_form("unexpected bytes after a boundary")
                del self._buffer[: newline + 2]
                self._state = "headers"
                return
            if len(self._buffer) > 256 or not await self._fill():
                raise _bad_form("a boundary line does not end")

    async def _read_headers(self) -> dict[str, str]:
        while True:
            if self._buffer.startswith(b"\r\n"):  # a part without headers
                del self._buffer[:2]
                return {}
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                break
            if len(self._buffer) > self._max_header_bytes:
                raise _bad_form(f"a part's headers exceed {self._max_header_bytes} bytes")
            if not await self._fill():
                raise _bad_form("the body ends inside a part's headers")
        headers: dict[str, str] = {}
        for line in raw.decode("utf-8", errors="replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon:
                raise _bad_form(f"malformed part header {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers

    async def _body(self) -> AsyncIterator[bytes]:
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                if found:
                    yield bytes(self._buffer[:found])
                del self._buffer[: found + len(self._delimiter)]
                await self._after_boundary()
                return
            if len(self._buffer) > keep:
                ready = len(self._buffer) - keep
                yield bytes(self._buffer[:ready])
                del self._buffer[:ready]
            if not await self._fill():
                raise _bad_form("the body ends before its closing boundary")
