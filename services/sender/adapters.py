"""One live adapter per provider, rebuilt when its configuration changes and closed when it goes away."""

from __future__ import annotations

import asyncio
import logging

from libs.providers.base import ProviderAdapter, ProviderConfig
from libs.providers.registry import create_adapter
from libs.routing.catalog import ProviderCatalog, ProviderSpec

log = logging.getLogger(__name__)


def config_of(spec: ProviderSpec) -> ProviderConfig:
    timeout = float(spec.options.get("timeout_s", "10"))
    return ProviderConfig(name=spec.id, type=spec.type, endpoint=spec.endpoint, credentials=dict(spec.credentials),
                          region=spec.region, options=dict(spec.options), timeout_s=timeout)


class AdapterPool:
    """Adapters keyed by provider id; a spec change (new version) or removal retires the old adapter."""

    def __init__(self, catalog: ProviderCatalog) -> None:
        self.catalog = catalog
        self._adapters: dict[str, tuple[int, ProviderAdapter]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        catalog.on_change(self._changed)

    def get(self, provider_id: str) -> ProviderAdapter:
        spec = self.catalog.providers[provider_id]
        current = self._adapters.get(provider_id)
        if current is not None and current[0] == spec.version:
            return current[1]
        adapter = create_adapter(config_of(spec))
        self._adapters[provider_id] = (spec.version, adapter)
        if current is not None:
            self._retire(current[1])
        return adapter

    def _changed(self, provider_id: str, spec: ProviderSpec | None) -> None:
        current = self._adapters.get(provider_id)
        if current is not None and (spec is None or spec.version != current[0]):
            del self._adapters[provider_id]
            self._retire(current[1])

    def _retire(self, adapter: ProviderAdapter) -> None:
        async def close_later() -> None:
            await asyncio.sleep(30)  # sends already under way with it finish first
            await adapter.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def aclose(self) -> None:
        for task in list(self._retired):
            task.cancel()
        for _version, adapter in self._adapters.values():
            try:
                await adapter.aclose()
            except Exception:
                log.warning("closing adapter failed", exc_info=True)
        self._adapters.clear()
