"""Plain request bodies for the client-streaming RPCs, beside grpc-gateway's NDJSON stream of request messages.

Common OpenAPI generators (openapi-python-client among them) skip operations whose only body is
``application/x-ndjson``, and nobody wants to base64 a file into JSON frames by hand. So two client-streaming RPCs
also take the body a client already has, read as it streams in and cut into request frames here:

- ``AddCampaignRecipients`` (:class:`RecipientListBody`): a CSV file (``text/csv``, header row: ``email``, ``name``,
  every other column a variable), JSON Lines of recipient objects (``application/jsonl``, or ``application/x-ndjson``
  whose first line is not a request frame), or either as the one file of a ``multipart/form-data`` body. Frames of at
  most 500 recipients (and about 1 MiB); the first names the campaign (the path variable, set by the transcoder).
- ``UploadAttachment`` (:class:`FileUploadBody`): the raw file (its type as ``Content-Type``, its name from the
  ``filename`` query parameter or ``Content-Disposition``) or one file in a ``multipart/form-data`` body. A metadata
  frame, then chunks of at most 1 MiB.

Nothing is judged here that the service judges: a recipient row is passed on as written (address, name, variables)
and the service validates it, as it validates a streamed recipient. A row the gateway cannot read at all (malformed
CSV or JSON, wrong column count, not UTF-8, too long) is still sent, as an empty recipient the service refuses and
counts, so no row is dropped silently; its reason is put back in the response.

Row numbers: the service numbers the recipients of a stream 1, 2, 3... in stream order, while a file's rows are
numbered as an editor shows them (the CSV header is row 1, blank lines keep their number; a CSV record whose quoted
field spans lines is one row, as ``ImportCampaignRecipients`` counts them). :class:`RowNumbers` keeps the offsets
between the two (one entry per blank-line run, not per row) and rewrites ``errors[].row`` of the response.

Each adapter is bound to its RPC by full name and checks the request and response shapes it relies on when the
descriptor set is loaded; a contract that no longer fits leaves the RPC with NDJSON only (and a warning).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from starlette.requests import Request

from libs.common.byte_records import Record, RecordSplitter, records
from libs.common.recipient_lists import MAX_ROW_BYTES
from services.gateway import json_depth
from services.gateway.body_streams import MultipartReader, disposition_filename, media_type
from services.gateway.descriptors import DescriptorSet
from services.gateway.errors import GatewayError, bad_request
from services.gateway.fields import FieldValueError, find_field, is_map, populate_query_parameters
from services.gateway.recipient_rows import Row, RowNumbers, csv_rows, jsonl_rows

logger = logging.getLogger(__name__)

FRAME_RECIPIENTS = 500
"""Recipients per AddCampaignRecipients frame cut from a plain body."""
FRAME_BYTES = 1024 * 1024
"""A frame is also sent once its recipients' text adds up to this much (rows of 64 KiB would make 32 MB frames)."""
UPLOAD_CHUNK_BYTES = 1024 * 1024
"""Bytes per UploadAttachment chunk frame (the contract's maximum)."""
MAX_FORM_FIELD_BYTES = 64 * 1024
"""The longest non-file form field of a multipart upload."""

CSV_MEDIA_TYPES = frozenset({"text/csv", "application/csv"})
JSONL_MEDIA_TYPES = frozenset({"application/jsonl", "application/x-jsonlines", "application/x-ndjson"})
MULTIPART = "multipart/form-data"
NDJSON = "application/x-ndjson"
# grpc-gateway's stream of request messages: what a body of these types (or of none) is, unless said otherwise.
_FRAME_MEDIA_TYPES = frozenset({"", "application/json", NDJSON})
# Content types that say nothing about a file: curl's default for --data-binary, and "some bytes".
_UNTYPED = frozenset({"", "application/x-www-form-urlencoded", "application/octet-stream"})
_FRAME_KEYS = frozenset({"campaign", "recipients"})

FrameParser = Callable[[AsyncIterator[bytes]], AsyncIterator[Message]]
"""The transcoder's NDJSON reading: non-blank lines → request frames (400 on a malformed one)."""


class ShapeError(ValueError):
    """The RPC's messages do not have the fields an adapter relies on."""


@dataclass
class BodyStream:
    """What the transcoder sends for one request: the frames, and how to adjust the response."""

    frames: AsyncGenerator[Message, None]
    finish: Callable[[Message], None] | None = None
    """Called on the response before it is written (rewrites row numbers)."""


class PlainBody(Protocol):
    """An alternative body for one client-streaming RPC."""

    method_name: ClassVar[str]
    query_message: Descriptor | None
    """Message whose fields the query string sets for plain bodies (documented as query parameters)."""
    query_note: str
    description: str

    def open(self, request: Request, ndjson_frames: FrameParser) -> BodyStream | None:
        """The frames of this request's body, or None when it is grpc-gateway's NDJSON (the transcoder's job)."""

    def media_types(self, frame_schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """OpenAPI ``content`` entries, the NDJSON one (``frame_schema``) first."""


def plain_bodies(descriptors: DescriptorSet, *, max_frame_bytes: int = 8 * 1024 * 1024) -> dict[str, PlainBody]:
    """The adapters that fit this descriptor set, by full method name (``max_frame_bytes``: the longest NDJSON
    line, as the transcoder reads NDJSON)."""
    found: dict[str, PlainBody] = {}
    for binding in descriptors.bindings:
        if not binding.client_streaming or binding.body != "*":
            continue
        for adapter in _ADAPTERS:
            if binding.method.full_name != adapter.method_name or binding.method.full_name in found:
                continue
            try:
                found[binding.method.full_name] = adapter(descriptors, binding.method, max_frame_bytes)
            except ShapeError as exc:
                logger.warning("%s keeps NDJSON bodies only: %s", binding.method.full_name, exc)
    return found


def _field(message: Descriptor, name: str, *, kind: str) -> FieldDescriptor:
    found = message.fields_by_name.get(name)
    if found is None:
        raise ShapeError(f"{message.full_name} has no field {name}")
    fits = {
        "string": found.type == FieldDescriptor.TYPE_STRING and not found.is_repeated,
        "int": found.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32) and not found.is_repeated,
        "message": found.message_type is not None and not found.is_repeated,
        "messages": found.message_type is not None and found.is_repeated and not is_map(found),
        "string map": is_map(found)
        and all(f.type == FieldDescriptor.TYPE_STRING for f in found.message_type.fields),
    }[kind]
    if not fits:
        raise ShapeError(f"{message.full_name}.{name} is not a {kind} field")
    return found


# -- campaign recipients ---------------------------------------------------------------------------------------------
class RecipientListBody:
    """``AddCampaignRecipients`` from a CSV or JSON Lines body (see the module docstring)."""

    method_name: ClassVar[str] = "esp.v1.CampaignService.AddCampaignRecipients"
    query_message: Descriptor | None = None
    query_note = ""
    description = (
        "Besides the NDJSON stream of request messages, the body may be the recipient list itself, read as it "
        "streams in and sent on in frames of 500 recipients:\n"
        "- `text/csv`: a header row naming an `email` column; `name` is the display name, every other column a "
        "template variable named by its header.\n"
        '- `application/jsonl` (or `application/x-ndjson` whose first line has no `recipients` or `campaign` key): one '
        'recipient a line, `{"email": ..., "name": ..., "variables": {...}}` or flat (`{"email": ..., "first_name": '
        '...}`); numbers and booleans become their JSON text, `null` leaves a variable out.\n'
        "- `multipart/form-data`: one file part holding either, told by its Content-Type or its name (`.csv`, "
        "`.jsonl`, `.ndjson`).\n"
        "Rows are validated by the service; `errors[].row` is the row of the file (in CSV the header is row 1; "
        "blank lines keep their number)."
    )

    def __init__(self, descriptors: DescriptorSet, method: MethodDescriptor, max_frame_bytes: int) -> None:
        self._max_frame_bytes = max_frame_bytes
        request = method.input_type
        recipients = _field(request, "recipients", kind="messages")
        recipient = recipients.message_type
        address = _field(recipient, "address", kind="message").message_type
        _field(address, "email", kind="string")
        _field(address, "name", kind="string")
        _field(recipient, "variables", kind="string map")
        errors = _field(method.output_type, "errors", kind="messages").message_type
        _field(errors, "row", kind="int")
        _field(errors, "reason", kind="string")
        self._request_class = descriptors.message_class(request)

    def media_types(self, frame_schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """NDJSON frames, CSV, JSON Lines and a multipart file."""
        return {
            NDJSON: {"schema": frame_schema},
            "text/csv": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "CSV with a header row: email, name, then one column per variable.",
                }
            },
            "application/jsonl": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": 'JSON Lines, one recipient a line: {"email": ..., "name": ..., "variables": '
                    "{...}}, or flat (keys other than email and name are variables).",
                }
            },
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The recipient list: CSV (text/csv, .csv) or JSON Lines "
                            "(application/jsonl, .jsonl, .ndjson).",
                        }
                    },
                    "required": ["file"],
                },
                "encoding": {"file": {"contentType": "text/csv, application/jsonl, application/x-ndjson"}},
            },
        }

    def open(self, request: Request, ndjson_frames: FrameParser) -> BodyStream | None:
        """Frames from a CSV, JSON Lines or multipart body; None for grpc-gateway's NDJSON of request messages."""
        content_type = request.headers.get("content-type", "")
        kind = media_type(content_type)
        if kind == MULTIPART:
            return self._plain(self._form_rows(MultipartReader(request.stream(), content_type)))
        if kind in CSV_MEDIA_TYPES:
            return self._plain(csv_rows(request.stream()))
        if kind in JSONL_MEDIA_TYPES:
            return self._sniffed(request.stream(), ndjson_frames)
        return None

    def _plain(self, rows: AsyncIterator[Row]) -> BodyStream:
        numbers = RowNumbers()
        return BodyStream(self._frames(rows, numbers), numbers.rewrite)

    async def _frames(self, rows: AsyncIterator[Row], numbers: RowNumbers) -> AsyncGenerator[Message, None]:
        frame = self._request_class()
        count = size = 0
        sent = False
        async for row in rows:
            numbers.add(row)
            recipient = getattr(frame, "recipients").add()  # noqa: B009 - a dynamic message class
            if not row.refusal:
                recipient.address.email = row.email
                recipient.address.name = row.name
                recipient.variables.update(row.variables)
                size += len(row.email) + len(row.name) + sum(len(k) + len(v) for k, v in row.variables.items())
            count += 1
            if count >= FRAME_RECIPIENTS or size >= FRAME_BYTES:
                yield frame
                frame, count, size, sent = self._request_class(), 0, 0, True
        if count or not sent:
            yield frame  # an empty list still names the campaign, so the service checks it

    def _sniffed(self, chunks: AsyncIterator[bytes], ndjson_frames: FrameParser) -> BodyStream:
        """JSON Lines of recipients, unless the first line is a request frame (grpc-gateway's NDJSON)."""
        numbers = RowNumbers()
        frames_mode = False

        async def frames() -> AsyncGenerator[Message, None]:
            nonlocal frames_mode
            # Read with the frame limit until the first line tells which it is; rows are held to MAX_ROW_BYTES after.
            splitter = RecordSplitter(self._max_frame_bytes)
            source = records(chunks, splitter, strip_bom=True)
            head: list[Record] = []
            async for record in source:
                head.append(record)
                if not isinstance(record, bytes) or record.strip():
                    break
            first = head[-1] if head else b""
            frames_mode = isinstance(first, bytes) and _is_frame(first)
            if frames_mode:
                async for frame in ndjson_frames(_frame_lines(head, source, self._max_frame_bytes)):
                    yield frame
                return
            splitter.max_record_bytes = MAX_ROW_BYTES
            async for frame in self._frames(jsonl_rows(_chain(head, source)), numbers):
                yield frame

        def finish(response: Message) -> None:
            if not frames_mode:
                numbers.rewrite(response)

        return BodyStream(frames(), finish)

    async def _form_rows(self, reader: MultipartReader) -> AsyncIterator[Row]:
        part = await reader.next_part()
        if part is None:
            raise bad_request("the form has no file part", [("file", "one CSV or JSON Lines file is required")])
        kind = media_type(part.content_type)
        filename = (part.filename or "").lower()
        if kind in CSV_MEDIA_TYPES or (kind not in JSONL_MEDIA_TYPES and filename.endswith(".csv")):
            rows = csv_rows(part.chunks)
        elif kind in JSONL_MEDIA_TYPES or filename.endswith((".jsonl", ".ndjson")):
            rows = jsonl_rows(records(part.chunks, RecordSplitter(MAX_ROW_BYTES), strip_bom=True))
        else:
            raise bad_request(
                "cannot tell the recipient list's format",
                [("file", "send it as text/csv or application/jsonl, or name it .csv, .jsonl or .ndjson")],
            )
        async for row in rows:
            yield row
        if await reader.next_part() is not None:
            raise bad_request("the form has more than one part", [("file", "one file part only")])


def _is_frame(line: bytes) -> bool:
    try:
        value = json_depth.loads(line)
    except (UnicodeDecodeError, ValueError):  # JsonTooDeep too: not a frame, and the rows' reader refuses it
        return False
    return isinstance(value, dict) and bool(_FRAME_KEYS & value.keys())


async def _chain(head: Sequence[Record], rest: AsyncIterator[Record]) -> AsyncIterator[Record]:
    for record in head:
        yield record
    async for record in rest:
        yield record


async def _frame_lines(head: Sequence[Record], rest: AsyncIterator[Record], limit: int) -> AsyncIterator[bytes]:
    async for record in _chain(head, rest):
        if not isinstance(record, bytes):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"a streamed request frame exceeds {limit} bytes")
        if record.strip():
            yield record


# -- attachment uploads ----------------------------------------------------------------------------------------------
class FileUploadBody:
    """``UploadAttachment`` from the raw file or a one-file ``multipart/form-data`` body (see the module docstring)."""

    method_name: ClassVar[str] = "esp.v1.AttachmentService.UploadAttachment"
    query_note = "Raw and multipart bodies only (an NDJSON body carries its metadata in its first line)."
    description = (
        "Besides the NDJSON stream of request messages, the body may be the file itself:\n"
        "- raw (`application/octet-stream` or the file's own type): the `Content-Type` is the attachment's type "
        "(left to be guessed from the file name when `application/octet-stream` or absent); the name comes from "
        "the `filename` query parameter or a `Content-Disposition` header. A body of type `application/json` or "
        "`application/x-ndjson`, or of none, is read as NDJSON unless a file name is given.\n"
        "- `multipart/form-data`: one file part (its file name and Content-Type are the attachment's); text fields "
        "before it may set metadata (`sha256`, `requestId`...).\n"
        "Query parameters set the metadata of both and win over what the headers say. The file is streamed on in "
        "chunks of 1 MiB."
    )

    def __init__(self, descriptors: DescriptorSet, method: MethodDescriptor, max_frame_bytes: int) -> None:
        request = method.input_type
        oneofs = [o for o in request.oneofs if len(o.fields) == 2]
        for oneof in oneofs:
            messages = [f for f in oneof.fields if f.message_type is not None]
            chunks = [f for f in oneof.fields if f.type == FieldDescriptor.TYPE_BYTES]
            if len(messages) == 1 and len(chunks) == 1:
                self._metadata_field, self._chunk_field = messages[0].name, chunks[0].name
                break
        else:
            raise ShapeError(f"{request.full_name} has no oneof of a metadata message and a bytes chunk")
        metadata = request.fields_by_name[self._metadata_field].message_type
        _field(metadata, "filename", kind="string")
        _field(metadata, "content_type", kind="string")
        self.query_message: Descriptor | None = metadata
        self._request_class = descriptors.message_class(request)

    def media_types(self, frame_schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """NDJSON frames, the raw file and a multipart file."""
        return {
            NDJSON: {"schema": frame_schema},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "description": "The file (or any other type)."}
            },
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary", "description": "The file."}},
                    "required": ["file"],
                }
            },
        }

    def open(self, request: Request, ndjson_frames: FrameParser) -> BodyStream | None:
        """Frames from a raw or multipart body; None for grpc-gateway's NDJSON of request messages."""
        content_type = request.headers.get("content-type", "").strip()
        kind = media_type(content_type)
        query = request.query_params.multi_items()
        if kind == MULTIPART:
            return BodyStream(self._form_frames(MultipartReader(request.stream(), content_type), query))
        filename = disposition_filename(request.headers.get("content-disposition"))
        named = filename is not None or any(self._names(key, "filename") for key, _ in query)
        if kind in _FRAME_MEDIA_TYPES and not named:
            return None
        return BodyStream(self._raw_frames(request.stream(), filename, content_type, query))

    def _names(self, key: str, field_name: str) -> bool:
        assert self.query_message is not None
        found = find_field(self.query_message, key)
        return found is not None and found.name == field_name

    def _metadata_frame(
        self,
        filename: str | None,
        content_type: str,
        fields: Sequence[tuple[str, str]],
        query: Sequence[tuple[str, str]],
    ) -> Message:
        frame = self._request_class()
        metadata = getattr(frame, self._metadata_field)
        metadata.SetInParent()
        if filename:
            metadata.filename = filename
        if media_type(content_type) not in _UNTYPED:
            metadata.content_type = content_type
        try:
            populate_query_parameters(metadata, fields, ())
            populate_query_parameters(metadata, query, ())
        except FieldValueError as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return frame

    async def _chunk_frames(self, pieces: AsyncIterator[bytes]) -> AsyncGenerator[Message, None]:
        buffer = bytearray()
        async for piece in pieces:
            buffer += piece
            while len(buffer) >= UPLOAD_CHUNK_BYTES:
                yield self._request_class(**{self._chunk_field: bytes(buffer[:UPLOAD_CHUNK_BYTES])})
                del buffer[:UPLOAD_CHUNK_BYTES]
        if buffer:
            yield self._request_class(**{self._chunk_field: bytes(buffer)})

    async def _raw_frames(
        self, chunks: AsyncIterator[bytes], filename: str | None, content_type: str, query: Sequence[tuple[str, str]]
    ) -> AsyncGenerator[Message, None]:
        yield self._metadata_frame(filename, content_type, (), query)
        async for frame in self._chunk_frames(chunks):
            yield frame

    async def _form_frames(
        self, reader: MultipartReader, query: Sequence[tuple[str, str]]
    ) -> AsyncGenerator[Message, None]:
        assert self.query_message is not None
        fields: list[tuple[str, str]] = []
        uploaded = False
        while (part := await reader.next_part()) is not None:
            if part.filename is None and part.name != "file":
                if uploaded:
                    raise bad_request("form fields must come before the file", [(part.name, "before the file")])
                if find_field(self.query_message, part.name) is None:
                    raise bad_request(f"unknown form field {part.name!r}", [(part.name, "not a metadata field")])
                fields.append((part.name, await part.text(MAX_FORM_FIELD_BYTES)))
                continue
            if uploaded:
                raise bad_request("the form has more than one file", [(part.name, "one file part only")])
            uploaded = True
            yield self._metadata_frame(part.filename, part.content_type, fields, query)
            async for frame in self._chunk_frames(part.chunks):
                yield frame
        if not uploaded:
            raise bad_request("the form has no file part", [("file", "required")])


_ADAPTERS: tuple[Any, ...] = (RecipientListBody, FileUploadBody)
