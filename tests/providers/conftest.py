"""Fixtures for the provider adapter tests: one in-process simulator for the session, adapters pointed at it.

``simulator`` — a ``RunningSimulator`` (HTTP + SMTP on free loopback ports) shared by the session.
``sim`` — the same, reset (requests, counters, knobs) before the test.
``provider_type`` — parametrises a test over the five adapter types.
``make_adapter`` — builds adapters for ``provider_type``'s personality (with config overrides) and closes them.
``webhook_sink`` — an HTTP server that records the webhook callbacks the simulator sends it.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dev.simulator import RunningSimulator, run_simulator
from libs.providers.base import BaseAdapter
from libs.providers.model import Address, Attachment, OutboundEmail
from libs.providers.registry import create_adapter

#: The simulator personality each adapter type is tested against.
PERSONALITY_FOR = {
    "mailgun": "mailgun-us",
    "postmark": "postmark-1",
    "sendgrid": "sendgrid-1",
    "ses": "ses-1",
    "smtp": "smtp-1",
}


@pytest.fixture(scope="session")
async def simulator() -> AsyncIterator[RunningSimulator]:
    """The provider simulator, started once for the session and stopped at its end."""
    async with run_simulator(seed=1234) as running:
        yield running


@pytest.fixture
async def sim(simulator: RunningSimulator) -> RunningSimulator:
    """The simulator with nothing recorded and every knob at its initial value."""
    await simulator.client.reset()
    return simulator


@pytest.fixture(params=sorted(PERSONALITY_FOR))
def provider_type(request: pytest.FixtureRequest) -> str:
    """Each adapter type in turn."""
    return str(request.param)


@pytest.fixture
def personality(provider_type: str) -> str:
    """The simulator personality for ``provider_type``."""
    return PERSONALITY_FOR[provider_type]


@pytest.fixture
async def make_adapter(sim: RunningSimulator, personality: str) -> AsyncIterator[Callable[..., BaseAdapter]]:
    """Factory: ``make_adapter(**config_overrides)`` → an adapter for the personality; all closed afterwards."""
    adapters: list[BaseAdapter] = []

    def make(**overrides: Any) -> BaseAdapter:
        adapter = create_adapter(sim.provider_config(personality, **overrides))
        assert isinstance(adapter, BaseAdapter)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.aclose()


def new_email(**fields: Any) -> OutboundEmail:
    """An email with sensible defaults and a fresh message id; ``fields`` override any of them."""
    values: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "tenant_id": "tenant-1",
        "message_class": "transactional",
        "sender": Address("sender@example.com", "Example Sender"),
        "to": (Address("alice@example.org", "Alice"),),
        "subject": "Your receipt",
        "text": "Thank you for your order.",
        "html": "<p>Thank you for your order.</p>",
    }
    values.update(fields)
    return OutboundEmail(**values)


@pytest.fixture
def email_factory() -> Callable[..., OutboundEmail]:
    """``new_email`` as a fixture."""
    return new_email


def exploding_attachment(size: int) -> Attachment:
    """An attachment that fails the test if anything reads its bytes."""

    def chunks() -> Iterator[bytes]:
        raise AssertionError("attachment bytes were read although the message should be refused first")

    return Attachment("huge.bin", "application/octet-stream", size, chunks)  # type: ignore[arg-type]


@dataclass
class CapturedRequest:
    """A request the webhook sink received."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookSink:
    """A tiny HTTP server standing in for our webhook receiver; it records what it is sent."""

    url: str
    received: list[CapturedRequest] = field(default_factory=list)

    async def wait_for(self, count: int, *, timeout_s: float = 10.0) -> list[CapturedRequest]:
        """The first ``count`` requests, waiting for them (bounded) to arrive."""
        for _ in range(int(timeout_s / 0.02)):
            if len(self.received) >= count:
                return self.received[:count]
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {count} webhook requests, got {len(self.received)}")


@pytest.fixture(scope="session")
async def webhook_sink_server() -> AsyncIterator[WebhookSink]:
    """The sink, started once for the session on a free loopback port."""
    sink = WebhookSink(url="")

    async def capture(request: Request) -> Response:
        sink.received.append(
            CapturedRequest(request.url.path, {k.lower(): v for k, v in request.headers.items()}, await request.body())
        )
        return Response(status_code=200)

    app = Starlette(routes=[Route("/{path:path}", capture, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        sock.close()
        pytest.fail("the webhook sink did not start")
    sink.url = f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks"
    yield sink
    server.should_exit = True
    await task
    sock.close()


@pytest.fixture
def webhook_sink(webhook_sink_server: WebhookSink) -> WebhookSink:
    """The sink with nothing received yet."""
    webhook_sink_server.received.clear()
    return webhook_sink_server
