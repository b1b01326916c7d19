"""How a background loop pauses between rounds: until its next round is due, or until it is asked to stop."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = [
    "pause_unless_stopped",
]


async def pause_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less: return as soon as ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
