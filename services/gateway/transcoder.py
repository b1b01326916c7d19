"""HTTP/JSON ↔ gRPC transcoding driven by the `google.api.http` annotations of a descriptor set.

Behaviour follows grpc-gateway v2 (so Envoy's ``grpc_json_transcoder`` could take its place):

- matching: the request's binding is found by ``binding_matcher`` (404 / 405 as grpc-gateway answers). Only the
  RPCs the public edge serves are routed (``served_by_the_edge``): a mesh-internal RPC the contracts annotate (a
  credit hold) is a 404 like any unknown path, not a 501 from the edge;
- request: body (``*`` or one field) parsed as proto3 JSON (camelCase or proto names, unknown fields
  ignored), then for PATCH with a ``body`` field and an empty ``update_mask`` the mask is derived from the
  body, then path variables, then query parameters (never for ``body: "*"``);
- client-streaming RPCs take a newline-delimited JSON stream of request messages, forwarded frame by frame as
  the bytes arrive; path variables go into the first frame. Two of them also take a plain body (a CSV or JSON Lines
  recipient list, a raw or multipart file), cut into frames as it streams in by ``plain_bodies``;
- response: proto3 JSON (camelCase, int64 as strings, enum names), unpopulated fields omitted by default;
  upstream header metadata comes back as ``Grpc-Metadata-<key>`` headers; of the request headers only
  credentials, ``X-Request-Id`` and trace context go upstream (see ``_outgoing_metadata``);
- server-streaming RPCs whose response is ``google.api.HttpBody`` (CSV exports) are streamed as grpc-gateway
  streams HttpBody: Content-Type from the first message, each message's ``data`` written as it arrives (chunked,
  never buffered whole). An upstream error before the first message is the usual Status JSON; after it, bytes
  have been sent with a 200, so the response is cut off without its terminating chunk (the client sees an
  incomplete body, never a clean end). Other server-streaming RPCs are not served;
- errors: ``google.rpc.Status`` JSON with details from ``grpc-status-details-bin``, HTTP status per
  ``HTTPStatusFromCode``; ``Retry-After`` from ``RetryInfo`` on 429/503; ``WWW-Authenticate`` on 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from libs.common.grpc_client import balancing_options
from libs.common.public_edge import fronts_service, serves_method
from libs.common.telemetry import TRACE_HEADERS, extract_context, inject_headers, tracing_enabled
from services.gateway import json_depth
from services.gateway.binding_matcher import BindingMatcher
from services.gateway.body_streams import ndjson_lines
from services.gateway.descriptors import DescriptorSet, HttpBinding
from services.gateway.errors import GatewayError, StatusMarshaler, retry_after_seconds
from services.gateway.fields import (
    FieldValueError,
    field_mask_from_body,
    populate_query_parameters,
    set_path_variable,
)
from services.gateway.plain_bodies import BodyStream, PlainBody, plain_bodies

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("esp.gateway")

JSON_MEDIA_TYPE = "application/json"
HTTP_BODY_TYPE = "google.api.HttpBody"
_GRPC_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Request headers forwarded to the upstream as metadata of the same (lower-case) name.
_FORWARDED_HEADERS = ("authorization", "x-api-key", "traceparent", "tracestate", "baggage")


@dataclass(frozen=True)
class TranscoderOptions:
    """How the transcoder talks to its upstream and its clients."""

    default_timeout_s: float = 30.0
    """Deadline (sent as ``grpc-timeout``) of unary calls when the client sends no ``Grpc-Timeout`` header."""
    stream_timeout_s: float = 900.0
    """Deadline for streaming calls (uploads of up to 150 MB over slow links, CSV exports of any size)."""
    emit_unpopulated: bool = False
    """Write fields holding default values (grpc-gateway's ``EmitUnpopulated``)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest unary request body; larger ones are refused with 413 before reaching the upstream."""
    max_frame_bytes: int = 8 * 1024 * 1024
    """Largest single NDJSON frame of a streamed request (a 1 MiB chunk is ~1.4 MB as base64 JSON)."""
    max_receive_message_bytes: int = 64 * 1024 * 1024
    """Largest upstream response message accepted."""


class Transcoder:
    """An ASGI application that serves every HTTP binding of a descriptor set by calling one gRPC upstream."""

    def __init__(
        self,
        descriptors: DescriptorSet,
        upstream_addr: str,
        options: TranscoderOptions | None = None,
        *,
        served: Callable[[MethodDescriptor], bool] | None = None,
    ) -> None:
        """``served`` says which RPCs the upstream answers (the others get no route); by default the public
        edge's (``served_by_the_edge``)."""
        self.descriptors = descriptors
        self.upstream_addr = upstream_addr
        self.options = options or TranscoderOptions()
        is_served = served if served is not None else served_by_the_edge(descriptors)
        served_bindings: list[HttpBinding] = []
        for binding in descriptors.bindings:
            if not is_served(binding.method):
                continue  # mesh-internal: the edge would answer UNIMPLEMENTED, so the path is unknown here
            if binding.server_streaming and not serves_streamed_body(binding):
                # grpc-gateway streams these as {"result": ...} lines; nothing in our contracts needs it yet.
                logger.warning("not serving server-streaming RPC %s over HTTP", binding.method.full_name)
                continue
            served_bindings.append(binding)
        self.bindings: tuple[HttpBinding, ...] = tuple(served_bindings)
        self.matcher = BindingMatcher(served_bindings)
        self.plain_bodies: dict[str, PlainBody] = plain_bodies(
            descriptors, max_frame_bytes=self.options.max_frame_bytes
        )
        """Alternative bodies of client-streaming RPCs, by full method name."""
        self._status_marshaler = StatusMarshaler(
            descriptors.pool, emit_unpopulated=self.options.emit_unpopulated
        )
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (HTTP only)."""
        if scope["type"] != "http":
            return
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def aclose(self) -> None:
        """Close the upstream channel (a later request opens a new one)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def channel(self) -> grpc.aio.Channel:
        """The upstream channel, opened on first use so it binds to the serving event loop."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.upstream_addr,
                options=[("grpc.max_receive_message_length", self.options.max_receive_message_bytes),
                         *balancing_options(self.upstream_addr)],
            )
        return self._channel

    async def handle(self, request: Request) -> Response:
        """Answer one HTTP request: route it, call the upstream, write JSON (or a Status error). With tracing on,
        in a server span under the trace context the request carries (or a new trace), which the upstream call
        carries on."""
        if not tracing_enabled():
            return await self._handle(request)
        # Named after the method alone until the route is known (``_handle``): a span name holds no resource ids.
        with _tracer.start_as_current_span(request.method, kind=SpanKind.SERVER,
                                           context=extract_context(request.headers),
                                           attributes={"http.request.method": request.method,
                                                       "url.path": request.url.path}) as span:
            response = await self._handle(request)
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    async def _handle(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            binding, variables = self.matcher.match(request.method, _raw_path(request))
            route = binding.template.source
            span = trace.get_current_span()  # the request's (a no-op one when tracing is off)
            span.update_name(f"{request.method} {route}")
            span.set_attribute("http.route", route)
            metadata = _outgoing_metadata(request, request_id)
            if binding.server_streaming:
                message = self.build_request(
                    binding, variables, request.query_params.multi_items(), await self._read_body(request)
                )
                return await self._call_server_streaming(request, request_id, binding, message, metadata)
            if binding.client_streaming:
                response, header_metadata = await self._call_client_streaming(
                    request, binding, variables, metadata
                )
            else:
                message = self.build_request(
                    binding, variables, request.query_params.multi_items(), await self._read_body(request)
                )
                response, header_metadata = await self._call_unary(request, binding, message, metadata)
        except GatewayError as error:
            return self.error_response(error, request_id)
        except ClientDisconnect:
            # Nobody is left to answer; the upstream call was cancelled where the disconnect was seen.
            return self.error_response(
                GatewayError(grpc.StatusCode.CANCELLED, "client disconnected"), request_id
            )
        except Exception:
            logger.exception("gateway failure on %s %s", request.method, request.url.path)
            return self.error_response(
                GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error"), request_id
            )
        headers = {"x-request-id": request_id, **_response_headers(header_metadata)}
        return Response(self.marshal_response(binding, response), headers=headers, media_type=JSON_MEDIA_TYPE)

    def build_request(
        self, binding: HttpBinding, variables: dict[str, str], query: Iterable[tuple[str, str]], body: bytes
    ) -> Message:
        """The request message of a unary call: body, path variables and query, in grpc-gateway's order."""
        request_type = binding.method.input_type
        message = self.descriptors.message_class(request_type)()
        body_json: Any = None
        if binding.body:
            body_json = _decode_json(body)
            if body_json is not None:
                if binding.body == "*":
                    self._parse_into(message, body_json)
                else:
                    body_field = request_type.fields_by_name[binding.body]
                    self._parse_into(message, {body_field.json_name: body_json})
                    self._derive_update_mask(binding, message, body_field, body_json)
        self._apply_variables(message, variables)
        if binding.body != "*":
            excluded = [variable.field_path for variable in binding.template.variables]
            if binding.body:
                excluded.append((binding.body,))
            try:
                populate_query_parameters(message, query, excluded)
            except FieldValueError as exc:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return message

    def marshal_response(self, binding: HttpBinding, response: Message) -> bytes:
        """The response body: the whole message, or its ``response_body`` field."""
        if not binding.response_body:
            return _dump(self._to_dict(response))
        field = response.DESCRIPTOR.fields_by_name[binding.response_body]
        if field.message_type is not None and not field.is_repeated:
            return _dump(self._to_dict(getattr(response, field.name)))
        whole = json_format.MessageToDict(
            response, always_print_fields_with_no_presence=True, descriptor_pool=self.descriptors.pool
        )
        return _dump(whole.get(field.json_name))

    def error_response(self, error: GatewayError, request_id: str) -> Response:
        """A Status JSON error response with grpc-gateway's status mapping and headers."""
        headers = {"x-request-id": request_id, **error.headers}
        if error.code is grpc.StatusCode.UNAUTHENTICATED:
            # grpc-gateway sets the challenge header to the status message on every 401.
            headers["www-authenticate"] = _header_safe(error.message)
        if error.status in (429, 503):
            delay = retry_after_seconds(error)
            if delay is not None:
                headers["retry-after"] = str(delay)
        return Response(
            _dump(self._status_marshaler.to_dict(error)),
            status_code=error.status,
            headers=headers,
            media_type=JSON_MEDIA_TYPE,
        )

    async def _call_unary(
        self, request: Request, binding: HttpBinding, message: Message, metadata: list[tuple[str, str]]
    ) -> tuple[Message, Sequence[tuple[str, Any]]]:
        response_type = self.descriptors.message_class(binding.method.output_type)
        call = self.channel().unary_unary(
            binding.grpc_path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )(message, metadata=metadata, timeout=_timeout(request, self.options.default_timeout_s))
        try:
            response = await call
            return response, tuple(await call.initial_metadata() or ())
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error(exc) from exc

    async def _call_server_streaming(
        self,
        request: Request,
        request_id: str,
        binding: HttpBinding,
        message: Message,
        metadata: list[tuple[str, str]],
    ) -> Response:
        """Start a server-streaming HttpBody call and answer with its first message's content type, once that
        message is in: until then any failure is still a proper Status response."""
        response_type = self.descriptors.message_class(binding.method.output_type)
        call = self.channel().unary_stream(
            binding.grpc_path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )(message, metadata=metadata, timeout=_timeout(request, self.options.stream_timeout_s))
        try:
            first = await call.read()
            header_metadata = tuple(await call.initial_metadata() or ())
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error(exc) from exc
        except BaseException:
            call.cancel()
            raise
        headers = {"x-request-id": request_id, **_response_headers(header_metadata)}
        disposition = _content_disposition(header_metadata)
        if disposition:
            headers["content-disposition"] = disposition
        if first is grpc.aio.EOF:
            # No message at all: an empty 200 (grpc-gateway writes no Content-Type either, knowing none).
            return Response(b"", headers=headers)
        return StreamedBody(call, first, headers, binding.method.full_name)

    async def _call_client_streaming(
        self,
        request: Request,
        binding: HttpBinding,
        variables: dict[str, str],
        metadata: list[tuple[str, str]],
    ) -> tuple[Message, Sequence[tuple[str, Any]]]:
        request_type = self.descriptors.message_class(binding.method.input_type)
        response_type = self.descriptors.message_class(binding.method.output_type)

        async def ndjson_frames(lines: AsyncIterator[bytes]) -> AsyncGenerator[Message, None]:
            async for line in lines:
                frame = request_type()
                self._parse_into(frame, _decode_json(line))
                yield frame

        plain = self.plain_bodies.get(binding.method.full_name)
        body: BodyStream | None = plain.open(request, ndjson_frames) if plain is not None else None
        if body is None:
            body = BodyStream(ndjson_frames(ndjson_lines(request.stream(), self.options.max_frame_bytes)))
        call = self.channel().stream_unary(
            binding.grpc_path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )(metadata=metadata, timeout=_timeout(request, self.options.stream_timeout_s))
        first = True
        try:
            async for frame in body.frames:
                if first:
                    self._apply_variables(frame, variables)
                    first = False
                await call.write(frame)
            await call.done_writing()
        except grpc.aio.AioRpcError:
            pass  # the upstream ended the call early; its status is read below
        except (GatewayError, ClientDisconnect):
            call.cancel()
            raise
        finally:
            await body.frames.aclose()
        try:
            response = await call
            metadata_back = tuple(await call.initial_metadata() or ())
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error(exc) from exc
        if body.finish is not None:
            body.finish(response)
        return response, metadata_back

    async def _read_body(self, request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.options.max_body_bytes:
                raise GatewayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request body exceeds {self.options.max_body_bytes} bytes",
                    http_status=413,
                )
        return bytes(body)

    def _parse_into(self, message: Message, value: Any) -> None:
        if value is None:
            return
        try:
            json_format.ParseDict(
                value, message, ignore_unknown_fields=True, descriptor_pool=self.descriptors.pool
            )
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

    def _apply_variables(self, message: Message, variables: dict[str, str]) -> None:
        try:
            for dotted, value in variables.items():
                set_path_variable(message, dotted, value)
        except FieldValueError as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

    @staticmethod
    def _derive_update_mask(
        binding: HttpBinding, message: Message, body_field: FieldDescriptor, body_json: Any
    ) -> None:
        if binding.http_method != "PATCH" or body_field.message_type is None:
            return
        mask_field = message.DESCRIPTOR.fields_by_name.get("update_mask")
        if mask_field is None or mask_field.message_type is None:
            return
        if mask_field.message_type.full_name != "google.protobuf.FieldMask":
            return
        mask = message.update_mask  # dynamic message class
        if not mask.paths:
            mask.paths.extend(field_mask_from_body(body_json, body_field.message_type))

    def _to_dict(self, message: Message) -> Any:
        return json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=self.options.emit_unpopulated,
            descriptor_pool=self.descriptors.pool,
        )


def served_by_the_edge(descriptors: DescriptorSet) -> Callable[[MethodDescriptor], bool]:
    """Whether the public edge (ingest) answers an RPC of ``descriptors``: the methods its table lists, when the
    set has any service the edge fronts; every method otherwise (a descriptor set that is not our contracts)."""
    if not any(fronts_service(method.containing_service.full_name) for method in descriptors.annotated_methods):
        return lambda _method: True
    return lambda method: serves_method(method.containing_service.full_name, method.name)


def serves_streamed_body(binding: HttpBinding) -> bool:
    """Whether a server-streaming binding is served: its response is ``google.api.HttpBody`` (whose bytes make
    the HTTP body) and its request is not a stream (bidirectional streams are not served)."""
    return (
        binding.server_streaming
        and not binding.client_streaming
        and binding.method.output_type.full_name == HTTP_BODY_TYPE
    )


class UpstreamStreamBroken(Exception):
    """The upstream failed after part of a streamed body was sent: raised out of the ASGI app so the server
    closes the connection without the terminating chunk, which is how HTTP/1.1 says "incomplete"."""


class StreamedBody(Response):
    """The HTTP response of a server-streaming HttpBody call: each message's ``data`` written as it arrives.

    Not Starlette's ``StreamingResponse``: that one (ASGI spec < 2.4, as uvicorn speaks) cancels the sending task
    on a disconnect without closing the upstream call deterministically, and ends the body cleanly whatever the
    iterator raised. Here a disconnect cancels the gRPC call at once, ``send`` awaits the server's flow control
    (so a slow client slows the upstream instead of filling memory), and an upstream error ends the connection
    without a final chunk.
    """

    def __init__(self, call: Any, first: Message, headers: dict[str, str], method: str) -> None:
        super().__init__(status_code=200, headers=headers)
        # The length is not known (Starlette would say 0 for the empty initial body); the content type is the
        # upstream's, verbatim (Starlette would append a charset to a text/* type).
        self.raw_headers = [
            (key, value) for key, value in self.raw_headers if key not in (b"content-length", b"content-type")
        ]
        content_type = str(getattr(first, "content_type", ""))
        if content_type and _metadata_value_ok(content_type):
            self.raw_headers.append((b"content-type", content_type.encode("latin-1")))
        self._call = call
        self._first = first
        self._method = method

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the head and the first message's bytes, then each message's until the stream ends."""
        disconnected = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            self._call.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        sent = 0
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            message: Any = self._first
            while message is not grpc.aio.EOF:
                data = bytes(getattr(message, "data", b""))
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    sent += len(data)
                message = await self._call.read()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except grpc.aio.AioRpcError as exc:
            if disconnected.is_set():
                logger.info("client left %s after %d bytes", self._method, sent)
                return
            logger.error(
                "upstream %s failed after %d bytes were sent (%s: %s): cutting the response off",
                self._method, sent, exc.code().name, exc.details(),
            )
            raise UpstreamStreamBroken(f"{self._method}: {exc.code().name}: {exc.details()}") from exc
        except asyncio.CancelledError:
            if disconnected.is_set():
                # call.read() raises CancelledError once the watcher cancelled the call: the client is gone.
                logger.info("client left %s after %d bytes", self._method, sent)
                return
            raise
        finally:
            watcher.cancel()
            self._call.cancel()


def _content_disposition(metadata: Sequence[tuple[str, Any]]) -> str:
    """The ``content-disposition`` header metadata an upstream sets on a download (safe to repeat as a header)."""
    for key, value in metadata:
        if key == "content-disposition" and isinstance(value, str) and _metadata_value_ok(value):
            return value
    return ""


def _serialize(message: Message) -> bytes:
    serialized: bytes = message.SerializeToString()
    return serialized


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _decode_json(data: bytes) -> Any:
    """The JSON value of a body; None for an empty body (grpc-gateway treats EOF as an empty message)."""
    if not data.strip():
        return None
    try:
        return json_depth.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, json_depth.JsonTooDeep) as exc:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JSON body: {exc}") from exc


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    if raw:
        return bytes(raw).split(b"?", 1)[0].decode("utf-8", errors="replace")
    return quote(request.scope["path"], safe="/:@!$&'()*+,;=-._~")


def _timeout(request: Request, default_s: float) -> float:
    header = request.headers.get("grpc-timeout", "")
    parsed = _GRPC_TIMEOUT.match(header)
    if parsed is None:
        return default_s
    return int(parsed[1]) * _TIMEOUT_UNIT_SECONDS[parsed[2]]


def _outgoing_metadata(request: Request, request_id: str) -> list[tuple[str, str]]:
    """gRPC metadata for the upstream call: credentials, request id and trace context, plus the X-Forwarded-*
    pair grpc-gateway adds.

    Unlike grpc-gateway, arbitrary ``Grpc-Metadata-*`` headers are not passed through: services behind the
    edge trust ``x-esp-*`` metadata, and a public client must never be able to set it.
    """
    metadata: list[tuple[str, str]] = [("x-request-id", request_id)]
    traced = tracing_enabled()
    for name in _FORWARDED_HEADERS:
        if traced and name in TRACE_HEADERS:
            continue  # the gateway's own span is the upstream's parent (below)
        for value in request.headers.getlist(name):
            if _metadata_value_ok(value):
                metadata.append((name, value))
    if traced:
        metadata.extend(inject_headers({}).items())
    client_host = request.client.host if request.client else ""
    forwarded_for = ", ".join(
        part for part in (request.headers.get("x-forwarded-for", ""), client_host) if part
    )
    if forwarded_for and _metadata_value_ok(forwarded_for):
        metadata.append(("x-forwarded-for", forwarded_for))
    host = request.headers.get("host", "")
    if host and _metadata_value_ok(host):
        metadata.append(("x-forwarded-host", host))
    return metadata


def _metadata_value_ok(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _response_headers(metadata: Sequence[tuple[str, Any]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in metadata:
        if isinstance(value, str) and not key.endswith("-bin") and _metadata_value_ok(value):
            headers[f"grpc-metadata-{key}"] = value
    return headers


def _upstream_error(error: grpc.aio.AioRpcError) -> GatewayError:
    status = GatewayError.from_rpc_error(error)
    status.headers = _response_headers(tuple(error.initial_metadata() or ()))
    return status


def _header_safe(text: str) -> str:
    return text.encode("ascii", errors="replace").decode("ascii").replace("\r", " ").replace("\n", " ")
