"""Starting the simulator inside the current event loop (tests) or as a process (``python -m dev.simulator``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from dev.simulator.app import create_app
from dev.simulator.client import SimulatorClient
from dev.simulator.emitter import WebhookEmitter
from dev.simulator.model import Personality, default_personalities
from dev.simulator.smtp import self_signed_tls_context, smtp_factory, temporary_tls_directory
from dev.simulator.state import SimulatorState
from libs.providers.model import ProviderConfig


@dataclass
class RunningSimulator:
    """A simulator that is up: where it listens, its state, and an admin client."""

    http_url: str
    smtp_host: str
    smtp_port: int
    state: SimulatorState
    emitter: WebhookEmitter
    client: SimulatorClient

    def provider_config(self, personality: str, **overrides: Any) -> ProviderConfig:
        """A ``ProviderConfig`` for the adapter matching ``personality``, pointed at this simulator."""
        return self.state.personality(personality).provider_config(
            self.http_url, self.smtp_host, self.smtp_port, **overrides
        )

    def describe(self) -> dict[str, Any]:
        """What the CLI prints once ready."""
        return {
            "http_url": self.http_url,
            "smtp_host": self.smtp_host,
            "smtp_port": self.smtp_port,
            "personalities": {
                name: {"type": p.type, "endpoint": self.provider_config(name).endpoint}
                for name, p in self.state.personalities.items()
            },
        }


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def run_simulator(
    *,
    personalities: Iterable[Personality] | None = None,
    host: str = "127.0.0.1",
    http_port: int = 0,
    smtp_port: int = 0,
    seed: int | None = None,
    log_cap: int = 10_000,
) -> AsyncIterator[RunningSimulator]:
    """Run the HTTP app (uvicorn) and the SMTP server in this event loop; port 0 picks free ports."""
    state = SimulatorState(personalities or default_personalities(), seed=seed, log_cap=log_cap)
    emitter = WebhookEmitter(state)
    await emitter.start()
    http_socket = _listening_socket(host, http_port)
    config = uvicorn.Config(
        create_app(state, emitter), log_level="warning", lifespan="off", access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    server_task = asyncio.create_task(server.serve(sockets=[http_socket]), name="simulator-http")
    with temporary_tls_directory() as tls_directory:
        tls_context = self_signed_tls_context(Path(tls_directory))
        loop = asyncio.get_running_loop()
        smtp_server = await loop.create_server(lambda: smtp_factory(state, emitter, tls_context), host, smtp_port)
        client: SimulatorClient | None = None
        try:
            for _ in range(500):  # bounded wait for uvicorn's startup (≈ 5 s)
                if server.started or server_task.done():
                    break
                await asyncio.sleep(0.01)
            if not server.started:
                if server_task.done():
                    server_task.result()
                raise RuntimeError("the simulator's HTTP server did not start")
            http_address = http_socket.getsockname()
            smtp_address = smtp_server.sockets[0].getsockname()
            http_url = f"http://{http_address[0]}:{http_address[1]}"
            client = SimulatorClient(http_url)
            yield RunningSimulator(http_url, smtp_address[0], smtp_address[1], state, emitter, client)
        finally:
            state.release_hangs()
            if client is not None:
                await client.aclose()
            smtp_server.close()
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await server_task
            http_socket.close()
            await emitter.aclose()
            await smtp_server.wait_closed()
