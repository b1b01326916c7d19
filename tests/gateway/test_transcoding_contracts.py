"""Transcoding of the real esp.v1 contracts (gen/esp.binpb) against test doubles of our services."""

from esp.v1 import common_pb2, messages_pb2

from tests.gateway.upstream import BIG_CREDITS

SEND_BODY = {
    "requestId": "req-1",
    "messageClass": "MESSAGE_CLASS_OTP",
    "from": {"email": "no-reply@example.com", "name": "Example"},
    "to": [{"email": "ada@example.com"}],
    "subject": "Your code",
    "textBody": "123456",
    "tags": ["login"],
    "metadata": {"user": "42"},
}


async def test_body_star_maps_the_whole_json_body_onto_the_request(esp_client, recorder):
    response = await esp_client.post("/v1/messages:send", json=SEND_BODY)

    assert response.status_code == 200
    received = recorder.requests["SendEmail"]
    assert received.request_id == "req-1"
    assert received.message_class == common_pb2.MESSAGE_CLASS_OTP
    assert getattr(received, "from").email == "no-reply@example.com"
    assert [address.email for address in received.to] == ["ada@example.com"]
    assert received.text_body == "123456"
    assert dict(received.metadata) == {"user": "42"}


async def test_response_uses_camel_case_names_enum_names_and_int64_strings(esp_client):
    response = await esp_client.post("/v1/messages:send", json=SEND_BODY)

    message = response.json()["message"]
    assert response.headers["content-type"] == "application/json"
    assert message["messageClass"] == "MESSAGE_CLASS_OTP"
    assert message["state"] == "MESSAGE_STATE_ACCEPTED"
    assert message["credits"] == str(BIG_CREDITS)
    assert message["requestId"] == "req-1"
    assert message["createTime"] == "2025-01-02T03:04:05Z"


async def test_unpopulated_fields_are_left_out_of_responses(esp_client):
    response = await esp_client.post("/v1/messages:send", json=SEND_BODY)

    message = response.json()["message"]
    assert "provider" not in message
    assert "attempts" not in message
    assert "cc" not in message


async def test_request_bodies_may_use_proto_field_names(esp_client, recorder):
    body = {
        "request_id": "req-2",
        "message_class": "MESSAGE_CLASS_BULK",
        "text_body": "hi",
        "reply_to": [{"email": "support@example.com"}],
    }

    response = await esp_client.post("/v1/messages:send", json=body)

    assert response.status_code == 200
    received = recorder.requests["SendEmail"]
    assert received.message_class == common_pb2.MESSAGE_CLASS_BULK
    assert received.text_body == "hi"
    assert received.reply_to[0].email == "support@example.com"


async def test_unknown_body_fields_are_ignored(esp_client, recorder):
    response = await esp_client.post("/v1/messages:send", json={**SEND_BODY, "notAField": 1})

    assert response.status_code == 200
    assert recorder.requests["SendEmail"].subject == "Your code"


async def test_a_resource_name_in_the_path_binds_the_name_field(esp_client, recorder):
    response = await esp_client.get("/v1/messages/m-42")

    assert response.status_code == 200
    assert recorder.requests["GetMessage"].name == "messages/m-42"
    assert response.json() == {"name": "messages/m-42"}


async def test_query_parameters_set_enums_by_name_and_integers(esp_client, recorder):
    response = await esp_client.get(
        "/v1/messages", params={"state": "MESSAGE_STATE_SENT", "pageSize": "10", "tag": "login"}
    )

    assert response.status_code == 200
    received = recorder.requests["ListMessages"]
    assert received.state == messages_pb2.MESSAGE_STATE_SENT
    assert received.page_size == 10
    assert received.tag == "login"
    assert response.json() == {"nextPageToken": "next"}


async def test_body_field_maps_json_onto_that_field_and_query_onto_the_rest(esp_client, recorder):
    response = await esp_client.post(
        "/v1/campaigns",
        params={"requestId": "req-c"},
        json={"displayName": "Spring sale", "subject": "Hi {{name}}"},
    )

    assert response.status_code == 200
    received = recorder.requests["CreateCampaign"]
    assert received.request_id == "req-c"
    assert received.campaign.display_name == "Spring sale"
    assert received.campaign.subject == "Hi {{name}}"
    assert response.json()["name"] == "campaigns/c-1"


async def test_a_nested_path_field_is_bound_inside_the_body_message(esp_client, recorder):
    response = await esp_client.patch("/v1/providers/p1", json={"displayName": "Mailgun EU", "weight": 2.5})

    assert response.status_code == 200
    received = recorder.requests["UpdateProvider"]
    assert received.provider.name == "providers/p1"
    assert received.provider.display_name == "Mailgun EU"
    assert response.json()["name"] == "providers/p1"


async def test_patch_without_update_mask_derives_it_from_the_body_fields(esp_client, recorder):
    await esp_client.patch("/v1/providers/p1", json={"displayName": "Mailgun EU", "weight": 2.5})

    assert list(recorder.requests["UpdateProvider"].update_mask.paths) == ["display_name", "weight"]


async def test_patch_with_an_explicit_update_mask_keeps_it(esp_client, recorder):
    await esp_client.patch(
        "/v1/providers/p1",
        params={"updateMask": "displayName"},
        json={"displayName": "Mailgun EU", "weight": 2.5},
    )

    assert list(recorder.requests["UpdateProvider"].update_mask.paths) == ["display_name"]


async def test_an_empty_response_message_is_an_empty_json_object(esp_client, recorder):
    response = await esp_client.delete("/v1/attachments/a-9")

    assert response.status_code == 200
    assert response.json() == {}
    assert recorder.requests["DeleteAttachment"].name == "attachments/a-9"


async def test_authorization_is_forwarded_as_lower_case_metadata(esp_client, recorder):
    await esp_client.get("/v1/messages/m-1", headers={"Authorization": "Bearer esp_live_secret"})

    assert recorder.metadata["GetMessage"]["authorization"] == "Bearer esp_live_secret"


async def test_the_request_id_header_is_forwarded_and_echoed(esp_client, recorder):
    response = await esp_client.get("/v1/messages/m-1", headers={"X-Request-Id": "rid-123"})

    assert recorder.metadata["GetMessage"]["x-request-id"] == "rid-123"
    assert response.headers["x-request-id"] == "rid-123"


async def test_a_request_id_is_generated_when_the_client_sends_none(esp_client, recorder):
    response = await esp_client.get("/v1/messages/m-1")

    generated = response.headers["x-request-id"]
    assert generated
    assert recorder.metadata["GetMessage"]["x-request-id"] == generated


async def test_client_supplied_internal_metadata_is_not_forwarded(esp_client, recorder):
    await esp_client.get(
        "/v1/messages/m-1", headers={"Grpc-Metadata-X-Esp-Tenant": "victim", "X-Esp-Tenant": "v"}
    )

    assert "x-esp-tenant" not in recorder.metadata["GetMessage"]


async def test_upstream_header_metadata_comes_back_as_grpc_metadata_headers(esp_client):
    response = await esp_client.post("/v1/messages:send", json=SEND_BODY)

    assert response.headers["grpc-metadata-x-served-by"] == "double"


async def test_the_default_deadline_is_sent_upstream(esp_client, recorder):
    await esp_client.get("/v1/messages/m-1")

    remaining = recorder.time_remaining["GetMessage"]
    # grpc encodes the deadline with limited precision, so allow a little over the configured 30 s.
    assert remaining is not None and 5 < remaining <= 31


async def test_a_grpc_timeout_header_overrides_the_default_deadline(esp_client, recorder):
    await esp_client.get("/v1/messages/m-1", headers={"Grpc-Timeout": "3S"})

    remaining = recorder.time_remaining["GetMessage"]
    assert remaining is not None and 0 < remaining <= 3.5
