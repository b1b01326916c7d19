"""Reports' lookup of provider webhook secrets (services.reports.provider_secrets): from the provider catalog the
router broadcasts over a real JetStream KV bucket, sealed there, opened with ESP_SECRETS_KEYS, changes applied within
2 s."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from nats.js.kv import KeyValue

from libs.common.secret_box import SecretBox, generate_key_setting
from libs.routing.catalog import ProviderCatalog, ProviderSpec, bucket_name, open_bucket
from services.reports.provider_secrets import ProviderWebhookSecrets, open_provider_webhook_secrets
from services.reports.webhook_receiver import ProviderWebhookConfig

KEY = {"webhook_signing_key": "key-0123456789abcdef-provider-secrets"}


@dataclass
class Lookup:
    kv: KeyValue
    box: SecretBox
    secrets: ProviderWebhookSecrets
    namespace: str


@pytest.fixture
async def lookup(nats_url: str, run_id: str) -> AsyncIterator[Lookup]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    namespace = f"{run_id}ps{secrets.token_hex(3)}"
    box = SecretBox.from_setting(generate_key_setting())
    kv = await open_bucket(js, namespace)
    lookup = await open_provider_webhook_secrets(js, namespace, box)
    stop = asyncio.Event()
    watcher = asyncio.create_task(lookup.run(stop))
    try:
        yield Lookup(kv, box, lookup, namespace)
    finally:
        stop.set()
        await watcher
        await js.delete_key_value(bucket_name(namespace))
        await nc.close()


def mailgun(name: str, **fields: object) -> ProviderSpec:
    values: dict[str, object] = {"type": "mailgun", "endpoint": "http://127.0.0.1:9/p/x",
                                 "credentials": {"api_key": "api-key-secret-42"}, "webhook_secrets": KEY}
    values.update(fields)
    return ProviderSpec(name, **values)  # type: ignore[arg-type]


async def _until(lookup: Lookup, name: str, expected: ProviderWebhookConfig | None, within_s: float = 2.0) -> float:
    """Seconds until ``get(name)`` answers ``expected``; fails past ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if await lookup.secrets.get(name) == expected:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    got = await lookup.secrets.get(name)
    raise AssertionError(f"{name}: {expected!r} not applied within {within_s}s (got {got!r})")


async def test_the_sealed_secrets_the_router_broadcasts_are_opened(lookup: Lookup):
    raw = mailgun("mg-a").to_json(lookup.box)
    assert KEY["webhook_signing_key"].encode() not in raw

    await lookup.kv.put("mg-a", raw)

    await _until(lookup, "mg-a", ProviderWebhookConfig("mg-a", "mailgun", KEY))


async def test_a_rotated_secret_and_a_removal_apply_within_two_seconds(lookup: Lookup):
    await lookup.kv.put("mg-a", mailgun("mg-a").to_json(lookup.box))
    await _until(lookup, "mg-a", ProviderWebhookConfig("mg-a", "mailgun", KEY))

    rotated = {"webhook_signing_key": "key-rotated-fedcba9876543210"}
    await lookup.kv.put("mg-a", mailgun("mg-a", webhook_secrets=rotated, version=2).to_json(lookup.box))
    assert await _until(lookup, "mg-a", ProviderWebhookConfig("mg-a", "mailgun", rotated)) < 2.0

    await lookup.kv.delete("mg-a")
    assert await _until(lookup, "mg-a", None) < 2.0


async def test_unknown_providers_and_providers_without_webhook_secrets_have_none(lookup: Lookup):
    await lookup.kv.put("mg-quiet", mailgun("mg-quiet", webhook_secrets={}).to_json(lookup.box))
    await lookup.kv.put("mg-b", mailgun("mg-b").to_json(lookup.box))
    await _until(lookup, "mg-b", ProviderWebhookConfig("mg-b", "mailgun", KEY))

    assert await lookup.secrets.get("mg-quiet") is None
    assert await lookup.secrets.get("no-such-provider") is None


async def test_secrets_this_replica_cannot_open_answer_as_misconfigured_not_unknown(lookup: Lookup):
    other_key = SecretBox.from_setting(generate_key_setting())
    await lookup.kv.put("mg-other", mailgun("mg-other").to_json(other_key))

    # Empty secrets: the verifier refuses with WebhookConfigurationError (500, the provider retries), not 404.
    await _until(lookup, "mg-other", ProviderWebhookConfig("mg-other", "mailgun", {}))


async def test_a_lookup_waits_for_the_catalogs_first_load(nats_url: str, run_id: str):
    nc = await nats.connect(nats_url)
    namespace = f"{run_id}ps{secrets.token_hex(3)}"
    try:
        kv = await open_bucket(nc.jetstream(), namespace)
        await kv.put("mg-a", mailgun("mg-a").to_json())
        not_watching = ProviderWebhookSecrets(ProviderCatalog(kv), load_timeout_s=0.2)
        with pytest.raises(TimeoutError):
            await not_watching.get("mg-a")
    finally:
        await nc.jetstream().delete_key_value(bucket_name(namespace))
        await nc.close()
