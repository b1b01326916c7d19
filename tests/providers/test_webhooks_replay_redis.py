"""The Redis replay guard, against the session's real Redis (``redis_url``; keys under a per-run prefix)."""

import asyncio
import json
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis

from dev.simulator.signing import sign_mailgun_payload
from libs.providers.webhook_model import ReplayedWebhook
from libs.providers.webhooks import RedisReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
SECRETS = {"webhook_signing_key": "key-redis-tests"}


@pytest.fixture
async def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        await client.ping()  # no Redis is a failure, never a skip
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def prefix(redis_client):
    prefix = f"test:webhook-replay:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await redis_client.delete(*keys)


async def test_first_sighting_is_new_and_the_second_is_a_replay(redis_client, prefix):
    guard = RedisReplayGuard(redis_client, key_prefix=prefix)

    assert await guard.seen("token:abc", 60) is False
    assert await guard.seen("token:abc", 60) is True


async def test_key_is_stored_with_the_requested_expiry(redis_client, prefix):
    guard = RedisReplayGuard(redis_client, key_prefix=prefix)

    await guard.seen("token:ttl", 90)

    assert 0 < await redis_client.ttl(f"{prefix}token:ttl") <= 90


async def test_forgotten_key_is_new_again(redis_client, prefix):
    guard = RedisReplayGuard(redis_client, key_prefix=prefix)
    await guard.seen("token:f", 60)

    await guard.forget("token:f")

    assert await guard.seen("token:f", 60) is False


async def test_concurrent_sightings_admit_exactly_one(redis_client, prefix):
    guard = RedisReplayGuard(redis_client, key_prefix=prefix)

    results = await asyncio.gather(*(guard.seen("token:race", 60) for _ in range(20)))

    assert results.count(False) == 1


async def test_two_receiver_replicas_share_replay_protection(redis_client, prefix):
    replica_a = WebhookVerifier(RedisReplayGuard(redis_client, key_prefix=prefix))
    replica_b = WebhookVerifier(RedisReplayGuard(redis_client, key_prefix=prefix))
    event_data = {
        "id": "e-redis",
        "event": "delivered",
        "timestamp": NOW.timestamp(),
        "recipient": "a@example.com",
        "message": {"headers": {"message-id": "r@mg.example.com"}},
    }
    callback = sign_mailgun_payload(
        event_data, SECRETS["webhook_signing_key"], timestamp=int(NOW.timestamp())
    )
    await replica_a.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await replica_b.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)
    assert 0 < await redis_client.ttl(f"{prefix}mailgun:token:{extract_token(callback.body)}") <= 15 * 60 + 1


def extract_token(body: bytes) -> str:
    return json.loads(body)["signature"]["token"]


def _callback(event_id: str) -> object:
    return sign_mailgun_payload({"id": event_id, "event": "delivered", "timestamp": NOW.timestamp(),
                                 "recipient": "a@example.com", "message": {"headers": {"message-id": "p@mg"}}},
                                SECRETS["webhook_signing_key"], timestamp=int(NOW.timestamp()))


async def test_a_pending_key_is_held_only_briefly_until_confirmed(redis_client, prefix):
    verifier = WebhookVerifier(RedisReplayGuard(redis_client, key_prefix=prefix))
    callback = _callback("e-pending")
    key = f"{prefix}mailgun:token:{extract_token(callback.body)}"

    await verifier.verify("mailgun", SECRETS, callback.headers, callback.body, NOW, pending_s=10)
    # A receiver killed now, before publishing, leaves a key that expires in seconds, not in the 15 minutes
    # of the freshness window: the provider's retry is accepted.
    assert 0 < await redis_client.ttl(key) <= 10

    await verifier.confirm("mailgun", SECRETS, callback.headers, callback.body, NOW)
    assert 10 < await redis_client.ttl(key) <= 15 * 60 + 1
    with pytest.raises(ReplayedWebhook):
        await verifier.verify("mailgun", SECRETS, callback.headers, callback.body, NOW, pending_s=10)
