"""The OpenAPI 3.0 document generated from the descriptors."""

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from libs.common.public_edge import EDGE_METHODS
from services.gateway.descriptors import load_descriptor_set
from services.gateway.openapi import build_openapi

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def annotated_operations(descriptor_set_path) -> set[str]:
    """Operation ids expected from reading the raw FileDescriptorSet, independently of the generator."""
    file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path.read_bytes())
    expected = set()
    for file_proto in file_set.file:
        for service in file_proto.service:
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http):
                    rule = method.options.Extensions[annotations_pb2.http]
                    expected.add(f"{service.name}_{method.name}")
                    expected.update(
                        f"{service.name}_{method.name}{index + 2}"
                        for index in range(len(rule.additional_bindings))
                    )
    return expected


def operations(document) -> dict[str, dict]:
    return {
        operation["operationId"]: operation
        for item in document["paths"].values()
        for verb, operation in item.items()
        if verb in HTTP_METHODS
    }


@pytest.fixture(scope="module")
def esp_document(esp_descriptor_set):
    return build_openapi(load_descriptor_set(esp_descriptor_set))


def served_at_the_edge(operation_id: str) -> bool:
    service, method = operation_id.split("_", 1)
    return method.rstrip("0123456789") in EDGE_METHODS.get(f"esp.v1.{service}", {})


def test_every_annotated_rpc_the_edge_serves_is_an_operation(esp_document, esp_descriptor_set):
    expected = {operation for operation in annotated_operations(esp_descriptor_set) if served_at_the_edge(operation)}

    assert len(expected) >= 40  # sanity: the contracts really were read
    assert set(operations(esp_document)) == expected


def test_mesh_internal_rpcs_the_edge_does_not_serve_are_not_documented(esp_document):
    # The contracts annotate the credit holds, but the public edge answers them UNIMPLEMENTED (a 501 through the
    # gateway): documenting them offered routes that can only fail.
    internal = {"CreditService_ReserveCredits", "CreditService_BatchReserveCredits", "CreditService_CommitHold",
                "CreditService_ReleaseHold"}

    assert internal.isdisjoint(operations(esp_document))
    assert "/v1/holds:batchReserve" not in esp_document["paths"]


def test_a_caller_may_document_every_binding_whatever_the_edge_serves(esp_descriptor_set):
    document = build_openapi(load_descriptor_set(esp_descriptor_set), served=lambda _method: True)

    assert set(operations(document)) == annotated_operations(esp_descriptor_set)


def test_every_binding_including_additional_ones_is_an_operation(echo_descriptor_set):
    document = build_openapi(load_descriptor_set(echo_descriptor_set))

    assert set(operations(document)) == annotated_operations(echo_descriptor_set)
    assert "EchoService_GetThing2" in operations(document)


def test_the_document_is_valid_openapi_3(esp_document, echo_descriptor_set):
    validate(esp_document)
    validate(build_openapi(load_descriptor_set(echo_descriptor_set)))
    assert esp_document["openapi"].startswith("3.0")


def test_resource_name_variables_become_named_path_parameters(esp_document):
    revoke = esp_document["paths"]["/v1/tenants/{tenant}/apiKeys/{apiKey}:revoke"]["post"]

    assert [parameter["name"] for parameter in revoke["parameters"] if parameter["in"] == "path"] == [
        "tenant",
        "apiKey",
    ]


def test_proto_comments_become_descriptions(esp_document):
    send = operations(esp_document)["MessageService_SendEmail"]

    assert send["description"].startswith("Accepts one email for delivery.")
    assert esp_document["components"]["schemas"]["esp.v1.MessageClass"]["description"].startswith(
        "How urgent and how price-sensitive an email is"
    )


def test_query_parameters_use_json_names_and_enum_schemas(esp_document):
    list_messages = operations(esp_document)["MessageService_ListMessages"]

    names = {parameter["name"]: parameter for parameter in list_messages["parameters"]}
    assert set(names) == {"pageSize", "pageToken", "state", "tag"}
    assert names["state"]["schema"] == {"$ref": "#/components/schemas/esp.v1.MessageState"}


def test_nested_and_repeated_query_parameters_are_documented(echo_descriptor_set):
    document = build_openapi(load_descriptor_set(echo_descriptor_set))
    list_things = operations(document)["EchoService_ListThings"]

    names = {parameter["name"]: parameter for parameter in list_things["parameters"]}
    assert "nested.label" in names
    assert names["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert names["tags"]["explode"] is True
    assert "labels" not in names  # maps cannot be described as one query parameter


def test_schemas_follow_the_proto3_json_mapping(esp_document):
    message = esp_document["components"]["schemas"]["esp.v1.Message"]["properties"]

    assert message["credits"]["type"] == "string" and message["credits"]["format"] == "int64"
    assert message["createTime"]["format"] == "date-time"
    assert message["credits"]["readOnly"] is True
    assert "messageClass" in message


def test_required_fields_come_from_field_behavior(esp_document):
    provider = esp_document["components"]["schemas"]["esp.v1.Provider"]

    assert provider["required"] == ["type"]


def test_client_streaming_bodies_are_documented_as_ndjson_first_then_their_plain_alternatives(esp_document):
    upload = operations(esp_document)["AttachmentService_UploadAttachment"]
    recipients = operations(esp_document)["CampaignService_AddCampaignRecipients"]

    assert list(upload["requestBody"]["content"]) == [
        "application/x-ndjson",
        "application/octet-stream",
        "multipart/form-data",
    ]
    assert list(recipients["requestBody"]["content"]) == [
        "application/x-ndjson",
        "text/csv",
        "application/jsonl",
        "multipart/form-data",
    ]
    assert upload["requestBody"]["content"]["application/x-ndjson"]["schema"] == {
        "$ref": "#/components/schemas/esp.v1.UploadAttachmentRequest"
    }
    form = recipients["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"


def test_a_raw_upload_takes_its_metadata_from_documented_query_parameters(esp_document):
    upload = operations(esp_document)["AttachmentService_UploadAttachment"]

    names = {parameter["name"]: parameter for parameter in upload["parameters"]}
    assert set(names) == {"filename", "contentType", "sizeBytes", "sha256", "requestId"}
    assert all(parameter["in"] == "query" and not parameter["required"] for parameter in names.values())
    assert "Raw and multipart bodies only" in names["filename"]["description"]


# What openapi-python-client generates a body for (openapi_python_client/parser/bodies.py); an operation whose
# every body type is something else is skipped ("Endpoint requires a body, but none were parseable").
GENERATOR_BODY_TYPES = {"application/json", "application/octet-stream", "multipart/form-data",
                        "application/x-www-form-urlencoded"}


def test_every_operation_with_a_body_offers_a_type_common_generators_can_send(esp_document):
    without = [
        operation_id
        for operation_id, operation in operations(esp_document).items()
        if "requestBody" in operation and not GENERATOR_BODY_TYPES & set(operation["requestBody"]["content"])
    ]

    assert without == []


def test_errors_are_documented_as_google_rpc_status(esp_document):
    get_message = operations(esp_document)["MessageService_GetMessage"]

    assert get_message["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }
    assert "google.protobuf.Any" in esp_document["components"]["schemas"]
