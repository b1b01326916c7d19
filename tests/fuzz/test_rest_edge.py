"""The REST facade against the bodies a fuzzer of JSON would send: deep nesting, invalid UTF-8, header injection and
sizes past what the gRPC edge accepts. Each is a 4xx ``google.rpc.Status`` naming the problem, never a 5xx (that
nothing is written by a refused send is checked on the gRPC edge, test_grpc_edge.py, which the gateway calls)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import RunningMesh

MIB = 1024 * 1024


def send_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestId": secrets.token_hex(8),
        "messageClass": "MESSAGE_CLASS_TRANSACTIONAL",
        "from": {"email": "shop@example.com"},
        "to": [{"email": "ada@example.com"}],
        "subject": "Your order",
        "textBody": "It ships today.",
    }
    body.update(overrides)
    return body


@pytest.fixture
def gateway(fuzz_mesh: RunningMesh, gateway_url: str) -> Iterator[httpx.Client]:
    key = fuzz_mesh.new_tenant(credits=10_000)
    with httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        yield client


def assert_refused(response: httpx.Response, statuses: set[int]) -> dict[str, Any]:
    assert response.status_code in statuses, response.text[:2000]
    body: dict[str, Any] = response.json()
    assert body["code"] and body["message"]
    return body


def test_json_nested_thousands_deep_is_a_400(gateway: httpx.Client) -> None:
    depth = 100_000
    nested = "[" * depth + "]" * depth
    raw = json.dumps(send_body(metadata={"k": "v"})).replace('{"k": "v"}', nested)

    response = gateway.post("/v1/messages:send", content=raw, headers={"Content-Type": "application/json"})

    assert_refused(response, {400})


def test_invalid_utf8_in_a_json_body_is_a_400(gateway: httpx.Client) -> None:
    raw = json.dumps(send_body(subject="PLACEHLD")).encode().replace(b"PLACEHLD", b"\xff\xfe\xc3\x28\xed\xa0\x80\xf8")

    response = gateway.post("/v1/messages:send", content=raw, headers={"Content-Type": "application/json"})

    assert_refused(response, {400})


def test_header_injection_in_the_subject_is_a_400_naming_the_field(gateway: httpx.Client) -> None:
    response = gateway.post("/v1/messages:send", json=send_body(subject="Hi\r\nBcc: victim@example.net"))

    body = assert_refused(response, {400})
    assert "subject" in json.dumps(body["details"])


def test_a_body_larger_than_the_edge_accepts_is_refused_as_too_large_and_not_retryable(
        gateway: httpx.Client) -> None:
    # 10 MiB of subject: past the 8 MiB a gRPC message may have at the edge. A 429 would tell clients to retry it.
    response = gateway.post("/v1/messages:send", json=send_body(subject="s" * (10 * MIB)))

    assert_refused(response, {400, 413})
    assert "Retry-After" not in response.headers
