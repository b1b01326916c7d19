"""Fixtures for the sender tests.

In-process (``world``): a ``Deliverer`` wired to real Redis and NATS JetStream under a namespace of its own,
with providers pointing at the in-process provider simulator (``sim``, from the provider tests). Deliveries are
driven directly, so each policy can be checked one behaviour at a time.

The mesh (``mesh`` in ``tests/sender/mesh.py``): every service as a process plus the simulator as a process.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from dev.simulator import RunningSimulator
from libs.common.jetstream import Topology, ensure_streams
from libs.common.s3 import create_s3_client
from libs.routing.catalog import ProviderCatalog, ProviderSpec, bucket_name, open_bucket
from libs.routing.health import BreakerPolicy, HealthBoard
from services.sender.adapters import AdapterPool
from services.sender.delivery import RETRY_POLICIES, Deliverer, Incoming, Verdict
from services.sender.events import EventPublisher
from services.sender.links import link_attachments
from services.sender.state import MessageStateStore
from tests.conftest import S3Server
from tests.e2e.conftest import smtp_sink  # noqa: F401 - the mesh fixture needs it
from tests.providers import conftest as provider_fixtures
from tests.sender.mesh import mesh, provider_mesh, sim_process  # noqa: F401 - the mesh fixtures

# Reused from the provider tests: one in-process simulator for the session, reset before each test.
simulator = provider_fixtures.simulator
sim = provider_fixtures.sim
CLASSES = {"otp": common_pb2.MESSAGE_CLASS_OTP, "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
           "bulk": common_pb2.MESSAGE_CLASS_BULK}
WORLD_BREAKER = BreakerPolicy(consecutive_failures=3, min_samples=10, window_s=10, open_s=0.5, probe_timeout_s=2)


def send_task(message_class: str = "transactional", *, to: str = "alice@example.org", subject: str = "Hello",
              text: str = "Hi there.", tags: tuple[str, ...] = (), message_bytes: int = 2_000,
              accepted_s_ago: float = 0.0) -> queue_pb2.SendTask:
    """A queued email as ingest would publish it."""
    accepted = Timestamp()
    accepted.GetCurrentTime()
    accepted.FromNanoseconds(accepted.ToNanoseconds() - int(accepted_s_ago * 1e9))
    task = queue_pb2.SendTask(
        message_id=str(uuid.uuid4()), tenant_id="acme", message_class=CLASSES[message_class],
        to=[common_pb2.EmailAddress(email=to)], subject=subject, text_body=text, tags=list(tags),
        message_bytes=message_bytes, accepted_time=accepted)
    getattr(task, "from").email = "shop@example.com"
    return task


@dataclass
class World:
    """A sender's insides on real servers, plus what tests need to look at."""

    sim: RunningSimulator
    js: JetStreamContext
    topology: Topology
    catalog: ProviderCatalog
    health: HealthBoard
    states: MessageStateStore
    deliverer: Deliverer
    adapters: AdapterPool
    events: list[queue_pb2.EventEnvelope] = field(default_factory=list)
    heartbeats: int = 0

    async def add_provider(self, provider_id: str, personality: str, **fields: Any) -> ProviderSpec:
        """A provider pointing at a simulator personality; returns once the catalog has it."""
        config = self.sim.provider_config(personality)
        options = {**config.options, **fields.pop("options", {})}
        spec = ProviderSpec(provider_id, config.type, config.endpoint, dict(config.credentials),
                            region=config.region, options=options, **fields)
        await self.catalog.kv.put(provider_id, spec.to_json())
        for _ in range(200):
            if self.catalog.providers.get(provider_id) == spec:
                break
            await asyncio.sleep(0.01)
        await self.health.refresh(self.catalog.providers)
        return spec

    async def deliver(self, *tasks: queue_pb2.SendTask, delivery: int = 1) -> list[Verdict]:
        """One delivery of ``tasks`` (as one batch), with a fresh health snapshot as the refresher would have."""
        await self.health.refresh(self.catalog.providers)

        async def heartbeat() -> None:
            self.heartbeats += 1

        return await self.deliverer.deliver([Incoming(t, delivery, heartbeat) for t in tasks])

    async def events_of(self, task: queue_pb2.SendTask) -> list[queue_pb2.EventEnvelope]:
        """Every event published about ``task`` so far (waits briefly for the subscription to catch up)."""
        await asyncio.sleep(0.05)
        return [e for e in self.events if e.message_id == task.message_id]

    async def event_types(self, task: queue_pb2.SendTask) -> list[int]:
        return [e.event.type for e in await self.events_of(task)]

    async def delivered_to(self, personality: str, task: queue_pb2.SendTask) -> int:
        """How many times the simulator took ``task`` for delivery through ``personality``."""
        return sum(1 for m in await self.sim.client.delivered_messages(personality)
                   if m["esp_message_id"] == task.message_id)


@pytest.fixture
async def world(sim: RunningSimulator, redis_url: str, nats_url: str, run_id: str,
                s3_server: S3Server) -> AsyncIterator[World]:
    namespace = f"{run_id}w{secrets.token_hex(3)}"
    nc: NATS = await nats.connect(nats_url)
    js = nc.jetstream()
    topology = Topology(namespace)
    await ensure_streams(js, topology)
    catalog = ProviderCatalog(await open_bucket(js, namespace))
    stop = asyncio.Event()
    watcher = asyncio.create_task(catalog.run(stop))
    await catalog.wait_loaded()
    redis = aioredis.Redis.from_url(redis_url)
    health = HealthBoard(redis, namespace, WORLD_BREAKER)
    adapters = AdapterPool(catalog)
    states = MessageStateStore(redis, namespace, lease_s=30)

    async def no_attachments(key: str) -> AsyncIterator[bytes]:
        raise AssertionError("no attachments in these tests")
        yield b""

    s3 = create_s3_client(s3_server.endpoint, s3_server.region, s3_server.access_key, s3_server.secret_key)
    deliverer = Deliverer(catalog=catalog, health=health, adapters=adapters, states=states,
                          events=EventPublisher(nc, topology, timeout_s=2), opener=no_attachments,
                          policies=RETRY_POLICIES,
                          linker=partial(link_attachments, s3=s3, bucket="attachments"), heartbeat_s=0.05)
    world = World(sim, js, topology, catalog, health, states, deliverer, adapters)

    async def collect(msg: Any) -> None:
        world.events.append(queue_pb2.EventEnvelope.FromString(msg.data))

    subscription = await js.subscribe(topology.events_wildcard, cb=collect, ordered_consumer=True)
    yield world
    await subscription.unsubscribe()
    stop.set()
    await watcher
    await adapters.aclose()
    for stream in topology.streams:
        await js.delete_stream(stream)
    await js.delete_key_value(bucket_name(namespace))
    async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        await redis.delete(key)
    await redis.aclose()
    await nc.close()
