"""The sender tests' world made ready to sign: a sending-domains view the deliverer reads, and a real SMTP relay
as its one provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from libs.common.secret_box import SecretBox
from libs.common.sending_domains import SendingDomains, open_bucket
from libs.routing.catalog import ProviderSpec
from tests.sender.conftest import World

__all__ = ["add_relay", "sending_domains"]


@asynccontextmanager
async def sending_domains(world: World, namespace: str, box: SecretBox, *,
                          sandbox_domains: Iterable[str] = ()) -> AsyncIterator[SendingDomains]:
    """The sending-domains bucket of ``namespace`` watched (keys opened with ``box``) and handed to the world's
    deliverer while the context lasts."""
    view = SendingDomains(await open_bucket(world.js, namespace), box, sandbox_domains=sandbox_domains)
    stop = asyncio.Event()
    watcher = asyncio.create_task(view.run(stop))
    try:
        await view.wait_loaded()
        world.deliverer.domains = view
        yield view
    finally:
        world.deliverer.domains = None
        stop.set()
        await watcher


async def add_relay(world: World, endpoint: str, provider_id: str = "relay") -> None:
    """An SMTP provider (no TLS, no AUTH) at ``endpoint`` in the world's catalog; returns once the catalog has it."""
    spec = ProviderSpec(provider_id, "smtp", endpoint, {}, options={"tls": "none"})
    await world.catalog.kv.put(spec.id, spec.to_json())
    for _ in range(500):
        if world.catalog.providers.get(spec.id) == spec:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the catalog never served provider {provider_id}")
