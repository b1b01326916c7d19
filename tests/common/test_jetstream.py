"""JetStream helpers: streams declared in code, publishes deduplicated by Nats-Msg-Id, trace context in headers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from libs.common.jetstream import Topology, ensure_pull_consumer, ensure_streams, publish


@pytest.fixture
async def js(nats_url: str, run_id: str) -> AsyncIterator[tuple[object, Topology]]:
    nc = await nats.connect(nats_url)
    topology = Topology(f"{run_id}js")
    jsc = nc.jetstream()
    await ensure_streams(jsc, topology)
    yield jsc, topology
    for name in (topology.send_stream, topology.events_stream):
        await jsc.delete_stream(name)
    await nc.close()


async def test_the_same_message_id_is_stored_once(js):
    jsc, topology = js
    for _ in range(3):
        await publish(jsc, topology.send_subject("otp"), b"payload", msg_id="m-1")
    info = await jsc.stream_info(topology.send_stream)
    assert info.state.messages == 1


async def test_published_messages_carry_the_trace_context(js):
    jsc, topology = js
    trace.set_tracer_provider(TracerProvider())
    durable = topology.consumer("trace-test")
    await ensure_pull_consumer(jsc, topology.events_stream, durable, topology.events_wildcard)
    with trace.get_tracer("test").start_as_current_span("publishing") as span:
        await publish(jsc, topology.events_subject("acme"), b"event", msg_id="e-1")
        trace_id = f"{span.get_span_context().trace_id:032x}"
    sub = await jsc.pull_subscribe_bind(durable=durable, stream=topology.events_stream)
    (msg,) = await sub.fetch(1, timeout=5)
    assert trace_id in msg.headers["traceparent"]
    assert msg.headers["Nats-Msg-Id"] == "e-1"
