"""Helpers of the scheduled-send and cancel tests: what ingest publishes, as it publishes it, and timestamps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from esp.internal.v1 import queue_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tests.ingest.conftest import IngestHarness

Arrivals = dict[str, tuple[float, bytes]]
"""Message id → (when it was published, its payload)."""
Watch = Callable[[str], Awaitable[Arrivals]]


def stamp(unix_s: float) -> Timestamp:
    """A Timestamp ``unix_s`` seconds after the epoch (to the microsecond)."""
    micros = round(unix_s * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


@pytest.fixture
async def watch(harness: IngestHarness) -> AsyncIterator[Watch]:
    """``await watch(subject)``: what ingest publishes on ``subject`` from now on, by message id (core NATS sees
    every JetStream publish)."""
    subscriptions: list[Subscription] = []
    sends = {harness.parts.topology.send_subject(c) for c in ("otp", "transactional", "bulk")}

    async def watching(subject: str) -> Arrivals:
        arrivals: Arrivals = {}

        async def arrived(msg: Msg) -> None:
            decoded = (queue_pb2.SendTask if subject in sends else queue_pb2.EventEnvelope).FromString(msg.data)
            arrivals.setdefault(decoded.message_id, (time.time(), msg.data))

        subscriptions.append(await harness.parts.nc.subscribe(subject, cb=arrived))
        await harness.parts.nc.flush()  # the server has the subscription
        return arrivals

    yield watching
    for subscription in subscriptions:
        await subscription.unsubscribe()


async def arrival(arrivals: Arrivals, message_id: str, timeout_s: float) -> tuple[float, bytes] | None:
    """When ``message_id`` arrived and as what, waiting up to ``timeout_s`` for it; None if it did not."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if message_id in arrivals:
            return arrivals[message_id]
        await asyncio.sleep(0.02)
    return arrivals.get(message_id)
