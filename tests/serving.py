"""A service app run by the real ``serve()`` in the test's event loop, for tests of the shared server plumbing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libs.common.grpc_server import ServiceApp, serve
from libs.common.settings import CommonSettings
from tests.conftest import free_port


@asynccontextmanager
async def served(app: ServiceApp, *, shutdown_grace_s: float = 5.0) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """``app`` serving on a free loopback port: yields its address and the event that stops it (set on exit, and
    the server awaited)."""
    port = free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(app, CommonSettings(grpc_port=port, shutdown_grace_s=shutdown_grace_s),
                                     ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield f"127.0.0.1:{port}", stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
