"""Webhooks delivered from the real mesh to a local receiver, verified with the official standardwebhooks package."""

from __future__ import annotations

import json
import secrets
from typing import Any

import grpc
import pytest
from esp.v1 import common_pb2, messages_pb2, messages_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from standardwebhooks import Webhook

from tests.campaigns.conftest import CampaignMesh, wait_until
from tests.webhooks.receiver import Answer, Receiver


def _stub(mesh: CampaignMesh) -> tuple[grpc.Channel, webhooks_pb2_grpc.WebhookServiceStub]:
    channel = grpc.insecure_channel(mesh.endpoint)
    return channel, webhooks_pb2_grpc.WebhookServiceStub(channel)


def create_endpoint(mesh: CampaignMesh, key: str, url: str, **fields: Any) -> webhooks_pb2.WebhookEndpoint:
    channel, stub = _stub(mesh)
    with channel:
        return stub.CreateWebhookEndpoint(webhooks_pb2.CreateWebhookEndpointRequest(
            webhook_endpoint=webhooks_pb2.WebhookEndpoint(url=url, **fields)), metadata=mesh.auth(key), timeout=10)


def send_email(mesh: CampaignMesh, key: str, **fields: Any) -> str:
    with grpc.insecure_channel(mesh.endpoint) as channel:
        reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(messages_pb2.SendEmailRequest(
            message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, subject="hello", text_body="hi",
            to=[common_pb2.EmailAddress(email="rcpt@example.net")],
            **{"from": common_pb2.EmailAddress(email="shop@example.com")}, **fields),
            metadata=mesh.auth(key), timeout=10)
    return str(reply.message.id)


def verified(secret: str, request: Any) -> Any:
    """The body of ``request`` once the standardwebhooks package accepted its signature."""
    return Webhook(secret).verify(request.body, request.headers)


def fresh(mesh: CampaignMesh) -> tuple[str, str, str]:
    """A new tenant with credits, its key, and a receiver path of its own."""
    tenant, key = mesh.new_tenant(1_000_000)
    return tenant, key, f"/{tenant}/{secrets.token_hex(3)}"


def test_an_email_produces_signed_accepted_and_sent_webhooks_in_sequence_order(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path)
    assert endpoint.signing_secret.startswith("whsec_")
    message_id = send_email(webhook_mesh, key, metadata={"order": "o-1"}, tags=["receipts"])

    def types() -> list[str]:
        return [json.loads(r.body)["type"] for r in receiver.received(path)]

    wait_until(lambda: {"message.accepted", "message.sent"} <= set(types()), 20, "accepted and sent webhooks")
    documents = [verified(endpoint.signing_secret, r) for r in receiver.received(path)]
    mine = [d for d in documents if d["data"]["message"] == f"messages/{message_id}"]
    sequences = {d["type"]: int(d["data"]["sequence"]) for d in mine}
    assert sequences["message.accepted"] < sequences["message.sent"]
    accepted = next(d for d in mine if d["type"] == "message.accepted")["data"]
    assert accepted["metadata"] == {"order": "o-1"} and accepted["tags"] == ["receipts"]
    assert accepted["recipient"] == "rcpt@example.net"


def test_the_secret_is_returned_once_and_never_again(webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path)
    channel, stub = _stub(webhook_mesh)
    with channel:
        again = stub.GetWebhookEndpoint(webhooks_pb2.GetWebhookEndpointRequest(name=endpoint.name),
                                        metadata=webhook_mesh.auth(key), timeout=10)
    assert endpoint.signing_secret and again.signing_secret == ""


def test_a_receiver_failing_twice_gets_the_same_webhook_id_until_it_succeeds(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    receiver.script(path, Answer(500), Answer(502))
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    send_email(webhook_mesh, key)
    wait_until(lambda: len(receiver.received(path)) >= 3, 20, "a third try")
    tries = receiver.received(path)
    assert len({r.headers["webhook-id"] for r in tries}) == 1
    assert all(verified(endpoint.signing_secret, r)["type"] == "message.accepted" for r in tries)
    channel, stub = _stub(webhook_mesh)
    with channel:
        log = wait_until(lambda: [a for a in stub.ListWebhookAttempts(
            webhooks_pb2.ListWebhookAttemptsRequest(parent=endpoint.name), metadata=webhook_mesh.auth(key),
            timeout=10).attempts if a.success], 10, "the successful attempt logged")
        attempts = stub.ListWebhookAttempts(webhooks_pb2.ListWebhookAttemptsRequest(parent=endpoint.name),
                                            metadata=webhook_mesh.auth(key), timeout=10).attempts
    assert log and [a.status_code for a in attempts] == [200, 502, 500]
    assert [a.attempt for a in attempts] == [3, 2, 1]


def test_another_tenants_endpoint_is_not_found(webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    _, other_key, _ = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path)
    channel, stub = _stub(webhook_mesh)
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.GetWebhookEndpoint(webhooks_pb2.GetWebhookEndpointRequest(name=endpoint.name),
                                metadata=webhook_mesh.auth(other_key), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unknown_event_type_in_a_filter_is_invalid(webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    with pytest.raises(grpc.RpcError) as raised:
        create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.teleported"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message.teleported" in (raised.value.details() or "")
