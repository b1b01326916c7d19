"""Error responses: grpc-gateway's HTTP status mapping and the google.rpc.Status JSON body."""

import grpc
import pytest

# grpc-gateway's runtime.HTTPStatusFromCode (v2).
EXPECTED_HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


@pytest.mark.parametrize("code", list(EXPECTED_HTTP_STATUS), ids=lambda code: code.name)
async def test_upstream_status_codes_map_to_grpc_gateway_http_statuses(echo_client, code):
    response = await echo_client.post("/v1/fail", json={"code": code.value[0], "message": "asked"})

    assert response.status_code == EXPECTED_HTTP_STATUS[code]
    assert response.json()["code"] == code.value[0]


async def test_error_body_is_a_status_with_details_from_the_trailer(esp_client):
    response = await esp_client.get("/v1/messages/missing")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "code": 5,
        "message": "messages/missing does not exist",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "MESSAGE_NOT_FOUND",
                "domain": "esp.dev",
                "metadata": {"message": "messages/missing"},
            }
        ],
    }


async def test_details_resolve_even_when_the_descriptor_set_lacks_google_rpc(echo_client):
    response = await echo_client.post("/v1/fail", json={"code": 9, "message": "not now"})

    assert response.json()["details"] == [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ASKED_TO_FAIL", "domain": "test"}
    ]


async def test_retry_info_becomes_a_retry_after_header_on_429(echo_client):
    response = await echo_client.post(
        "/v1/fail", json={"code": 8, "message": "slow down", "retryAfterMs": "1500"}
    )

    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["details"][1] == {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "1.500s",
    }


async def test_unauthenticated_sets_www_authenticate_to_the_message(echo_client):
    response = await echo_client.post("/v1/fail", json={"code": 16, "message": "missing API key"})

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "missing API key"


async def test_an_unknown_route_is_404_with_a_not_found_status(esp_client):
    response = await esp_client.get("/v1/nothing/here")

    assert response.status_code == 404
    assert response.json() == {"code": 5, "message": "Not Found"}


async def test_a_known_path_with_the_wrong_method_is_405_unimplemented(esp_client):
    response = await esp_client.put("/v1/messages/m-1", json={})

    assert response.status_code == 405
    assert response.json() == {"code": 12, "message": "Method Not Allowed"}
    assert response.headers["allow"] == "GET"


async def test_a_verb_route_called_with_get_is_405(esp_client):
    response = await esp_client.get("/v1/messages:send")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


async def test_malformed_json_is_400_invalid_argument(esp_client):
    response = await esp_client.post(
        "/v1/messages:send", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["code"] == 3


async def test_a_json_value_of_the_wrong_type_is_400_invalid_argument(esp_client):
    response = await esp_client.post("/v1/messages:send", json={"to": "ada@example.com", "subject": 5})

    assert response.status_code == 400
    assert response.json()["code"] == 3


async def test_an_unreachable_upstream_is_503_unavailable(make_client, esp_descriptor_set):
    from tests.conftest import free_port

    client = make_client(esp_descriptor_set, f"127.0.0.1:{free_port()}")

    response = await client.get("/v1/messages/m-1")

    assert response.status_code == 503
    assert response.json()["code"] == 14
