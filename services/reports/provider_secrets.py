"""Each provider instance's webhook type and signing secrets, as the webhook receiver needs them, from the provider
catalog the router broadcasts (the JetStream KV bucket every replica watches).

The platform team sets a provider's webhook secrets with the router's admin RPCs (``Provider.webhook_secrets``,
write-only); the router seals them with ``ESP_SECRETS_KEYS`` before they reach Postgres or the bucket, and this
catalog opens them in memory with the same keys. A change reaches every reports replica within milliseconds of its
commit (at worst the router's repair loop re-broadcasts it within ``ESP_REGISTRY_RESYNC_S``), so a rotated secret
verifies the next callback: no SQL, no cache to expire.

A provider whose secrets this replica cannot open (``ESP_SECRETS_KEYS`` unset, or without the key that sealed
them) is answered as misconfigured (500: the provider retries) rather than unknown (404).
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext

from libs.common.secret_box import SecretBox
from libs.routing.catalog import ProviderCatalog, open_bucket
from services.reports.webhook_receiver import ProviderWebhookConfig

__all__ = ["ProviderWebhookSecrets", "open_provider_webhook_secrets"]

log = logging.getLogger(__name__)


class ProviderWebhookSecrets:
    """``get(provider_name)`` over a :class:`~libs.routing.catalog.ProviderCatalog` (the receiver's
    ``WebhookSecretsStore``); :meth:`run` keeps the catalog current."""

    def __init__(self, catalog: ProviderCatalog, *, load_timeout_s: float = 10.0) -> None:
        self._catalog = catalog
        self._load_timeout_s = load_timeout_s
        self._warned: set[tuple[str, int]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the provider bucket until ``stop`` (a task of the service)."""
        await self._catalog.run(stop)

    async def get(self, provider_name: str) -> ProviderWebhookConfig | None:
        """The webhook settings of ``provider_name``; None when there is no such provider or it has no webhook
        secrets. Waits for the catalog's first load (``TimeoutError`` after ``load_timeout_s``: the request fails
        and the provider retries it)."""
        await self._catalog.wait_loaded(self._load_timeout_s)
        spec = self._catalog.providers.get(provider_name)
        if spec is None:
            return None
        if spec.sealed_webhook_secrets and not spec.webhook_secrets:
            if (spec.id, spec.version) not in self._warned:
                self._warned.add((spec.id, spec.version))
                log.error("a provider's webhook secrets are sealed and ESP_SECRETS_KEYS does not open them",
                          extra={"provider": spec.id})
            return ProviderWebhookConfig(spec.id, spec.type, {})
        if not spec.webhook_secrets:
            return None
        return ProviderWebhookConfig(spec.id, spec.type, dict(spec.webhook_secrets))


async def open_provider_webhook_secrets(js: JetStreamContext, namespace: str,
                                        secrets: SecretBox | None) -> ProviderWebhookSecrets:
    """The lookup over the mesh's provider bucket (created when missing), opening sealed secrets with ``secrets``."""
    return ProviderWebhookSecrets(ProviderCatalog(await open_bucket(js, namespace), secrets))
