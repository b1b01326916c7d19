"""The sender process: a pool per message class over JetStream, the provider catalog and shared health.

When a replica serves several classes (``make run``, the e2e mesh, small deployments) each class runs in a
worker process of its own (``services.sender.worker``) under this process, which only supervises them and
answers the health probes: a bulk backlog can keep its own event loop — and a CPU — busy, never the OTP's.
Production runs one Deployment per class (``ESP_SENDER_CLASSES=otp`` …), where the pools run in this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.s3 import create_s3_client, stream_object
from libs.routing.catalog import ProviderCatalog, open_bucket
from libs.routing.health import HealthBoard
from services.sender.adapters import AdapterPool
from services.sender.config import SenderSettings
from services.sender.delivery import Deliverer
from services.sender.events import EventPublisher
from services.sender.links import link_attachments
from services.sender.policy import POLICIES
from services.sender.pool import ClassPool
from services.sender.state import MessageStateStore

log = logging.getLogger(__name__)

READY_FD_VARIABLE = "ESP_SENDER_READY_FD"
"""A worker writes one line to this inherited file descriptor once its pools consume."""
WORKER_START_TIMEOUT_S = 60.0

StopEvent = asyncio.Event


@dataclass
class SenderParts:
    """The pools of one process: loops to run until stop, and what to close afterwards."""

    tasks: list[Callable[[StopEvent], Coroutine[Any, Any, None]]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def build_app(settings: SenderSettings) -> ServiceApp:
    """The sender service: pools in this process, or one worker process per class under it."""
    if settings.process_per_class and len(settings.sender_classes) > 1:
        supervisor = await WorkerSupervisor.start(settings)
        return ServiceApp(name="sender", default_port=50055, tasks=[supervisor.watch], closers=[supervisor.stop])
    parts = await build_pools(settings)
    return ServiceApp(name="sender", default_port=50055, tasks=parts.tasks, closers=parts.closers)


async def build_pools(settings: SenderSettings) -> SenderParts:
    """Catalog watch, health refresher and one pool per class served, wired to the shared servers."""
    topology = Topology(settings.namespace)
    nc = await connect(settings.nats_url, "esp-sender")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    catalog = ProviderCatalog(await open_bucket(js, settings.namespace))
    redis = _redis(settings.redis_url, settings.redis_max_connections)
    health = HealthBoard(redis, settings.namespace, settings.breaker_policy(), refresh_s=settings.health_refresh_s)
    adapters = AdapterPool(catalog)
    states = MessageStateStore(redis, settings.namespace, ttl_s=settings.sent_marker_ttl_s,
                               lease_s=settings.ack_wait_s)
    s3 = create_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key, settings.s3_secret_key)

    def open_attachment(key: str) -> AsyncIterator[bytes]:
        return stream_object(s3, settings.s3_bucket, key)

    connections: list[NATS] = [nc]
    pools: list[ClassPool] = []
    for message_class in settings.sender_classes:
        # A connection per class: a bulk fetch of hundreds of emails never queues in front of an OTP's.
        class_nc = await connect(settings.nats_url, f"esp-sender-{message_class}")
        connections.append(class_nc)
        deliverer = Deliverer(catalog=catalog, health=health, adapters=adapters, states=states,
                              events=EventPublisher(class_nc, topology), opener=open_attachment, policies=POLICIES,
                              linker=partial(link_attachments, s3=s3, bucket=settings.s3_bucket,
                                             ttl_s=settings.attachment_link_ttl_s),
                              heartbeat_s=settings.ack_wait_s / 3)
        pool = ClassPool(class_nc, topology, message_class, deliverer, concurrency=settings.concurrency(message_class),
                         ack_wait_s=settings.ack_wait_s, batch_max=settings.batch_max(message_class))
        await pool.setup()
        pools.append(pool)

    catalog_stop = asyncio.Event()
    catalog_task = asyncio.create_task(catalog.run(catalog_stop))
    await catalog.wait_loaded()
    await health.refresh(catalog.providers)

    async def refresh_health(stop: StopEvent) -> None:
        await health.run_refresher(lambda: list(catalog.providers), stop)

    async def close_all() -> None:
        catalog_stop.set()
        await catalog_task
        await adapters.aclose()
        for connection in reversed(connections):
            await connection.drain()
        await redis.aclose()

    return SenderParts(tasks=[refresh_health, *[partial(_run, p) for p in pools]], closers=[close_all])


def _redis(url: str, max_connections: int) -> aioredis.Redis:
    """A client whose pool makes callers wait for a free connection instead of failing: hundreds of emails are in
    flight, each needing Redis for a moment."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10,
                                                    socket_timeout=5, socket_connect_timeout=5,
                                                    health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


async def _run(pool: ClassPool, stop: StopEvent) -> None:
    await pool.run(stop)


class WorkerSupervisor:
    """One ``services.sender.worker`` process per class; a worker that dies takes the sender down with it, so
    the orchestrator restarts the whole replica rather than leave a class unserved."""

    def __init__(self, settings: SenderSettings, workers: dict[str, asyncio.subprocess.Process]) -> None:
        self.settings = settings
        self.workers = workers

    @classmethod
    async def start(cls, settings: SenderSettings) -> WorkerSupervisor:
        """Start a worker per class and wait until each consumes (or fail, stopping those already started)."""
        workers: dict[str, asyncio.subprocess.Process] = {}
        supervisor = cls(settings, workers)
        try:
            for index, message_class in enumerate(settings.sender_classes):
                workers[message_class] = await _start_worker(settings, message_class, index)
        except BaseException:
            await supervisor.stop()
            raise
        return supervisor

    async def watch(self, stop: StopEvent) -> None:
        """Return when asked to stop; raise when a worker exits on its own."""
        exits = {asyncio.create_task(p.wait()): c for c, p in self.workers.items()}
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping not in done:
            stopping.cancel()
            dead = [f"{exits[t]} (exit code {t.result()})" for t in done if t in exits]
            raise RuntimeError(f"sender worker exited: {', '.join(dead)}")
        for task in exits:
            task.cancel()

    async def stop(self) -> None:
        """SIGTERM every worker and wait for its drain (killed after the grace period)."""
        for process in self.workers.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for message_class, process in self.workers.items():
            try:
                await asyncio.wait_for(process.wait(), self.settings.shutdown_grace_s + 5)
            except TimeoutError:
                log.warning("sender worker did not stop in time; killing it", extra={"class": message_class})
                process.kill()
                await process.wait()


async def _start_worker(settings: SenderSettings, message_class: str, index: int) -> asyncio.subprocess.Process:
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "ESP_SENDER_CLASSES": message_class, READY_FD_VARIABLE: str(write_fd)}
    if settings.metrics_port:
        env["ESP_METRICS_PORT"] = str(settings.metrics_port + 1 + index)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.sender.worker", env=env, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb"))
    try:
        line = await asyncio.wait_for(reader.readline(), WORKER_START_TIMEOUT_S)
    except TimeoutError:
        line = b""
    finally:
        transport.close()
    if line.strip() != b"ready":
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise RuntimeError(f"the {message_class} sender worker did not start (exit code {process.returncode})")
    return process
