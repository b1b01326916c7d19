"""One live adapter per provider, rebuilt when its registry entry changes and closed when it goes away.

Adapters are built as soon as the catalog shows a provider (building one costs tens of milliseconds: an HTTP
client, a TLS context), so the first email a provider gets — often an OTP falling over to it — does not wait
for that. A retired adapter (its provider changed or was removed) is closed after a grace period, so the sends already
under way with it finish first; closing the pool closes every adapter at once, retired ones included.

The catalog opens each provider's sealed credentials with ``ESP_SECRETS_KEYS``; a provider whose credentials it
could not open gets no adapter (``AdapterConfigError`` naming the setting, never the secret).
"""

from __future__ import annotations

import asyncio
import logging

from libs.providers.base import ProviderAdapter
from libs.providers.errors import AdapterConfigError
from libs.providers.registry import create_adapter
from libs.routing.catalog import ProviderCatalog, ProviderSpec, provider_config

log = logging.getLogger(__name__)

RETIRE_GRACE_S = 30.0


class AdapterPool:
    """Adapters keyed by provider id; a spec change (new version) or removal retires the old adapter."""

    def __init__(self, catalog: ProviderCatalog, *, retire_grace_s: float = RETIRE_GRACE_S) -> None:
        self.catalog = catalog
        self.retire_grace_s = retire_grace_s
        self._adapters: dict[str, tuple[int, ProviderAdapter]] = {}
        self._retiring: dict[asyncio.Task[None], ProviderAdapter] = {}
        catalog.on_change(self._changed)

    def get(self, provider_id: str) -> ProviderAdapter:
        """The provider's adapter for its current registry entry; ``KeyError`` if the provider is gone,
        ``AdapterConfigError`` if its entry cannot make an adapter."""
        spec = self.catalog.providers[provider_id]
        current = self._adapters.get(provider_id)
        if current is not None and current[0] == spec.version:
            return current[1]
        if spec.sealed_credentials and not spec.credentials:
            raise AdapterConfigError(f"provider {provider_id}: its credentials are sealed and ESP_SECRETS_KEYS does "
                                     "not open them (unset, or without the key that sealed them)")
        adapter = create_adapter(provider_config(spec))
        self._adapters[provider_id] = (spec.version, adapter)
        if current is not None:
            self._retire(current[1])
        return adapter

    @property
    def retiring(self) -> int:
        """Adapters waiting out their grace period before being closed."""
        return len(self._retiring)

    def _changed(self, provider_id: str, spec: ProviderSpec | None) -> None:
        current = self._adapters.get(provider_id)
        if current is not None and (spec is None or spec.version != current[0]):
            del self._adapters[provider_id]
            self._retire(current[1])
        if spec is not None and provider_id not in self._adapters:
            try:
                self.get(provider_id)
            except Exception:  # a broken entry fails again, and is reported, when an email is routed to it
                log.warning("building the adapter of a new provider failed", exc_info=True,
                            extra={"provider": provider_id})

    def _retire(self, adapter: ProviderAdapter) -> None:
        async def close_later() -> None:
            await asyncio.sleep(self.retire_grace_s)
            await _close(adapter)

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring[task] = adapter
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def aclose(self) -> None:
        """Close every adapter now, including the retired ones still in their grace period."""
        retiring = list(self._retiring.items())
        self._retiring.clear()
        for task, adapter in retiring:
            task.cancel()
            await _close(adapter)
        for _version, adapter in self._adapters.values():
            await _close(adapter)
        self._adapters.clear()


async def _close(adapter: ProviderAdapter) -> None:
    try:
        await adapter.aclose()
    except Exception:
        log.warning("closing a provider adapter failed", exc_info=True)
