"""The application around the transcoder: health, the OpenAPI endpoint, settings and the entry point."""

import asyncio
import os
import sys

import httpx
import pytest

from libs.common.settings import SettingsError
from services.gateway.config import GatewayConfig, load_config
from tests.conftest import free_port
from tests.gateway.conftest import REPO


async def test_healthz_answers_ok(esp_client):
    response = await esp_client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_openapi_json_serves_the_generated_document(esp_client):
    response = await esp_client.get("/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.0")
    assert "/v1/messages:send" in document["paths"]


def test_settings_default_to_the_local_mesh():
    config = load_config({})

    assert config == GatewayConfig()
    assert (config.gateway_port, config.ingest_addr, config.descriptor_set) == (
        8080,
        "127.0.0.1:50051",
        "gen/esp.binpb",
    )


def test_settings_are_read_from_esp_variables():
    config = load_config(
        {
            "ESP_GATEWAY_PORT": "9090",
            "ESP_INGEST_ADDR": "ingest:50051",
            "ESP_DESCRIPTOR_SET": "/etc/esp.binpb",
            "ESP_GATEWAY_EMIT_UNPOPULATED": "true",
        }
    )

    assert config.gateway_port == 9090
    assert config.ingest_addr == "ingest:50051"
    assert config.transcoder_options().emit_unpopulated is True


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(SettingsError) as caught:
        load_config({"ESP_GATEWAY_PORT": "eighty", "ESP_GATEWAY_EMIT_UNPOPULATED": "maybe"})

    assert {problem.split(":")[0] for problem in caught.value.problems} == {
        "ESP_GATEWAY_PORT",
        "ESP_GATEWAY_EMIT_UNPOPULATED",
    }


async def wait_until_listening(port: int, process: asyncio.subprocess.Process, log_path) -> None:
    for _ in range(200):  # about 20 s
        if process.returncode is not None:
            pytest.fail(f"the gateway exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    pytest.fail(f"the gateway never listened on {port}: {log_path.read_text()[-2000:]}")


async def test_the_entry_point_serves_the_api_from_its_environment(upstream, esp_descriptor_set, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "ESP_GATEWAY_HOST": "127.0.0.1",
        "ESP_GATEWAY_PORT": str(port),
        "ESP_INGEST_ADDR": f"127.0.0.1:{upstream[0]}",
        "ESP_DESCRIPTOR_SET": str(esp_descriptor_set),
    }
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        await wait_until_listening(port, process, log_path)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = await client.get("/healthz")
            message = await client.get("/v1/messages/m-5")
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()

    assert health.status_code == 200
    assert message.json() == {"name": "messages/m-5"}
