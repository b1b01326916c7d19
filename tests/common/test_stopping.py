"""A background loop's pause ends when its round is due or as soon as it is asked to stop."""

from __future__ import annotations

import asyncio

from libs.common.stopping import pause_unless_stopped


async def test_a_pause_lasts_its_seconds_when_nobody_stops_the_loop() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pause_unless_stopped(asyncio.Event(), 0.05)
    assert loop.time() - started >= 0.05


async def test_a_pause_ends_as_soon_as_stop_is_set() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, stop.set)
    pausing = asyncio.create_task(pause_unless_stopped(stop, 60))
    await asyncio.wait_for(pausing, 5)  # would time out if the pause ran its 60 s
    assert stop.is_set()
