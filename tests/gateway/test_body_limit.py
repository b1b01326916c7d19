"""The largest unary body the gateway takes is the largest message its upstream accepts: a larger one is refused
here with 413 (not retryable), instead of reaching ingest and coming back as RESOURCE_EXHAUSTED, a 429 that tells
clients to retry the same bytes forever."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from esp.v1 import messages_pb2_grpc

from libs.common.grpc_client import MAX_MESSAGE_BYTES
from libs.common.grpc_server import ServiceApp
from libs.common.settings import SettingsError
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig, load_config
from tests.gateway.upstream import MessageServiceDouble, Recorder
from tests.serving import served


@pytest.fixture
async def served_upstream() -> AsyncIterator[tuple[str, Recorder]]:
    """The MessageService double behind ``serve()``, so it takes the messages a mesh service takes."""
    recorder = Recorder()
    app = ServiceApp(name="upstream", default_port=0,
                     servicers=[(messages_pb2_grpc.add_MessageServiceServicer_to_server,
                                 MessageServiceDouble(recorder))],
                     service_names=["esp.v1.MessageService"])
    async with served(app, shutdown_grace_s=1) as (address, _):
        yield address, recorder


@pytest.fixture(params=["create_app defaults", "GatewayConfig defaults"])
async def gateway(request: pytest.FixtureRequest, esp_descriptor_set: Path,
                  served_upstream: tuple[str, Recorder]) -> AsyncIterator[httpx.AsyncClient]:
    addr, _ = served_upstream
    options = None if request.param == "create_app defaults" else GatewayConfig().transcoder_options()
    app = create_app(esp_descriptor_set, addr, options=options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        yield client
    await app.state.transcoder.aclose()


def send_body(size: int) -> bytes:
    """A SendEmail body of exactly ``size`` bytes (the subject fills it)."""
    empty = json.dumps({"subject": ""}).encode()
    return json.dumps({"subject": "s" * (size - len(empty))}).encode()


async def test_a_body_one_byte_over_the_upstreams_message_limit_is_413_and_not_retryable(gateway, served_upstream):
    _, recorder = served_upstream

    response = await gateway.post("/v1/messages:send", content=send_body(MAX_MESSAGE_BYTES + 1),
                                  headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["code"] == 8
    assert "Retry-After" not in response.headers
    assert "SendEmail" not in recorder.requests


async def test_a_body_at_the_limit_reaches_the_upstream_and_is_answered(gateway, served_upstream):
    _, recorder = served_upstream

    response = await gateway.post("/v1/messages:send", content=send_body(MAX_MESSAGE_BYTES),
                                  headers={"content-type": "application/json"})

    assert response.status_code == 200, response.text[:300]
    assert len(recorder.requests["SendEmail"].subject) > MAX_MESSAGE_BYTES - 100


def test_a_body_limit_above_what_the_upstream_accepts_is_a_bad_setting() -> None:
    with pytest.raises(SettingsError) as caught:
        load_config({"ESP_GATEWAY_MAX_BODY_BYTES": str(MAX_MESSAGE_BYTES + 1)})

    assert [problem.split(":")[0] for problem in caught.value.problems] == ["ESP_GATEWAY_MAX_BODY_BYTES"]
