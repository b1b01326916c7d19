"""The gauges added for the platform team's alerts reflect real state: breakers and quotas in Redis, consumer
backlogs in JetStream, the webhook delivery queue in Postgres (each read the way the owning service reads it)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from libs.common import db
from libs.common.consumer_lag import record_consumer_lag
from libs.common.jetstream import Topology, ensure_pull_consumer, ensure_streams, publish
from libs.routing.catalog import ProviderSpec
from libs.routing.health import BreakerPolicy, CallHealth, HealthBoard, ProviderLimits
from services.router.provider_metrics import ProviderGauges
from services.webhooks.backlog import measure_backlog

BREAKER = BreakerPolicy(consecutive_failures=3, failure_rate=0.5, min_samples=10, window_s=10, open_s=30,
                        probe_timeout_s=5)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_an_open_breaker_and_todays_quota_show_in_the_provider_gauges(redis_client: aioredis.Redis,
                                                                            run_id: str) -> None:
    board = HealthBoard(redis_client, f"{run_id}{secrets.token_hex(3)}", BREAKER)
    broken, busy = f"broken-{run_id}", f"busy-{run_id}"
    providers = {broken: ProviderSpec(broken, "smtp", "smtp://x"),
                 busy: ProviderSpec(busy, "smtp", "smtp://y", daily_quota=100)}
    for _ in range(BREAKER.consecutive_failures):
        await board.record(broken, CallHealth.FAILURE)
    assert (await board.acquire(busy, ProviderLimits(daily_quota=100), emails=7)).granted == 7
    gauges = ProviderGauges(board, lambda: providers)

    await gauges.refresh()

    assert sample("esp_provider_breaker_open", provider=broken) == 1
    assert sample("esp_provider_breaker_open", provider=busy) == 0
    assert sample("esp_provider_quota_daily_used", provider=busy) == 7
    assert sample("esp_provider_quota_daily_limit", provider=busy) == 100
    assert sample("esp_provider_quota_daily_limit", provider=broken) == 0


async def test_a_provider_removed_from_the_catalog_leaves_the_gauges(redis_client: aioredis.Redis,
                                                                   run_id: str) -> None:
    board = HealthBoard(redis_client, f"{run_id}{secrets.token_hex(3)}", BREAKER)
    gone = f"gone-{run_id}"
    providers = {gone: ProviderSpec(gone, "smtp", "smtp://x")}
    gauges = ProviderGauges(board, lambda: providers)
    await gauges.refresh()
    assert sample("esp_provider_breaker_open", provider=gone) == 0

    providers = {}
    await gauges.refresh()

    assert sample("esp_provider_breaker_open", provider=gone) is None
    assert sample("esp_provider_quota_daily_limit", provider=gone) is None


@pytest.fixture
async def jetstream(nats_url: str, run_id: str) -> AsyncIterator[tuple[NATS, Topology]]:
    nc = await nats.connect(nats_url)
    topology = Topology(f"{run_id}lag{secrets.token_hex(2)}")
    await ensure_streams(nc.jetstream(), topology)
    yield nc, topology
    for name in topology.streams:
        await nc.jetstream().delete_stream(name)
    await nc.close()


async def test_consumer_lag_counts_what_the_consumer_has_not_taken_and_not_acked(
        jetstream: tuple[NATS, Topology]) -> None:
    nc, topology = jetstream
    js = nc.jetstream()
    stream, durable = topology.send_stream("bulk"), topology.consumer("sender-bulk")
    await ensure_pull_consumer(js, stream, durable, topology.send_subject("bulk"), ack_wait_s=30)
    for index in range(5):
        await publish(js, topology.send_subject("bulk"), b"task", msg_id=f"m{index}")
    taken = await js.pull_subscribe_bind(durable, stream=stream)
    fetched = await taken.fetch(2, timeout=5)
    assert len(fetched) == 2

    await record_consumer_lag(js, [(stream, durable)])

    assert sample("esp_jetstream_consumer_pending", consumer=durable) == 3
    assert sample("esp_jetstream_consumer_ack_pending", consumer=durable) == 2


async def test_an_unreadable_consumer_keeps_its_last_value(jetstream: tuple[NATS, Topology]) -> None:
    nc, topology = jetstream
    js = nc.jetstream()
    stream, durable = topology.send_stream("otp"), topology.consumer("sender-otp")
    await ensure_pull_consumer(js, stream, durable, topology.send_subject("otp"), ack_wait_s=30)
    await publish(js, topology.send_subject("otp"), b"task", msg_id="only")
    await record_consumer_lag(js, [(stream, durable)])
    await js.delete_consumer(stream, durable)

    await record_consumer_lag(js, [(stream, durable)])

    assert sample("esp_jetstream_consumer_pending", consumer=durable) == 1


async def test_the_webhook_backlog_counts_due_deliveries_of_enabled_endpoints_only(
        new_database: Callable[[], str]) -> None:
    dsn = new_database()
    await db.migrate_services(dsn, ["webhooks"])
    pool = await db.create_pool(dsn, min_size=1, max_size=1, name="backlog-test")
    try:
        async with pool.connection() as conn:
            await conn.execute(
                """INSERT INTO webhooks.endpoints (id, tenant_id, url, enabled) VALUES
                   ('on', 't', 'https://a.example/h', true), ('off', 't', 'https://b.example/h', false)""")
            await conn.execute(
                """INSERT INTO webhooks.deliveries
                     (endpoint_id, tenant_id, webhook_id, dedupe_key, event_types, body, state, next_attempt_time,
                      ignore_disabled)
                   VALUES ('on', 't', 'w1', 'k1', '{}', '', 'pending', now() - interval '90 seconds', false),
                          ('on', 't', 'w2', 'k2', '{}', '', 'pending', now() - interval '10 seconds', false),
                          ('on', 't', 'w3', 'k3', '{}', '', 'pending', now() + interval '1 hour', false),
                          ('on', 't', 'w4', 'k4', '{}', '', 'delivered', now() - interval '1 hour', false),
                          ('off', 't', 'w5', 'k5', '{}', '', 'pending', now() - interval '1 day', false),
                          ('off', 't', 'w6', 'k6', '{}', '', 'pending', now() - interval '30 seconds', true)""")

        backlog = await measure_backlog(pool)
    finally:
        await pool.close()

    assert backlog.due == 3  # w1, w2 and the test event w6; not the retry later, the delivered, the parked
    assert 90 <= backlog.oldest_due_s < 120
    assert sample("esp_webhook_deliveries_due") == 3
    assert sample("esp_webhook_oldest_due_seconds") == backlog.oldest_due_s
