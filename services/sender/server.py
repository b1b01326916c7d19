"""The sender process: a pool per message class over JetStream, the provider catalog and shared health.

When a replica serves several classes (``make run``, the e2e mesh, small deployments) each class runs in a
worker process of its own (``services.sender.worker``) under this process, which only supervises them and
answers the health probes: a bulk backlog can keep its own event loop — and a CPU — busy, never the OTP's.
Production runs one Deployment per class (``ESP_SENDER_CLASSES=otp`` …), where the pools run in this process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

import anyio.lowlevel
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from libs.common.consumer_lag import watch_consumer_lag
from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.s3 import create_s3_client, stream_object
from libs.common.secret_box import optional_secret_box
from libs.common.sending_domains import SendingDomains
from libs.common.sending_domains import open_bucket as open_domains_bucket
from libs.common.workers import StopEvent, WorkerParts, WorkerSpec, WorkerSupervisor, worker_env
from libs.routing.catalog import ProviderCatalog, open_bucket
from libs.routing.health import HealthBoard
from services.sender.adapters import AdapterPool
from services.sender.config import SenderSettings
from services.sender.delivery import RETRY_POLICIES, Deliverer
from services.sender.events import EventPublisher
from services.sender.halts import CampaignHalts
from services.sender.links import link_attachments
from services.sender.pool import ClassPool
from services.sender.state import MessageStateStore
from services.sender.suppressions import SuppressionCheck
from services.sender.yielding import UrgentTraffic, yield_to_urgent_mail

log = logging.getLogger(__name__)

async def build_app(settings: SenderSettings) -> ServiceApp:
    """The sender service: pools in this process, or one worker process per class under it."""
    if settings.process_per_class and len(settings.sender_classes) > 1:
        supervisor = await WorkerSupervisor.start("sender", [
            WorkerSpec(f"sender-{message_class}", "services.sender.worker",
                       worker_env(settings, index, ESP_SENDER_CLASSES=message_class))
            for index, message_class in enumerate(settings.sender_classes)], grace_s=settings.shutdown_grace_s)
        return ServiceApp(name="sender", default_port=50055, tasks=[supervisor.watch], closers=[supervisor.stop])
    parts = await build_pools(settings)
    return ServiceApp(name="sender", default_port=50055, tasks=parts.tasks, closers=parts.closers)


async def build_pools(settings: SenderSettings) -> WorkerParts:
    """Catalog watch, health and halted-campaign refreshers and one pool per class served, wired to the shared
    servers."""
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    nc = await connect(settings.nats_url, "esp-sender")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    catalog = ProviderCatalog(await open_bucket(js, settings.namespace), optional_secret_box(settings.secrets_keys))
    domains = SendingDomains(await open_domains_bucket(js, settings.namespace),
                             optional_secret_box(settings.secrets_keys), sandbox_domains=settings.sandbox_domains)
    redis = _redis(settings.redis_url, settings.redis_max_connections)
    health = HealthBoard(redis, settings.namespace, settings.breaker_policy(), refresh_s=settings.health_refresh_s,
                         demand=settings.demand())
    adapters = AdapterPool(catalog)
    states = MessageStateStore(redis, settings.namespace, ttl_s=settings.sent_marker_ttl_s,
                               lease_s=settings.ack_wait_s)
    # Halts and suppressions live under the namespace the sender's other Redis keys use.
    halts = CampaignHalts(redis, settings.namespace)
    suppressions = SuppressionCheck(redis, settings.namespace)
    s3 = create_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key, settings.s3_secret_key)

    def open_attachment(key: str) -> AsyncIterator[bytes]:
        return stream_object(s3, settings.s3_bucket, key)

    urgent = UrgentTraffic(redis, settings.namespace, window_s=settings.urgent_window_s)
    connections: list[NATS] = [nc]
    pools: list[ClassPool] = []
    for message_class in settings.sender_classes:
        # A connection per class: a bulk fetch of hundreds of emails never queues in front of an OTP's.
        class_nc = await connect(settings.nats_url, f"esp-sender-{message_class}")
        connections.append(class_nc)
        deliverer = Deliverer(catalog=catalog, health=health, adapters=adapters, states=states,
                              events=EventPublisher(class_nc, topology), opener=open_attachment,
                              policies=RETRY_POLICIES,
                              linker=partial(link_attachments, s3=s3, bucket=settings.s3_bucket,
                                             ttl_s=settings.attachment_link_ttl_s),
                              heartbeat_s=settings.ack_wait_s / 3, halts=halts, suppressions=suppressions,
                              domains=domains)
        pool = ClassPool(class_nc, topology, message_class, deliverer, concurrency=settings.concurrency(message_class),
                         ack_wait_s=settings.ack_wait_s, batch_max=settings.batch_max(message_class),
                         on_delivered=urgent.note_delivery if message_class in settings.bulk_yields_to else None)
        await pool.setup()
        pools.append(pool)

    catalog_stop = asyncio.Event()
    catalog_task = asyncio.create_task(catalog.run(catalog_stop))
    await catalog.wait_loaded()
    domains_task = asyncio.create_task(domains.run(catalog_stop))
    await domains.wait_loaded()
    await health.refresh(catalog.providers)
    try:  # a restarted sender knows the halts before its first delivery
        await halts.refresh()
    except Exception:
        log.warning("could not read the halted campaigns at start; the refresher keeps trying", exc_info=True)

    # httpx imports its event-loop backend (through httpcore and anyio) on its first request: some 40 ms of CPU
    # that the first OTP after a start would wait for. An anyio checkpoint imports it now.
    await anyio.lowlevel.checkpoint()

    async def refresh_health(stop: StopEvent) -> None:
        await health.run_refresher(lambda: list(catalog.providers), stop)

    async def report_lag(stop: StopEvent) -> None:
        await watch_consumer_lag(js, [(topology.send_stream(p.message_class), p.durable) for p in pools], stop)

    async def bulk_yields(pool: ClassPool, stop: StopEvent) -> None:
        await yield_to_urgent_mail(pool, urgent, settings.bulk_concurrency_while_urgent, stop)

    yielding = [partial(bulk_yields, p) for p in pools if p.message_class == "bulk" and settings.bulk_yields_to
                and settings.bulk_concurrency_while_urgent < settings.bulk_concurrency]

    async def close_all() -> None:
        catalog_stop.set()
        await catalog_task
        await domains_task
        await urgent.aclose()
        await adapters.aclose()
        for connection in reversed(connections):
            await connection.drain()
        await redis.aclose()

    return WorkerParts(tasks=[refresh_health, report_lag, halts.run, *yielding, *[partial(_run, p) for p in pools]],
                       closers=[close_all])


def _redis(url: str, max_connections: int) -> aioredis.Redis:
    """A client whose pool makes callers wait for a free connection instead of failing: hundreds of emails are in
    flight, each needing Redis for a moment."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10,
                                                    socket_timeout=5, socket_connect_timeout=5,
                                                    health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


async def _run(pool: ClassPool, stop: StopEvent) -> None:
    await pool.run(stop)


