"""Schemathesis, a fuzzer no one here wrote, against the gateway's own OpenAPI document with the real mesh behind
it: whatever it sends, the gateway never answers 5xx, and every answer is what the document says (status, content
type and body schema).

The budget is bounded (``max_examples`` per operation, the stateful phase off) so that the package runs in about a
minute on a 2-core box; the examples and coverage phases still run, so each operation gets its boundary values
(empty, negative, oversized, NUL and non-ASCII strings) besides the random ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from libs.common.auth import PLATFORM_ADMIN
from libs.common.public_edge import EDGE_METHODS
from services.gateway.descriptors import load_descriptor_set
from services.gateway.openapi import NDJSON_MEDIA_TYPE, build_openapi
from tests.e2e.conftest import RunningMesh

DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "gen" / "esp.binpb"
# The schema must exist when pytest collects the tests (one test per operation), before any mesh runs, so it is
# built from the descriptor set the gateway serves; the first test checks that the gateway serves exactly this.
DOCUMENT = build_openapi(load_descriptor_set(DESCRIPTOR_SET))
CONFIG = schemathesis.Config.from_dict({
    # Stateful runs chain calls through links the document does not declare; they would only add time.
    "phases": {"stateful": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
TIMEOUT_S = 30
PLATFORM_ADMIN_OPERATIONS = [
    f"{service.rsplit('.', 1)[-1]}_{method}"
    for service, methods in EDGE_METHODS.items()
    for method, spec in methods.items()
    if spec.scope == PLATFORM_ADMIN
]


@schemathesis.serializer(NDJSON_MEDIA_TYPE)
def one_message_stream(_ctx: Any, value: Any) -> bytes:
    """A client stream of one request message (schemathesis generates one value per body)."""
    return (json.dumps(value) + "\n").encode()


@schemathesis.serializer("application/jsonl")
def raw_json_lines(_ctx: Any, value: Any) -> bytes:
    """The recipients file as generated (its schema is a binary string), or a value's JSON as one line."""
    if isinstance(value, bytes):
        return value
    data = getattr(value, "data", None)
    if isinstance(data, bytes):
        return data
    return (json.dumps(value) + "\n").encode()


def test_the_gateway_serves_the_document_being_fuzzed(gateway_url: str) -> None:
    assert httpx.get(f"{gateway_url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=30)
def test_a_tenant_gets_no_server_error_and_only_documented_answers(case: schemathesis.Case, fuzz_mesh: RunningMesh,
                                                                   gateway_url: str) -> None:
    case.call_and_validate(gateway_url, headers={"Authorization": f"Bearer {fuzz_mesh.api_key}"}, checks=CHECKS,
                           timeout=TIMEOUT_S)


@schema.include(operation_id=PLATFORM_ADMIN_OPERATIONS).parametrize()
@settings(max_examples=20)
def test_the_platform_admin_gets_no_server_error_and_only_documented_answers(
        case: schemathesis.Case, fuzz_mesh: RunningMesh, gateway_url: str) -> None:
    # With a tenant's key these operations stop at PERMISSION_DENIED; the admin token lets the fuzzed bodies reach
    # the services (top-ups, price books, tenants, providers).
    case.call_and_validate(gateway_url, headers={"Authorization": f"Bearer {fuzz_mesh.config.admin_token}"},
                           checks=CHECKS, timeout=TIMEOUT_S)
