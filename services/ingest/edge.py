"""The public edge: API-key authentication, per-method scopes, and forwarding of the RPCs other services own.

Customers talk to one endpoint. Ingest answers the sending RPCs itself and forwards reads (reports), credits
(ledger) and provider administration (router) as raw bytes, adding the authenticated caller as metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from libs.common.auth import Principal, current_principal
from libs.common.errors import Unauthenticated
from libs.common.grpc_client import to_domain_error
from libs.common.public_edge import EdgeMethod
from libs.common.telemetry import inject_headers
from services.ingest.tenants import TenantStore


class ApiKeyAuthenticator:
    """``authorization: Bearer <key>`` (or ``x-api-key``) → the key's principal."""

    def __init__(self, tenants: TenantStore) -> None:
        self.tenants = tenants

    async def __call__(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        """The principal of the presented API key or admin token; UNAUTHENTICATED when none is presented or it is
        malformed, unknown or revoked, PERMISSION_DENIED when its tenant is disabled."""
        presented = metadata.get("x-api-key", "")
        auth = metadata.get("authorization", "")
        if auth.lower().startswith("bearer "):
            presented = auth[7:].strip()
        if not presented:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'",
                                  reason="MISSING_CREDENTIALS")
        return await self.tenants.authenticate(presented)


_PASSED_ON_METADATA = frozenset({"content-disposition"})
"""Initial metadata of a streamed answer that the edge passes on to the client."""


def _forwarder(method_path: str, method_spec: EdgeMethod, channel: grpc.aio.Channel, timeout_s: float,
               method: MethodDescriptor) -> grpc.RpcMethodHandler:
    def upstream_call(context: grpc.aio.ServicerContext) -> tuple[list[tuple[str, str]], float | None]:
        principal = current_principal()
        principal.require(method_spec.scope)
        metadata = list(principal.as_metadata())
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                metadata.append((key, value))
        metadata.extend(inject_headers({}).items())
        remaining = context.time_remaining()
        # A streaming call (an attachment, a million recipients, an export) lasts as long as its stream: the client's
        # own deadline bounds it, not the upstream timeout meant for a unary call.
        if method.client_streaming or method.server_streaming or method_spec.lasts_as_its_work:
            return metadata, remaining
        return metadata, (min(timeout_s, remaining) if remaining else timeout_s)

    if method.server_streaming:
        stream_call = channel.unary_stream(method_path)

        async def forward_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            metadata, timeout = upstream_call(context)
            try:
                call = stream_call(request, metadata=metadata, timeout=timeout)
                # What the upstream says before its first message (a download's content-disposition) goes on.
                passed_on = [(k, v) for k, v in (await call.initial_metadata() or ()) if k in _PASSED_ON_METADATA]
                if passed_on:
                    await context.send_initial_metadata(passed_on)
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise to_domain_error(exc) from exc

        return grpc.unary_stream_rpc_method_handler(forward_stream)

    call: Any = channel.stream_unary(method_path) if method.client_streaming else channel.unary_unary(method_path)

    async def forward(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        metadata, timeout = upstream_call(context)
        try:
            response: bytes = await call(request, metadata=metadata, timeout=timeout)
            return response
        except grpc.aio.AioRpcError as exc:
            raise to_domain_error(exc) from exc

    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(forward)
    return grpc.unary_unary_rpc_method_handler(forward)


def _local(method: MethodDescriptor, method_spec: EdgeMethod, impl: Any, message_classes: Mapping[str, Any]) -> Any:
    request_cls = message_classes[method.input_type.full_name]
    response_cls = message_classes[method.output_type.full_name]

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        current_principal().require(method_spec.scope)
        return await impl(request, context)

    factory = grpc.stream_unary_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
    return factory(guarded, request_deserializer=request_cls.FromString,
                   response_serializer=response_cls.SerializeToString)


def build_handler(service: ServiceDescriptor, methods: Mapping[str, EdgeMethod], local: object,
                  channels: Mapping[str, grpc.aio.Channel], message_classes: Mapping[str, Any],
                  timeout_s: float) -> grpc.GenericRpcHandler:
    """One generic handler for ``service``: each public method is answered by ``local`` or forwarded to the
    service that owns it."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        method_spec = methods.get(method.name)
        if method_spec is None:
            continue  # not exposed at the edge: the client gets UNIMPLEMENTED
        if method_spec.owner is None:
            handlers[method.name] = _local(method, method_spec, getattr(local, method.name), message_classes)
        else:
            path = f"/{service.full_name}/{method.name}"
            handlers[method.name] = _forwarder(path, method_spec, channels[method_spec.owner], timeout_s, method)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
