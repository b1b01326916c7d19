"""Generic transcoding rules, exercised through the echo test contract (tests/gateway/protos), whose upstream
returns each request as it received it."""

import base64

from services.gateway.transcoder import TranscoderOptions


async def test_nested_repeated_and_enum_query_parameters_fill_the_request(echo_client):
    response = await echo_client.get(
        "/v1/things",
        params=[
            ("nested.label", "shelf-a"),
            ("nested.count", "7"),
            ("nested.tags", "x"),
            ("nested.tags", "y"),
            ("nested.color", "COLOR_RED"),
            ("tags", "a"),
            ("tags", "b"),
            ("numbers", "1"),
            ("numbers", "-2"),
            ("colors", "COLOR_GREEN"),
            ("colors", "1"),
        ],
    )

    assert response.status_code == 200
    assert response.json() == {
        "nested": {"label": "shelf-a", "count": "7", "tags": ["x", "y"], "color": "COLOR_RED"},
        "tags": ["a", "b"],
        "numbers": [1, -2],
        "colors": ["COLOR_GREEN", "COLOR_RED"],
    }


async def test_query_parameters_parse_scalars_maps_and_well_known_types(echo_client):
    blob = base64.urlsafe_b64encode(b"\xfb\xff binary").decode().rstrip("=")
    response = await echo_client.get(
        "/v1/things",
        params={
            "big": "-9223372036854775808",
            "huge": "18446744073709551615",
            "flag": "t",
            "ratio": "0.25",
            "blob": blob,
            "labels[env]": "prod",
            "when": "2025-06-01T12:00:00Z",
            "maybe": "5",
        },
    )

    assert response.status_code == 200
    assert response.json() == {
        "big": "-9223372036854775808",
        "huge": "18446744073709551615",
        "flag": True,
        "ratio": 0.25,
        "blob": base64.b64encode(b"\xfb\xff binary").decode(),
        "labels": {"env": "prod"},
        "when": "2025-06-01T12:00:00Z",
        "maybe": "5",
    }


async def test_query_parameter_names_may_be_proto_names(echo_client):
    response = await echo_client.get("/v1/things", params={"nested.label": "a"})
    by_proto = await echo_client.get("/v1/things", params={"id": "t", "maybe": "1"})

    assert response.json() == {"nested": {"label": "a"}}
    assert by_proto.json() == {"id": "t", "maybe": "1"}


async def test_unknown_query_parameters_are_ignored(echo_client):
    response = await echo_client.get(
        "/v1/things", params={"id": "t", "utm_source": "mail", "nested.nope": "1"}
    )

    assert response.status_code == 200
    assert response.json() == {"id": "t"}


async def test_a_query_value_of_the_wrong_type_is_invalid_argument(echo_client):
    response = await echo_client.get("/v1/things", params={"nested.count": "seven"})

    assert response.status_code == 400
    assert response.json()["code"] == 3
    assert "nested.count" in response.json()["message"]


async def test_an_undefined_enum_value_in_the_query_is_invalid_argument(echo_client):
    response = await echo_client.get("/v1/things", params={"color": "COLOR_BLUE"})

    assert response.status_code == 400
    assert "gatewaytest.v1.Color" in response.json()["message"]


async def test_a_singular_field_given_twice_is_invalid_argument(echo_client):
    response = await echo_client.get("/v1/things", params=[("id", "a"), ("id", "b")])

    assert response.status_code == 400
    assert "too many values" in response.json()["message"]


async def test_an_out_of_range_integer_is_invalid_argument(echo_client):
    response = await echo_client.get("/v1/things", params={"numbers": str(2**31)})

    assert response.status_code == 400


async def test_additional_bindings_route_to_the_same_rpc(echo_client, recorder):
    primary = await echo_client.get("/v1/things/t-1")
    additional = await echo_client.get("/v1/shelves/s-1/things/t-1")

    assert primary.json() == {"id": "t-1"}
    assert additional.json() == {"id": "t-1", "nested": {"label": "shelves/s-1"}}
    assert "GetThing" in recorder.requests


async def test_a_double_wildcard_captures_a_path_with_slashes(echo_client):
    response = await echo_client.get("/v1/files/reports/2025/q1.csv")

    assert response.json() == {"id": "reports/2025/q1.csv"}


async def test_an_encoded_slash_in_a_single_segment_variable_is_decoded(echo_client):
    response = await echo_client.get("/v1/things/a%2Fb")

    assert response.json() == {"id": "a/b"}


async def test_body_field_of_message_type_takes_the_json_object(echo_client):
    response = await echo_client.post("/v1/things/t-1:nested", json={"label": "L", "count": "3"})

    assert response.json() == {"id": "t-1", "nested": {"label": "L", "count": "3"}}


async def test_query_parameters_cannot_override_the_body_field(echo_client):
    response = await echo_client.post(
        "/v1/things/t-1:nested",
        params={"nested.label": "from-query", "flag": "true"},
        json={"label": "from-body"},
    )

    assert response.json() == {"id": "t-1", "nested": {"label": "from-body"}, "flag": True}


async def test_body_field_of_repeated_type_takes_a_json_array(echo_client):
    response = await echo_client.put("/v1/things/t-1/tags", json=["a", "b"])

    assert response.json() == {"id": "t-1", "tags": ["a", "b"]}


async def test_path_variables_override_the_same_field_in_the_body(echo_client):
    response = await echo_client.post("/v1/things/from-path:replace", json={"id": "from-body", "flag": True})

    assert response.json() == {"id": "from-path", "flag": True}


async def test_query_parameters_are_ignored_when_the_body_is_star(echo_client):
    response = await echo_client.post("/v1/things/t:replace", params={"flag": "true"}, json={"tags": ["x"]})

    assert response.json() == {"id": "t", "tags": ["x"]}


async def test_an_empty_body_is_an_empty_request_message(echo_client):
    response = await echo_client.post("/v1/things/t:replace")

    assert response.status_code == 200
    assert response.json() == {"id": "t"}


async def test_patch_derives_nested_mask_paths_from_the_body(echo_client):
    response = await echo_client.patch(
        "/v1/things/t-1", json={"flag": True, "nested": {"label": "L", "count": "1"}, "labels": {"k": "v"}}
    )

    assert response.json()["updateMask"] == "flag,nested.label,nested.count,labels"
    assert response.json()["thing"]["id"] == "things/t-1"


async def test_response_body_writes_only_that_field(echo_client):
    response = await echo_client.get("/v1/things/t-1/nested", params={"nested.label": "inner"})

    assert response.json() == {"label": "inner"}


async def test_methods_without_http_annotation_are_not_reachable(echo_client):
    response = await echo_client.post("/gatewaytest.v1.EchoService/Hidden", json={})

    assert response.status_code == 404


async def test_emit_unpopulated_writes_default_values(make_client, echo_descriptor_set, upstream):
    client = make_client(
        echo_descriptor_set, f"127.0.0.1:{upstream[0]}", TranscoderOptions(emit_unpopulated=True)
    )

    response = await client.get("/v1/things/t-1")

    body = response.json()
    assert body["id"] == "t-1"
    assert (
        body["tags"] == []
        and body["big"] == "0"
        and body["flag"] is False
        and body["color"] == "COLOR_UNSPECIFIED"
    )
