"""One email, one trace: the spans every process of a mesh exports over OTLP, collected by a local receiver, join
up from the gateway's request to the provider's HTTP call, to the reports and ledger consumers and to the webhook
that tells the customer."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import httpx
import pytest

from dev import mesh as m
from tests.campaigns.conftest import CampaignMesh, start_campaign_mesh, wait_until
from tests.conftest import S3Server
from tests.monitoring.otlp_receiver import ReceivedSpan, TraceReceiver, running_receiver
from tests.webhooks.receiver import Receiver
from tests.webhooks.test_delivery import create_endpoint

SERVER, CLIENT, CONSUMER = 2, 3, 5
"""``opentelemetry.proto.trace.v1.Span.SpanKind`` values."""


@pytest.fixture(scope="module")
def traced_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CampaignMesh, TraceReceiver]]:
    namespace = f"{run_id}tr{secrets.token_hex(2)}"
    with running_receiver() as receiver:
        # Spans leave each process 100 ms after they end rather than 5 s (the SDK's default batch delay).
        running = start_campaign_mesh(
            new_database(), redis_url, nats_url, s3_server, namespace, tmp_path_factory.mktemp("trace-mesh-logs"),
            extra_env={"ESP_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
        try:
            yield running, receiver
        finally:
            running.mesh.stop()
            asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


def _send_through_the_gateway(running: CampaignMesh, request_id: str) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{running.config.gateway_port}/v1/messages:send",
        headers={"authorization": f"Bearer {running.api_key}"}, timeout=30,
        json={"requestId": request_id, "messageClass": "MESSAGE_CLASS_TRANSACTIONAL",
              "from": {"email": "no-reply@example.com"}, "to": [{"email": "ada@example.org"}],
              "subject": "Traced", "textBody": "One trace, please."})
    assert response.status_code == 200, response.text


def _gateway_root(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
    return next((s for s in spans if s.service == "esp-gateway" and s.kind == SERVER
                 and s.name == "POST /v1/messages:send" and not s.parent_span_id), None)


def _hops(trace: list[ReceivedSpan], simulator_url: str) -> dict[str, list[ReceivedSpan]]:
    """The spans of each hop the email's trace must hold."""
    return {
        "gateway": [s for s in trace if s.service == "esp-gateway" and s.kind == SERVER],
        "ingest SendEmail": [s for s in trace if s.service == "esp-ingest" and s.kind == SERVER
                             and s.name.endswith("/SendEmail")],
        "ledger reserve": [s for s in trace if s.service == "esp-ledger" and s.kind == SERVER
                           and s.name.endswith("/BatchReserveCredits")],
        "sender delivery": [s for s in trace if s.service.startswith("esp-sender") and s.name == "deliver"],
        "provider HTTP call": [s for s in trace if s.service.startswith("esp-sender") and s.kind == CLIENT
                               and simulator_url in s.attributes.get("url.full", s.attributes.get("http.url", ""))],
        "reports consumer": [s for s in trace if s.service.startswith("esp-reports") and s.kind == CONSUMER],
        "ledger settlement consumer": [s for s in trace if s.service == "esp-ledger-settlement"
                                       and s.kind == CONSUMER],
        "webhook delivery": [s for s in trace if s.service == "esp-webhooks" and s.kind == CLIENT
                             and s.name == "POST webhook"],
    }


def _joined_up(trace: list[ReceivedSpan]) -> bool:
    """Every span's parent is in the trace (one root): the spans form one tree, not pieces."""
    ids = {s.span_id for s in trace}
    return sum(1 for s in trace if not s.parent_span_id) == 1 and all(
        s.parent_span_id in ids for s in trace if s.parent_span_id)


def test_one_email_makes_one_trace_from_the_gateway_request_to_the_provider_call_and_the_consumers(
        traced_mesh: tuple[CampaignMesh, TraceReceiver]) -> None:
    running, receiver = traced_mesh
    webhooks = Receiver()
    webhooks.start()
    try:
        create_endpoint(running, running.api_key, f"{webhooks.url}/hooks")
        _send_through_the_gateway(running, f"trace-{secrets.token_hex(4)}")
        wait_until(lambda: webhooks.received("/hooks"), 30, "a webhook at the customer's endpoint")
    finally:
        webhooks.stop()

    def complete() -> list[ReceivedSpan] | None:
        spans = receiver.spans()
        root = _gateway_root(spans)
        if root is None:
            return None
        trace = [s for s in spans if s.trace_id == root.trace_id]
        hops = _hops(trace, running.simulator_url)
        return trace if all(hops.values()) and _joined_up(trace) else None

    def describe() -> str:
        spans = receiver.spans()
        root = _gateway_root(spans)
        if root is None:
            return f"no gateway root span among {len(spans)} spans"
        trace = [s for s in spans if s.trace_id == root.trace_id]
        missing = [hop for hop, found in _hops(trace, running.simulator_url).items() if not found]
        return f"{len(trace)} spans in the trace; missing hops {missing}; joined up: {_joined_up(trace)}"

    trace = wait_until(complete, 30, "every hop's span in one joined-up trace",
                       progress=lambda: len(receiver.spans()))
    assert trace, describe()
    root = _gateway_root(trace)
    assert root is not None
    # Each hop hangs under the one before it: the provider call under the email's delivery, the delivery under
    # what ingest queued, the ledger's reserve under ingest's request.
    by_id = {s.span_id: s for s in trace}

    def ancestors(span: ReceivedSpan) -> list[str]:
        chain = []
        while span.parent_span_id:
            span = by_id[span.parent_span_id]
            chain.append(span.service)
        return chain

    hops = _hops(trace, running.simulator_url)
    provider_call = hops["provider HTTP call"][0]
    assert by_id[provider_call.parent_span_id].name == "deliver"
    assert "esp-ingest" in ancestors(hops["sender delivery"][0])
    assert "esp-ingest" in ancestors(hops["ledger reserve"][0])
    settlement_paths = [ancestors(s) for s in hops["ledger settlement consumer"]]
    assert any(any(service.startswith("esp-sender") for service in path) for path in settlement_paths), \
        settlement_paths
    assert all(path[-1] == "esp-gateway" for path in settlement_paths)


def test_a_callers_trace_context_is_continued_rather_than_replaced(
        traced_mesh: tuple[CampaignMesh, TraceReceiver]) -> None:
    running, receiver = traced_mesh
    trace_id = secrets.token_hex(16)
    caller_span = secrets.token_hex(8)
    response = httpx.post(
        f"http://127.0.0.1:{running.config.gateway_port}/v1/messages:send",
        headers={"authorization": f"Bearer {running.api_key}", "traceparent": f"00-{trace_id}-{caller_span}-01"},
        timeout=30,
        json={"requestId": f"trace-{secrets.token_hex(4)}", "messageClass": "MESSAGE_CLASS_TRANSACTIONAL",
              "from": {"email": "no-reply@example.com"}, "to": [{"email": "grace@example.org"}],
              "subject": "Traced", "textBody": "Continue my trace."})
    assert response.status_code == 200, response.text

    def delivered_in_callers_trace() -> list[ReceivedSpan]:
        return [s for s in receiver.spans() if s.trace_id == trace_id and s.name == "deliver"]

    wait_until(delivered_in_callers_trace, 30, "the delivery span in the caller's trace",
               progress=lambda: len(receiver.spans()))
    gateway = [s for s in receiver.spans() if s.trace_id == trace_id and s.service == "esp-gateway"]
    assert [s.parent_span_id for s in gateway] == [caller_span]
