"""One ``serve()`` for every gRPC service: grpc.aio, health, reflection, auth, errors, tracing, metrics, and a
graceful SIGTERM drain.

A service describes itself as a :class:`ServiceApp` (servicers, background loops, things to close) built by an
async factory; :func:`run` is its whole ``__main__``.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import trace

from libs.common.auth import Authenticator, Principal, reset_principal, set_principal
from libs.common.dependency_errors import dependency_unavailable
from libs.common.errors import EspError, Internal, InvalidArgument, Unimplemented
from libs.common.grpc_client import MAX_MESSAGE_BYTES
from libs.common.logging import configure_logging
from libs.common.metrics import GRPC_DURATION, GRPC_REQUESTS, start_metrics_server
from libs.common.priority import lower_cpu_priority
from libs.common.settings import CommonSettings, SettingsError, load_settings
from libs.common.telemetry import carries_trace_context, configure_tracing, extract_context, tracing_enabled

__all__ = [
    "BackgroundTask",
    "ServiceApp",
    "ServiceFailed",
    "StopEvent",
    "event_loop_factory",
    "run",
    "run_closers",
    "serve",
    "settle_garbage_collector",
]

log = logging.getLogger(__name__)

MAX_CONNECTION_AGE_MS = 5 * 60_000
"""How long a client connection lives before the server asks it to reconnect (see ``serve``)."""
S = TypeVar("S", bound=CommonSettings)

StopEvent = asyncio.Event
BackgroundTask = Callable[[StopEvent], Coroutine[Any, Any, None]]
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class ServiceApp:
    """Everything ``serve()`` needs to run one service."""

    name: str
    default_port: int
    servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]] = field(default_factory=list)
    """(add_XServicer_to_server, servicer) pairs."""
    service_names: list[str] = field(default_factory=list)
    """Full names of the services served, for reflection and health."""
    generic_handlers: list[grpc.GenericRpcHandler] = field(default_factory=list)
    tasks: list[BackgroundTask] = field(default_factory=list)
    """Long-running loops (consumers, sweepers); each returns once the stop event is set."""
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Called after the server stopped, in reverse order (pools, connections)."""
    authenticator: Authenticator | None = None
    server_options: list[tuple[str, Any]] = field(default_factory=list)
    """Extra grpc.aio server options (e.g. flow-control windows), after the defaults."""


class _Wrapper:
    """Auth context, domain errors → google.rpc.Status, a span and metrics around every RPC handler.

    Handlers are wrapped once, when they are registered, rather than by a grpc.aio interceptor: an interceptor runs
    a chain of coroutines and builds a new handler on every call, which at a few thousand calls a second is a
    measurable share of a core.
    """

    def __init__(self, service: str, authenticator: Authenticator | None) -> None:
        self.service = service
        self.authenticator = authenticator
        self.tracer = trace.get_tracer("esp.grpc")
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}

    def handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` wrapped (health and reflection stay open and bare)."""
        if method.startswith(_OPEN_METHODS):
            return handler
        deserializer = _decoding(handler.request_deserializer)
        # Raw-bytes handlers (no deserializer) have nothing to check.
        one = _decoded if deserializer is not None else None
        many = _decoded_stream if deserializer is not None else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary, check=one),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, check=many),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream, check=one),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, check=many),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _enter_trace(self, metadata: dict[str, str]) -> contextvars.Token[otel_context.Context] | None:
        """Make the caller's trace context current; None (nothing to undo) when no trace header came in."""
        return otel_context.attach(extract_context(metadata)) if carries_trace_context(metadata) else None

    async def _enter_principal(self, method: str, metadata: dict[str, str]) -> contextvars.Token[Principal | None]:
        principal = await self.authenticator(method, metadata) if self.authenticator else None
        return set_principal(principal)

    @staticmethod
    def _leave(principal_token: contextvars.Token[Principal | None] | None,
               otel_token: contextvars.Token[otel_context.Context] | None) -> None:
        """Undo ``_enter_principal`` and ``_enter_trace`` (either may not have happened)."""
        if principal_token is not None:
            reset_principal(principal_token)
        if otel_token is not None:
            otel_context.detach(otel_token)

    @staticmethod
    def _error_for(method: str, exc: Exception) -> EspError:
        """The domain error ``exc`` stands for: itself, UNAVAILABLE for a dependency that is down, else INTERNAL."""
        if isinstance(exc, EspError):
            return exc
        if isinstance(exc, NotImplementedError):  # the generated servicer base of a method not served here
            return Unimplemented(f"{method} is not implemented by this service")
        if (unavailable := dependency_unavailable(exc)) is not None:
            log.warning("%s: %s (%r)", method, unavailable.message, exc)
            return unavailable
        log.exception("unhandled error in %s", method)
        return Internal("internal error", reason="INTERNAL")

    async def _fail(self, context: grpc.aio.ServicerContext, error: EspError) -> None:
        """Abort the call with the Status ``error`` stands for (raises ``AbortError``)."""
        await context.abort_with_status(rpc_status.to_status(error.to_status()))

    def _record(self, method: str, started: float, code: str) -> None:
        # Label lookups hash and lock on every call; the children are cached (methods and codes are few).
        key = (method, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = GRPC_REQUESTS.labels(self.service, method, code)
        histogram = self._histograms.get(method)
        if histogram is None:
            histogram = self._histograms[method] = GRPC_DURATION.labels(self.service, method)
        counter.inc()
        histogram.observe(time.perf_counter() - started)

    def _wrap_unary(self, method: str, behavior: Callable[..., Awaitable[Any]], *,
                    check: Callable[[Any], Any] | None) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            otel_token = principal_token = None
            try:
                if check is not None:  # INVALID_ARGUMENT for a request that did not decode (see _Undecodable)
                    request = check(request)
                metadata = _string_metadata(context)
                otel_token = self._enter_trace(metadata)
                if tracing_enabled():  # the span's parent is the caller's span, attached just above
                    with self.tracer.start_as_current_span(method, kind=trace.SpanKind.SERVER):
                        principal_token = await self._enter_principal(method, metadata)
                        return await behavior(request, context)
                # Without a recording tracer a span is a no-op that still costs two context switches per call.
                principal_token = await self._enter_principal(method, metadata)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                code = "CANCELLED"
                raise
            except Exception as exc:
                error = self._error_for(method, exc)
                code = error.code.name
                await self._fail(context, error)
            finally:
                self._leave(principal_token, otel_token)
                self._record(method, started, code)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Callable[..., AsyncIterator[Any]], *,
                     check: Callable[[Any], Any] | None) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "OK"
            otel_token = principal_token = None
            try:
                if check is not None:  # INVALID_ARGUMENT for a request that did not decode (see _Undecodable)
                    request = check(request)
                metadata = _string_metadata(context)
                otel_token = self._enter_trace(metadata)
                principal_token = await self._enter_principal(method, metadata)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                error = self._error_for(method, exc)
                code = error.code.name
                await self._fail(context, error)
            finally:
                self._leave(principal_token, otel_token)
                self._record(method, started, code)

        return wrapped


@dataclass(frozen=True)
class _Undecodable:
    """What the deserializer hands the handler for request bytes that are no valid message of the method's type: the
    handler's wrapper then fails the call as INVALID_ARGUMENT. grpc would otherwise answer an exception raised while
    deserializing with UNKNOWN and the exception's class name, outside our error mapping."""

    type_name: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request body does not decode as {self.type_name}", reason="UNDECODABLE_REQUEST",
                               metadata={"type": self.type_name})


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` answering bytes it cannot decode with an :class:`_Undecodable` instead of raising (None
    stays None: a handler that takes the raw bytes, as the ingest edge's forwarders do, leaves decoding to the
    service it forwards to)."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)  # FromString is bound to the generated class
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "the method's request type"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable(type_name)

    return deserialize


def _decoded(request: Any) -> Any:
    """``request``, or INVALID_ARGUMENT when its bytes did not decode."""
    if isinstance(request, _Undecodable):
        raise request.error()
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a client stream; INVALID_ARGUMENT (raised where the handler reads) at one that did not
    decode."""
    async for request in requests:
        yield _decoded(request)


def _string_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped; each is wrapped once and then reused."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: _Wrapper) -> None:
        self.inner = inner
        self.wrapper = wrapper
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self.wrapper.handler(method, handler))
        return cached[1]


class _WrappingRegistrar:
    """Stands in for the server when generated ``add_XServicer_to_server`` functions register a servicer, so that
    every handler they register is wrapped."""

    def __init__(self, server: grpc.aio.Server, wrapper: _Wrapper) -> None:
        self.server = server
        self.wrapper = wrapper

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(h, self.wrapper) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        # Paths as the generated code's generic handler matches them: /package.Service/Method.
        wrapped = {name: self.wrapper.handler(f"/{service_name}/{name}", handler)
                   for name, handler in method_handlers.items()}
        self.server.add_registered_method_handlers(service_name, wrapped)


class ServiceFailed(RuntimeError):
    """A service stopped because one of its background loops failed."""


async def serve(app: ServiceApp, settings: CommonSettings, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (or ``stop``), then drain: health NOT_SERVING, stop background loops,
    let in-flight RPCs finish within the grace period, close resources. When a background loop failed (a consumer,
    a worker process that died), the service drains the same way and then raises :class:`ServiceFailed` (``run``
    exits with status 1), so that the orchestrator sees a failure and not a clean stop."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    wrapper = _Wrapper(app.name, app.authenticator)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # Clients re-resolve a name only when a connection closes: a bounded connection age (GOAWAY, then calls
            # in flight finish: no grace limit) lets a client dialing a headless Service find the replicas an
            # autoscaler added. gRPC jitters it by ±10 %, so a fleet's reconnects spread out.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            *app.server_options,
        ],
    )
    registrar = _WrappingRegistrar(server, wrapper)
    for add, servicer in app.servicers:
        add(servicer, registrar)
    if app.generic_handlers:
        registrar.add_generic_rpc_handlers(app.generic_handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = settings.grpc_port or app.default_port
    bound = server.add_insecure_port(f"{settings.grpc_host}:{port}")
    if bound == 0:
        raise RuntimeError(f"{app.name}: cannot bind {settings.grpc_host}:{port}")
    await server.start()
    start_metrics_server(settings.metrics_port)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(task(stop), name=f"{app.name}-task-{i}")
                                       for i, task in enumerate(app.tasks)]
    for name in ("", *app.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"port": bound, "services": app.service_names})
    if ready is not None:
        ready.set()

    stop_waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [task for task in tasks if task.done() and not task.cancelled() and task.exception() is not None]
    for task in failed:
        log.error("background task failed; stopping", exc_info=task.exception())
    stop.set()
    log.info("draining", extra={"grace_s": settings.shutdown_grace_s})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_s)
    _done, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await run_closers(app.closers)
    log.info("stopped")
    if failed:
        raise ServiceFailed(f"{app.name}: a background loop failed") from failed[0].exception()


def run(name: str, settings_cls: type[S], build: Callable[[S], Awaitable[ServiceApp]]) -> None:
    """The whole ``__main__`` of a service: settings, logging, tracing, then ``serve()``."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"esp-{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    lower_cpu_priority(settings.niceness, own_session=False)
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name, settings.otel_exporter_otlp_endpoint)

    async def main() -> None:
        app = await build(settings)
        settle_garbage_collector()
        await serve(app, settings)

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            runner.run(main())
        except ServiceFailed as exc:
            log.error("%s; exiting", exc)
            raise SystemExit(1) from exc


async def run_closers(closers: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Release what a service opened, last opened first; one failing closer does not keep the others from running."""
    for closer in reversed(closers):
        try:
            await closer()
        except Exception:
            log.exception("error while closing")


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def settle_garbage_collector() -> None:
    """Once a service is built: move everything alive into the collector's permanent generation and collect the
    young generation less often.

    Full collections walk every tracked object; with the imports, protobuf descriptors and clients of a service
    that took 30-80 ms here, a pause that lands on whatever requests are in flight (an OTP's credit hold among
    them). Frozen start-up objects are never walked again, so a full collection only sees what was allocated
    since; and a request's garbage is almost all freed by reference counting, so frequent young collections
    mostly cost CPU."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when it is installed (it is a dependency), asyncio's otherwise. Every service spends
    much of its CPU in event-loop work per call (gRPC completions, Redis, Postgres and NATS round trips), which
    uvloop does in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
