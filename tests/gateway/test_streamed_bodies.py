"""Server-streaming ``google.api.HttpBody`` RPCs over HTTP (the CSV exports): the gateway served by a real uvicorn on
a loopback port, in front of a real grpc.aio upstream whose ExportEvents is a test double driven by the request's
``tag`` (what to do) — so chunking, flow and a connection cut off mid-stream are seen as a client sees them."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc_tools
import httpx
import pytest
import uvicorn
from esp.v1 import events_pb2, events_pb2_grpc
from google.api.httpbody_pb2 import HttpBody
from grpc_tools import protoc

from services.gateway.app import create_app
from services.gateway.descriptors import load_descriptor_set
from services.gateway.openapi import build_openapi
from services.gateway.transcoder import Transcoder

CSV = "text/csv; charset=utf-8"
LINES_PER_CHUNK = 2000
BIG_CHUNKS = 200  # ~9 MB: far more than any buffer on the way


def _line(number: int) -> bytes:
    return f"{number:010d},row number {number},some padding to make rows longer\r\n".encode()


class ExportDouble(events_pb2_grpc.EventServiceServicer):
    """ExportEvents answering as ``tag`` says: big, gated, fail-before, fail-after, empty."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.requests: list[events_pb2.ExportEventsRequest] = []

    async def ExportEvents(self, request: events_pb2.ExportEventsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[HttpBody]:
        self.requests.append(request)
        if request.tag == "fail-before":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "end_time must be after start_time")
        if request.tag == "empty":
            return
        await context.send_initial_metadata((("content-disposition", 'attachment; filename="events.csv"'),))
        finished = False
        try:
            yield HttpBody(content_type=CSV, data=b"number,text,padding\r\n")
            for chunk in range(BIG_CHUNKS):
                if request.tag == "gated" and chunk == 1:
                    # A gateway that buffered the body would never let the client see the first bytes.
                    await asyncio.wait_for(self.gate.wait(), timeout=10)
                if request.tag == "fail-after" and chunk == 3:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "database went away")
                if request.tag == "endless" and chunk == BIG_CHUNKS - 1:
                    await asyncio.sleep(30)
                first = chunk * LINES_PER_CHUNK
                # The content type of later messages is ignored (grpc-gateway takes the first message's).
                yield HttpBody(content_type="application/x-ignored",
                               data=b"".join(_line(n) for n in range(first, first + LINES_PER_CHUNK)))
            finished = True
        finally:
            if not finished:  # closed early: the call was cancelled (or failed, which the tests tell apart)
                self.cancelled.set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def served(esp_descriptor_set: Path) -> AsyncIterator[tuple[str, ExportDouble]]:
    """(gateway base URL, the upstream double): a grpc.aio upstream and the gateway under uvicorn."""
    double = ExportDouble()
    server = grpc.aio.server()
    events_pb2_grpc.add_EventServiceServicer_to_server(double, server)
    upstream_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = create_app(esp_descriptor_set, f"127.0.0.1:{upstream_port}")
    port = _free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                         lifespan="on"))
    serving = asyncio.create_task(http.serve())
    for _ in range(200):
        if http.started:
            break
        await asyncio.sleep(0.02)
    assert http.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", double
    http.should_exit = True
    await serving
    await server.stop(grace=None)


def _query(tag: str) -> dict[str, str]:
    return {"startTime": "2024-03-01T00:00:00Z", "endTime": "2024-03-02T00:00:00Z", "tag": tag}


async def test_a_large_body_arrives_complete_in_order_in_many_chunks(served: tuple[str, ExportDouble]) -> None:
    base, double = served
    received: list[bytes] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with client.stream("GET", "/v1/events:export", params=_query("big")) as response:
            assert response.status_code == 200
            headers = response.headers
            async for chunk in response.aiter_raw():
                received.append(chunk)

    assert headers["content-type"] == CSV  # the first message's, verbatim
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert headers["content-disposition"] == 'attachment; filename="events.csv"'
    body = b"".join(received)
    expected = b"number,text,padding\r\n" + b"".join(_line(n) for n in range(BIG_CHUNKS * LINES_PER_CHUNK))
    assert len(body) == len(expected) and body == expected
    assert len(received) > 10  # it came as it was made, not as one buffer
    request = double.requests[-1]
    assert request.start_time.ToJsonString() == "2024-03-01T00:00:00Z"
    assert request.tag == "big"


async def test_the_first_bytes_reach_the_client_before_the_upstream_has_finished(
        served: tuple[str, ExportDouble]) -> None:
    base, double = served
    double.gate.clear()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with client.stream("GET", "/v1/events:export", params=_query("gated")) as response:
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), timeout=10)
            double.gate.set()  # the upstream goes on only now
            rest = b"".join([chunk async for chunk in chunks])
    assert first.startswith(b"number,text,padding\r\n")
    assert (first + rest).endswith(_line(BIG_CHUNKS * LINES_PER_CHUNK - 1))


async def test_an_error_before_the_first_message_is_a_status_with_its_http_status(
        served: tuple[str, ExportDouble]) -> None:
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.get("/v1/events:export", params=_query("fail-before"))

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": 3, "message": "end_time must be after start_time"}


async def test_an_error_mid_stream_cuts_the_response_off(served: tuple[str, ExportDouble],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    base, _ = served
    received = bytearray()
    with caplog.at_level(logging.ERROR, logger="services.gateway.transcoder"):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async with client.stream("GET", "/v1/events:export", params=_query("fail-after")) as response:
                assert response.status_code == 200
                # No clean end: the connection closes without the terminating chunk.
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                    async for chunk in response.aiter_raw():
                        received += chunk

    assert received.startswith(b"number,text,padding\r\n")
    assert len(received) == len(b"number,text,padding\r\n") + sum(len(_line(n)) for n in range(3 * LINES_PER_CHUNK))
    assert any("UNAVAILABLE: database went away" in r.getMessage() and "cutting the response off" in r.getMessage()
               for r in caplog.records)


async def test_a_stream_without_messages_is_an_empty_200(served: tuple[str, ExportDouble]) -> None:
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.get("/v1/events:export", params=_query("empty"))
    assert response.status_code == 200
    assert response.content == b""


async def test_a_client_that_leaves_cancels_the_upstream_call(served: tuple[str, ExportDouble]) -> None:
    base, double = served
    double.cancelled.clear()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with client.stream("GET", "/v1/events:export", params=_query("endless")) as response:
            await anext(response.aiter_raw())
        # Leaving the block closes the connection before the body ended.
    await asyncio.wait_for(double.cancelled.wait(), timeout=10)


STREAMS_PROTO = """
syntax = "proto3";
package streamtest.v1;
import "google/api/annotations.proto";
import "google/api/httpbody.proto";
service Streams {
  // Raw bytes of any type.
  rpc Download(Req) returns (stream google.api.HttpBody) { option (google.api.http) = {get: "/v1/download"}; }
  rpc Ticks(Req) returns (stream Tick) { option (google.api.http) = {get: "/v1/ticks"}; }
  rpc Echo(stream google.api.HttpBody) returns (stream google.api.HttpBody) {
    option (google.api.http) = {post: "/v1/echo" body: "*"};
  }
}
message Req { string id = 1; }
message Tick { int64 n = 1; }
"""


@pytest.fixture(scope="module")
def streams_descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streams")
    (root / "streamtest").mkdir()
    (root / "streamtest" / "streams.proto").write_text(STREAMS_PROTO)
    output = root / "streams.binpb"
    repo = Path(__file__).resolve().parents[2]
    exit_code = protoc.main(["protoc", f"-I{root}", f"-I{repo / 'third_party' / 'googleapis'}",
                             f"-I{Path(grpc_tools.__file__).parent / '_proto'}", f"--descriptor_set_out={output}",
                             "--include_imports", "--include_source_info", "streamtest/streams.proto"])
    assert exit_code == 0
    return output


def test_only_server_streams_of_http_bodies_are_served(streams_descriptor_set: Path) -> None:
    transcoder = Transcoder(load_descriptor_set(streams_descriptor_set), "127.0.0.1:1")
    assert [b.method.name for b in transcoder.bindings] == ["Download"]


def test_openapi_documents_a_streamed_body_as_raw_bytes(streams_descriptor_set: Path,
                                                        esp_descriptor_set: Path) -> None:
    generic = build_openapi(load_descriptor_set(streams_descriptor_set))
    assert list(generic["paths"]) == ["/v1/download"]
    ok: dict[str, Any] = generic["paths"]["/v1/download"]["get"]["responses"]["200"]
    assert ok["content"] == {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    assert "first message" in ok["description"] and "cuts the response off" in ok["description"]

    esp = build_openapi(load_descriptor_set(esp_descriptor_set))
    for path in ("/v1/events:export", "/v1/stats:export"):
        operation = esp["paths"][path]["get"]
        assert operation["responses"]["200"]["content"] == {"text/csv": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}
        assert operation["responses"]["default"]["content"]["application/json"]
    names = [p["name"] for p in esp["paths"]["/v1/stats:export"]["get"]["parameters"]]
    assert "query.startTime" in names and "query.dimensions" in names
