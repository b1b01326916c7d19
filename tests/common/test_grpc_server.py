"""serve(): health, reflection, errors as google.rpc.Status with details, principal context, graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from esp.v1 import credits_pb2, credits_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from libs.common.auth import TrustedHeaderAuthenticator, current_principal
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.grpc_server import ServiceApp, ServiceFailed, serve
from libs.common.settings import CommonSettings
from tests.conftest import free_port
from tests.serving import served


class Balances(credits_pb2_grpc.CreditServiceServicer):
    """A tiny servicer: GetBalance echoes the caller; TopUp validates; ListTransactions is slow."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()

    async def GetBalance(self, request: Any, context: Any) -> credits_pb2.Balance:
        return credits_pb2.Balance(tenant=f"tenants/{current_principal().tenant_id}", available=7)

    async def TopUp(self, request: Any, context: Any) -> credits_pb2.Balance:
        raise InvalidArgument("amount must be positive", reason="BAD_AMOUNT", metadata={"amount": str(request.amount)},
                              field_violations=[FieldViolation("amount", "must be > 0")], retry_after_s=2)

    async def ListTransactions(self, request: Any, context: Any) -> credits_pb2.ListTransactionsResponse:
        self.slow_started.set()
        await asyncio.sleep(0.5)
        return credits_pb2.ListTransactionsResponse(next_page_token="done")

    async def ReserveCredits(self, request: Any, context: Any) -> credits_pb2.Hold:
        raise RuntimeError("boom with a secret inside")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Balances, asyncio.Event]]:
    servicer = Balances()
    app = ServiceApp(name="test", default_port=0,
                     servicers=[(credits_pb2_grpc.add_CreditServiceServicer_to_server, servicer)],
                     service_names=["esp.v1.CreditService"], authenticator=TrustedHeaderAuthenticator())
    async with served(app) as (address, stop):
        yield address, servicer, stop


async def test_health_reports_serving_for_the_server_and_each_service(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "esp.v1.CreditService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_served_services(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"esp.v1.CreditService", "grpc.health.v1.Health"} <= names


async def test_the_caller_in_metadata_becomes_the_principal(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        reply = await credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credits_pb2.GetBalanceRequest(), metadata=(("x-esp-tenant", "acme"), ("x-esp-scopes", "read")))
    assert reply.tenant == "tenants/acme"


async def test_a_domain_error_becomes_a_status_with_error_info_bad_request_and_retry_info(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await credits_pb2_grpc.CreditServiceStub(channel).TopUp(credits_pb2.TopUpRequest(amount=-5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    kinds = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                value = cls()
                detail.Unpack(value)
                kinds[cls.__name__] = value
    assert kinds["ErrorInfo"].reason == "BAD_AMOUNT" and kinds["ErrorInfo"].metadata["amount"] == "-5"
    assert kinds["BadRequest"].field_violations[0].field == "amount"
    assert kinds["RetryInfo"].retry_delay.seconds == 2


async def test_an_unexpected_exception_is_internal_without_its_message(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await credits_pb2_grpc.CreditServiceStub(channel).ReserveCredits(credits_pb2.ReserveCreditsRequest())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_a_method_not_implemented_is_unimplemented(server):
    addr, _, _ = server
    async with grpc.aio.insecure_channel(addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await credits_pb2_grpc.CreditServiceStub(channel).CommitHold(credits_pb2.CommitHoldRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_shutdown_lets_an_in_flight_call_finish(server):
    addr, servicer, stop = server
    async with grpc.aio.insecure_channel(addr) as channel:
        call = asyncio.ensure_future(credits_pb2_grpc.CreditServiceStub(channel).ListTransactions(
            credits_pb2.ListTransactionsRequest()))
        await asyncio.wait_for(servicer.slow_started.wait(), 5)
        stop.set()
        reply = await asyncio.wait_for(call, 10)
    assert reply.next_page_token == "done"


@pytest.fixture
def finished_spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded from now on (installs an SDK tracer provider if the session has none yet)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # a processor cannot be removed; a shut-down exporter drops what it is given


async def test_the_server_span_continues_the_callers_trace(server, finished_spans):
    addr, _, _ = server
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with grpc.aio.insecure_channel(addr) as channel:
        await credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credits_pb2.GetBalanceRequest(), metadata=(("x-esp-tenant", "acme"), ("x-esp-scopes", "read"),
                                                       ("traceparent", f"00-{trace_id}-{parent_id}-01")))
    spans = [s for s in finished_spans.get_finished_spans() if s.name == "/esp.v1.CreditService/GetBalance"]
    assert len(spans) == 1
    assert spans[0].kind == trace.SpanKind.SERVER
    assert f"{spans[0].context.trace_id:032x}" == trace_id
    assert spans[0].parent is not None and f"{spans[0].parent.span_id:016x}" == parent_id


async def test_a_failed_background_loop_drains_the_service_and_fails_it():
    async def consumer(stop: asyncio.Event) -> None:
        raise RuntimeError("the consumer lost its stream")

    closed = asyncio.Event()

    async def close() -> None:
        closed.set()

    app = ServiceApp(name="failing", default_port=0, tasks=[consumer], closers=[close],
                     authenticator=TrustedHeaderAuthenticator())
    with pytest.raises(ServiceFailed) as failed:
        await asyncio.wait_for(serve(app, CommonSettings(grpc_port=free_port(), shutdown_grace_s=1)), 20)
    assert isinstance(failed.value.__cause__, RuntimeError)  # the loop's own error, for the log
    assert closed.is_set()


async def test_a_call_whose_caller_gives_up_is_counted_as_cancelled_not_ok(server):
    addr, _, _ = server

    def served(code: str) -> float:
        return REGISTRY.get_sample_value("esp_grpc_requests_total", {
            "service": "test", "method": "/esp.v1.CreditService/ListTransactions", "code": code}) or 0.0

    cancelled_before, ok_before = served("CANCELLED"), served("OK")
    async with grpc.aio.insecure_channel(addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await credits_pb2_grpc.CreditServiceStub(channel).ListTransactions(
                credits_pb2.ListTransactionsRequest(), timeout=0.1)  # the handler takes 0.5 s
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # the server learns of it, cancels the handler, then counts
        if served("CANCELLED") > cancelled_before:
            break
        await asyncio.sleep(0.05)
    assert served("CANCELLED") == cancelled_before + 1
    assert served("OK") == ok_before
