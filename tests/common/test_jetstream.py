"""JetStream helpers: streams declared in code, publishes deduplicated by Nats-Msg-Id, trace context in headers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from libs.common.jetstream import (
    StreamLayoutError,
    Topology,
    ensure_pull_consumer,
    ensure_streams,
    publish,
)
from libs.common.message_classes import MessageClass


@pytest.fixture
async def js(nats_url: str, run_id: str) -> AsyncIterator[tuple[object, Topology]]:
    nc = await nats.connect(nats_url)
    topology = Topology(f"{run_id}js")
    jsc = nc.jetstream()
    await ensure_streams(jsc, topology)
    yield jsc, topology
    for name in topology.streams:
        await jsc.delete_stream(name)
    await nc.close()


async def test_the_same_message_id_is_stored_once(js):
    jsc, topology = js
    for _ in range(3):
        await publish(jsc, topology.send_subject("otp"), b"payload", msg_id="m-1")
    info = await jsc.stream_info(topology.send_stream("otp"))
    assert info.state.messages == 1


async def test_each_class_queues_on_a_stream_of_its_own(js):
    # A bulk backlog's stores and deletions never queue an OTP's publish or delivery behind them.
    jsc, topology = js
    for count, message_class in enumerate(MessageClass, start=1):
        for index in range(count):
            await publish(jsc, topology.send_subject(message_class), b"task", msg_id=f"{message_class}-{index}")
    stored = {c: (await jsc.stream_info(topology.send_stream(c))).state.messages for c in MessageClass}
    assert stored == {"otp": 1, "transactional": 2, "bulk": 3}


@pytest.fixture
async def legacy(nats_url: str, run_id: str) -> AsyncIterator[tuple[object, Topology]]:
    """A server with the one SEND stream of every class that earlier versions declared."""
    nc = await nats.connect(nats_url)
    topology = Topology(f"{run_id}old")
    jsc = nc.jetstream()
    await jsc.add_stream(StreamConfig(name=topology.legacy_send_stream,
                                      subjects=[topology.send_subject(c) for c in MessageClass],
                                      retention=RetentionPolicy.WORK_QUEUE))
    yield jsc, topology
    for name in (topology.legacy_send_stream, *topology.streams):
        try:
            await jsc.delete_stream(name)
        except NotFoundError:
            pass
    await nc.close()


async def test_an_empty_stream_of_the_old_layout_gives_way_to_the_per_class_streams(legacy):
    jsc, topology = legacy
    await ensure_streams(jsc, topology)
    with pytest.raises(NotFoundError):
        await jsc.stream_info(topology.legacy_send_stream)
    await publish(jsc, topology.send_subject("otp"), b"task", msg_id="m-1")
    assert (await jsc.stream_info(topology.send_stream("otp"))).state.messages == 1


async def test_a_stream_of_the_old_layout_still_queueing_email_is_kept_and_stops_the_start(legacy):
    jsc, topology = legacy
    await publish(jsc, topology.send_subject("bulk"), b"task", msg_id="m-1")
    with pytest.raises(StreamLayoutError, match="still holds 1 emails"):
        await ensure_streams(jsc, topology)
    assert (await jsc.stream_info(topology.legacy_send_stream)).state.messages == 1


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
