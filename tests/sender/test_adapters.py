"""One live adapter per provider: ready as soon as the provider appears, replaced when it changes, and every
retired adapter closed — after a grace period, or at once when the pool closes."""

from __future__ import annotations

import asyncio
from typing import Any

from services.sender.adapters import AdapterPool
from tests.sender.conftest import World


def closed(adapter: Any) -> bool:
    return bool(adapter._client.is_closed)


async def test_a_new_provider_has_its_adapter_ready_before_any_email(world: World):
    await world.add_provider("pm", "postmark-1")

    assert "pm" in world.adapters._adapters


async def test_a_changed_provider_gets_a_new_adapter_and_the_old_one_closes_after_its_grace(world: World):
    pool = AdapterPool(world.catalog, retire_grace_s=0.1)
    await world.add_provider("pm", "postmark-1")
    old = pool.get("pm")

    await world.add_provider("pm", "postmark-1", version=2, price_per_email_micros=7)

    assert pool.get("pm") is not old
    assert not closed(old)  # sends already under way with it may finish
    await asyncio.sleep(0.3)
    assert closed(old) and pool.retiring == 0
    await pool.aclose()


async def test_closing_the_pool_closes_retired_adapters_at_once(world: World):
    pool = AdapterPool(world.catalog, retire_grace_s=60)
    await world.add_provider("pm", "postmark-1")
    old = pool.get("pm")
    await world.add_provider("pm", "postmark-1", version=2)
    current = pool.get("pm")

    await pool.aclose()

    assert closed(old) and closed(current)


async def test_a_removed_provider_has_its_adapter_retired(world: World):
    pool = AdapterPool(world.catalog, retire_grace_s=0.05)
    await world.add_provider("pm", "postmark-1")
    adapter = pool.get("pm")

    await world.catalog.kv.delete("pm")
    for _ in range(100):
        if "pm" not in world.catalog.providers:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)

    assert closed(adapter)
    await pool.aclose()
