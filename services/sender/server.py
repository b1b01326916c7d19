"""The sender process: class pools over JetStream, health-only gRPC (probes), provider catalog and health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.redis import create_redis
from libs.common.s3 import create_s3_client, stream_object
from libs.routing.catalog import ProviderCatalog, open_bucket
from libs.routing.health import HealthBoard
from services.sender.adapters import AdapterPool
from services.sender.config import SenderSettings
from services.sender.delivery import Deliverer, EventPublisher
from services.sender.policy import POLICIES
from services.sender.pool import ClassPool


async def build_app(settings: SenderSettings) -> ServiceApp:
    topology = Topology(settings.namespace)
    nc = await connect(settings.nats_url, "esp-sender")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    catalog = ProviderCatalog(await open_bucket(js, settings.namespace))
    redis = create_redis(settings.redis_url)
    health = HealthBoard(redis, settings.namespace, refresh_s=settings.health_refresh_s)
    adapters = AdapterPool(catalog)
    s3 = create_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key, settings.s3_secret_key)

    def open_attachment(key: str) -> AsyncIterator[bytes]:
        return stream_object(s3, settings.s3_bucket, key)

    deliverer = Deliverer(catalog=catalog, health=health, adapters=adapters, redis=redis,
                          events=EventPublisher(js, topology), namespace=settings.namespace, opener=open_attachment,
                          policies=POLICIES, sent_marker_ttl_s=settings.sent_marker_ttl_s)
    pools = [ClassPool(js, topology, c, deliverer, concurrency=settings.concurrency(c), ack_wait_s=settings.ack_wait_s)
             for c in settings.sender_classes]
    for pool in pools:
        await pool.setup()

    catalog_stop = asyncio.Event()
    catalog_task = asyncio.create_task(catalog.run(catalog_stop))
    await catalog.wait_loaded()
    await health.refresh(catalog.providers)

    async def refresh_health(stop: asyncio.Event) -> None:
        await health.run_refresher(lambda: list(catalog.providers), stop)

    async def close_all() -> None:
        catalog_stop.set()
        await catalog_task
        await adapters.aclose()
        await nc.drain()
        await redis.aclose()

    return ServiceApp(name="sender", default_port=50055, tasks=[refresh_health, *[partial(_run, p) for p in pools]],
                      closers=[close_all])


async def _run(pool: ClassPool, stop: asyncio.Event) -> None:
    await pool.run(stop)
