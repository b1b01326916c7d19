"""Bulk yields to urgent mail (``services.sender.yielding``): while OTPs flow, the bulk pool keeps fewer emails in
flight; once they stop, it goes back to its full concurrency. Real Redis and JetStream; the deliveries are held
by a stand-in for the provider side so that the emails in flight can be counted."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar, cast

import nats
import pytest
import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from libs.common.jetstream import Topology, ensure_streams
from libs.routing.catalog import bucket_name
from services.sender.config import SenderSettings
from services.sender.delivery import ACK, Deliverer, Incoming, Verdict
from services.sender.pool import ClassPool
from services.sender.server import build_pools
from services.sender.yielding import UrgentTraffic, yield_to_urgent_mail
from tests.progress import wait_for_progress_async

T = TypeVar("T")
STALL_S = 10.0
"""A wait fails when what it watches (emails in flight or delivered, a pool's capacity) has not moved for this long."""


async def eventually(observe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """``observe()`` once ``done`` with it; fails naming ``what`` and the last value after ``STALL_S`` without a
    change."""

    async def look() -> T:
        return observe()

    return await wait_for_progress_async(look, done, what=what, stall_s=STALL_S, every_s=0.01)


class HeldDeliveries:
    """Stands in for the provider side: each delivery waits until ``release`` is set; counts emails in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.delivered = 0
        self.release = asyncio.Event()

    async def deliver(self, batch: Sequence[Incoming]) -> list[Verdict]:
        self.in_flight += len(batch)
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await self.release.wait()
        self.in_flight -= len(batch)
        self.delivered += len(batch)
        return [ACK] * len(batch)


def task(message_class: int) -> bytes:
    queued = queue_pb2.SendTask(message_id=str(uuid.uuid4()), tenant_id="acme", message_class=message_class,
                                to=[common_pb2.EmailAddress(email="reader@example.org")], subject="News")
    return queued.SerializeToString()


class Queues:
    """The SEND streams of a namespace of the test's own."""

    def __init__(self, nc: NATS, topology: Topology) -> None:
        self.nc = nc
        self.topology = topology

    async def queue(self, message_class: str, count: int) -> None:
        proto_class = {"otp": common_pb2.MESSAGE_CLASS_OTP, "bulk": common_pb2.MESSAGE_CLASS_BULK}[message_class]
        js = self.nc.jetstream()
        acks = [await js.publish_async(self.topology.send_subject(message_class), task(proto_class))
                for _ in range(count)]
        await asyncio.gather(*acks)

    async def pool(self, message_class: str, deliverer: HeldDeliveries, concurrency: int,
                   on_delivered: Callable[[], None] | None = None) -> ClassPool:
        pool = ClassPool(self.nc, self.topology, message_class, cast(Deliverer, deliverer), concurrency=concurrency,
                         ack_wait_s=30, batch_max=500 if message_class == "bulk" else 1, on_delivered=on_delivered)
        await pool.setup()
        return pool


@pytest.fixture
async def queues(nats_url: str, run_id: str) -> AsyncIterator[Queues]:
    nc = await nats.connect(nats_url)
    topology = Topology(f"{run_id}y{secrets.token_hex(3)}")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    yield Queues(nc, topology)
    for stream in topology.streams:
        await js.delete_stream(stream)
    await nc.close()


def urgent_traffic(redis_client: aioredis.Redis, run_id: str, window_s: float,
                   clock: Callable[[], float] = time.monotonic) -> UrgentTraffic:
    return UrgentTraffic(redis_client, f"{run_id}y{secrets.token_hex(3)}", window_s=window_s, clock=clock)


def running(*work: Awaitable[None]) -> list[asyncio.Future[None]]:
    return [asyncio.ensure_future(w) for w in work]


async def test_urgent_mail_counts_as_flowing_for_one_window_after_a_delivery(redis_client: aioredis.Redis,
                                                                             run_id: str):
    urgent = urgent_traffic(redis_client, run_id, window_s=1.0)
    assert not await urgent.flowing()

    urgent.note_delivery()
    await urgent.aclose()  # the renewal runs in the background

    assert await urgent.flowing()
    await asyncio.sleep(1.2)
    assert not await urgent.flowing()


async def test_a_process_renews_the_signal_at_most_once_per_quarter_window(redis_client: aioredis.Redis,
                                                                           run_id: str):
    now = [100.0]
    urgent = urgent_traffic(redis_client, run_id, window_s=10.0, clock=lambda: now[0])
    urgent.note_delivery()
    await urgent.aclose()
    await redis_client.delete(urgent.key)

    now[0] += 2.0  # less than a quarter window later: this delivery does not write
    urgent.note_delivery()
    await urgent.aclose()
    assert not await urgent.flowing()

    now[0] += 0.6  # a quarter window after the last write
    urgent.note_delivery()
    await urgent.aclose()
    assert await urgent.flowing()


async def test_an_otp_pool_renews_the_signal_after_its_deliveries(queues: Queues, redis_client: aioredis.Redis,
                                                                  run_id: str):
    urgent = urgent_traffic(redis_client, run_id, window_s=30.0)
    deliveries = HeldDeliveries()
    deliveries.release.set()
    stop = asyncio.Event()
    tasks = running((await queues.pool("otp", deliveries, 8, on_delivered=urgent.note_delivery)).run(stop))
    assert not await urgent.flowing()

    await queues.queue("otp", 1)
    await eventually(lambda: deliveries.delivered, lambda n: n == 1, "the OTP delivered")
    await urgent.aclose()

    assert await urgent.flowing()
    stop.set()
    await asyncio.gather(*tasks)


async def test_the_bulk_pool_keeps_fewer_emails_in_flight_while_urgent_mail_flows(
        queues: Queues, redis_client: aioredis.Redis, run_id: str):
    urgent = urgent_traffic(redis_client, run_id, window_s=30.0)
    urgent.note_delivery()
    await urgent.aclose()
    deliveries = HeldDeliveries()
    bulk = await queues.pool("bulk", deliveries, 60)
    await queues.queue("bulk", 200)
    stop = asyncio.Event()
    tasks = running(yield_to_urgent_mail(bulk, urgent, 10, stop, refresh_s=0.02))
    await eventually(lambda: bulk.slots.capacity, lambda n: n == 10, "the bulk pool yielding to 10")

    tasks += running(bulk.run(stop))
    await eventually(lambda: deliveries.in_flight, lambda n: n == 10, "10 bulk emails in flight")
    await asyncio.sleep(0.3)  # time to take more, were it allowed to
    assert deliveries.most_in_flight == 10

    await redis_client.delete(urgent.key)  # no urgent mail for a window: the signal is gone
    await eventually(lambda: deliveries.in_flight, lambda n: n == 60, "60 bulk emails in flight")
    assert deliveries.most_in_flight == 60

    deliveries.release.set()
    await eventually(lambda: deliveries.delivered, lambda n: n == 200, "the 200 bulk emails delivered")
    stop.set()
    await asyncio.gather(*tasks)


async def test_the_bulk_pool_keeps_its_concurrency_when_redis_cannot_answer(queues: Queues):
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    urgent = UrgentTraffic(unreachable, "nowhere", window_s=1.0)
    bulk = await queues.pool("bulk", HeldDeliveries(), 60)
    stop = asyncio.Event()

    urgent.note_delivery()  # an urgent pool's renewal fails quietly: no email depends on it
    await urgent.aclose()
    tasks = running(yield_to_urgent_mail(bulk, urgent, 10, stop, refresh_s=0.02))
    await asyncio.sleep(0.5)

    assert bulk.slots.capacity == 60
    stop.set()
    await asyncio.gather(*tasks)
    await unreachable.aclose()


async def test_a_sender_serving_otp_and_bulk_yields_its_bulk_to_its_otps(nats_url: str, redis_url: str,
                                                                         redis_client: aioredis.Redis, run_id: str):
    namespace = f"{run_id}y{secrets.token_hex(3)}"
    settings = SenderSettings(namespace=namespace, nats_url=nats_url, redis_url=redis_url,
                              sender_classes=("otp", "bulk"), process_per_class=False, urgent_window_s=0.5)
    parts = await build_pools(settings)
    stop = asyncio.Event()
    tasks = running(*(work(stop) for work in parts.tasks))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    def yielding() -> bool:
        return REGISTRY.get_sample_value("esp_sender_bulk_yielding") == 1

    try:
        await asyncio.sleep(0.3)
        assert not yielding()
        # No provider is set up: the OTP's delivery fails and is retried later, but it was urgent mail all the same.
        await js.publish(Topology(namespace).send_subject("otp"), task(common_pb2.MESSAGE_CLASS_OTP))
        await eventually(yielding, bool, "the bulk pool yielding to the OTP")
        await eventually(yielding, lambda y: not y, "the bulk pool back to its concurrency")  # a window after the OTP
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for close in parts.closers:
            await close()
        for stream in Topology(namespace).streams:
            await js.delete_stream(stream)
        await js.delete_key_value(bucket_name(namespace))
        await nc.close()
        async for key in redis_client.scan_iter(match=f"{namespace}:*", count=1000):
            await redis_client.delete(key)


def test_bulk_cannot_yield_to_a_concurrency_above_its_own():
    with pytest.raises(ValueError, match="ESP_BULK_CONCURRENCY_WHILE_URGENT"):
        SenderSettings(bulk_concurrency=50, bulk_concurrency_while_urgent=100)


def test_only_otp_and_transactional_mail_can_make_bulk_yield():
    with pytest.raises(ValueError, match="ESP_BULK_YIELDS_TO"):
        SenderSettings(bulk_yields_to=("otp", "bulk"))
