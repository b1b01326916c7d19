"""Gateway fixtures: the contracts' descriptor set, a test-only echo descriptor set compiled here, a real
grpc.aio upstream of test doubles, and HTTP clients talking to the ASGI app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc_tools
import httpx
import pytest
from grpc_tools import protoc

from services.gateway.app import create_app
from services.gateway.transcoder import TranscoderOptions
from tests.gateway.upstream import Recorder, start_upstream

REPO = Path(__file__).resolve().parents[2]
ESP_DESCRIPTOR_SET = REPO / "gen" / "esp.binpb"
ECHO_PROTO_ROOT = Path(__file__).resolve().parent / "protos"


@pytest.fixture(scope="session")
def esp_descriptor_set() -> Path:
    if not ESP_DESCRIPTOR_SET.exists():
        pytest.fail(f"{ESP_DESCRIPTOR_SET} is missing: run `make proto` first")
    return ESP_DESCRIPTOR_SET


@pytest.fixture(scope="session")
def echo_descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/gateway/protos compiled with imports and source info, as `buf build` would."""
    output = tmp_path_factory.mktemp("echo") / "echo.binpb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    exit_code = protoc.main(
        [
            "protoc",
            f"-I{ECHO_PROTO_ROOT}",
            f"-I{REPO / 'third_party' / 'googleapis'}",
            f"-I{well_known}",
            f"--descriptor_set_out={output}",
            "--include_imports",
            "--include_source_info",
            "gatewaytest/v1/echo.proto",
        ]
    )
    if exit_code != 0:
        pytest.fail(f"protoc failed ({exit_code}) on the echo test proto")
    return output


@pytest.fixture(scope="session")
async def upstream(echo_descriptor_set: Path) -> AsyncIterator[tuple[int, Recorder]]:
    server, port, recorder = await start_upstream(echo_descriptor_set)
    yield port, recorder
    await server.stop(grace=None)


@pytest.fixture(scope="session")
def recorder(upstream: tuple[int, Recorder]) -> Recorder:
    return upstream[1]


ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture(scope="session")
async def make_client() -> AsyncIterator[ClientFactory]:
    """Factory: an HTTP client for a fresh gateway app (descriptor set, upstream address, options)."""
    apps = []
    clients: list[httpx.AsyncClient] = []

    def factory(
        descriptor_set: Path, upstream_addr: str, options: TranscoderOptions | None = None
    ) -> httpx.AsyncClient:
        app = create_app(descriptor_set, upstream_addr, options=options)
        apps.append(app)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()
    for app in apps:
        await app.state.transcoder.aclose()


@pytest.fixture(scope="session")
def esp_client(
    make_client: ClientFactory, esp_descriptor_set: Path, upstream: tuple[int, Recorder]
) -> httpx.AsyncClient:
    """The gateway over the real contracts (gen/esp.binpb), in front of the test doubles."""
    return make_client(esp_descriptor_set, f"127.0.0.1:{upstream[0]}")


@pytest.fixture(scope="session")
def echo_client(
    make_client: ClientFactory, echo_descriptor_set: Path, upstream: tuple[int, Recorder]
) -> httpx.AsyncClient:
    """The gateway over the echo test contract."""
    return make_client(echo_descriptor_set, f"127.0.0.1:{upstream[0]}")
