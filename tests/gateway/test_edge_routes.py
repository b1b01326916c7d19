"""The gateway routes exactly the RPCs the public edge serves (``libs.common.public_edge``), and documents the same."""

import pytest

from libs.common.public_edge import EDGE_METHODS
from services.gateway.descriptors import load_descriptor_set
from services.gateway.openapi import build_openapi, operation_id
from services.gateway.transcoder import Transcoder

CREDIT_HOLD_ROUTES = [
    ("/v1/tenants/demo/holds", {"credits": "5"}),
    ("/v1/holds:batchReserve", {}),
    ("/v1/holds/h-1:commit", {}),
    ("/v1/holds/h-1:release", {}),
]


@pytest.mark.parametrize(("path", "body"), CREDIT_HOLD_ROUTES)
async def test_a_mesh_internal_route_is_an_unknown_path(esp_client, path, body):
    # The contracts annotate the credit holds, but the edge keeps them internal: a route for them could only
    # ever answer 501, so the gateway does not have one.
    response = await esp_client.post(path, json=body)

    assert response.status_code == 404
    assert response.json() == {"code": 5, "message": "Not Found"}


def test_every_routed_rpc_is_one_the_edge_serves(esp_descriptor_set):
    transcoder = Transcoder(load_descriptor_set(esp_descriptor_set), "127.0.0.1:1")

    routed = {(binding.method.containing_service.full_name, binding.method.name) for binding in transcoder.bindings}

    assert routed
    assert all(method in EDGE_METHODS[service] for service, method in routed)


def test_the_document_offers_exactly_the_routes_the_gateway_serves(esp_descriptor_set):
    descriptors = load_descriptor_set(esp_descriptor_set)
    routed = {operation_id(binding) for binding in Transcoder(descriptors, "127.0.0.1:1").bindings}

    document = build_openapi(descriptors)

    documented = {operation["operationId"] for item in document["paths"].values() for operation in item.values()}
    assert documented == routed


def test_a_caller_may_route_every_annotated_rpc(esp_descriptor_set):
    descriptors = load_descriptor_set(esp_descriptor_set)

    transcoder = Transcoder(descriptors, "127.0.0.1:1", served=lambda _method: True)

    assert "ReserveCredits" in {binding.method.name for binding in transcoder.bindings}
