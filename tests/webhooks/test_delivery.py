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


def test_an_email_produces_signed_accepted_sent_and_delivered_webhooks_in_sequence_order(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path)
    assert endpoint.signing_secret.startswith("whsec_")
    message_id = send_email(webhook_mesh, key, metadata={"order": "o-1"}, tags=["receipts"])

    def types() -> list[str]:
        return [json.loads(r.body)["type"] for r in receiver.received(path)]

    wanted = {"message.accepted", "message.sent", "message.delivered"}
    wait_until(lambda: wanted <= set(types()), 30, "accepted, sent and delivered webhooks",
               progress=lambda: len(receiver.received(path)))
    documents = [verified(endpoint.signing_secret, r) for r in receiver.received(path)]
    mine = [d for d in documents if d["data"]["message"] == f"messages/{message_id}"]
    sequences = {d["type"]: int(d["data"]["sequence"]) for d in mine}
    assert sequences["message.accepted"] < sequences["message.sent"] < sequences["message.delivered"]
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


def _endpoint_call(mesh: CampaignMesh, key: str, method: str, request: Any) -> Any:
    channel, stub = _stub(mesh)
    with channel:
        return getattr(stub, method)(request, metadata=mesh.auth(key), timeout=30)


def test_410_gone_disables_the_endpoint_and_tells_the_tenants_other_endpoints(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    receiver.script(path, default=Answer(410))
    gone = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    watcher = create_endpoint(webhook_mesh, key, receiver.url + path + "/watcher",
                              event_types=["webhook_endpoint.disabled"])
    send_email(webhook_mesh, key)
    notice = wait_until(lambda: receiver.received(path + "/watcher"), 20, "the endpoint-disabled notice")
    document = verified(watcher.signing_secret, notice[0])
    assert document["type"] == "webhook_endpoint.disabled"
    assert document["data"]["attributes"]["webhook_endpoint"] == gone.name
    after = _endpoint_call(webhook_mesh, key, "GetWebhookEndpoint",
                           webhooks_pb2.GetWebhookEndpointRequest(name=gone.name))
    assert not after.enabled and "410" in after.disabled_reason
    assert len(receiver.received(path)) == 1


def test_429_with_retry_after_waits_as_long_as_the_receiver_asked(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    receiver.script(path, Answer(429, headers={"Retry-After": "3"}))
    create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    send_email(webhook_mesh, key)
    tries = wait_until(lambda: len(receiver.received(path)) >= 2 and receiver.received(path), 20, "the retry")
    # The schedule alone would have retried after 1 s.
    assert tries[1].time - tries[0].time >= 2.9


def test_after_a_rotation_deliveries_verify_with_the_old_and_the_new_secret_until_the_overlap_ends(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["test"])
    rotated = _endpoint_call(webhook_mesh, key, "RotateWebhookSecret", webhooks_pb2.RotateWebhookSecretRequest(
        name=endpoint.name, overlap={"seconds": 3600}))
    assert rotated.signing_secret and rotated.signing_secret != endpoint.signing_secret
    _endpoint_call(webhook_mesh, key, "SendTestWebhookEvent",
                   webhooks_pb2.SendTestWebhookEventRequest(name=endpoint.name))
    during = wait_until(lambda: receiver.received(path), 20, "the test event")[0]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert verified(endpoint.signing_secret, during)["type"] == "test"
    assert verified(rotated.signing_secret, during)["type"] == "test"

    ended = _endpoint_call(webhook_mesh, key, "RotateWebhookSecret", webhooks_pb2.RotateWebhookSecretRequest(
        name=endpoint.name, overlap={"seconds": 0}))
    _endpoint_call(webhook_mesh, key, "SendTestWebhookEvent",
                   webhooks_pb2.SendTestWebhookEventRequest(name=endpoint.name))
    after = wait_until(lambda: receiver.received(path)[1:], 20, "the second test event")[0]
    assert verified(ended.signing_secret, after)["type"] == "test"
    with pytest.raises(Exception, match="signature"):
        verified(rotated.signing_secret, after)


def test_a_replay_delivers_a_messages_events_again_with_their_original_webhook_ids(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted",
                                                                                   "message.sent"])
    message_id = send_email(webhook_mesh, key)
    first = wait_until(lambda: len(receiver.received(path)) >= 2 and receiver.received(path), 20, "the events")
    replayed = _endpoint_call(webhook_mesh, key, "ReplayWebhookEvents", webhooks_pb2.ReplayWebhookEventsRequest(
        name=endpoint.name, message=f"messages/{message_id}"))
    assert replayed.queued_events == 2
    again = wait_until(lambda: len(receiver.received(path)) >= 4 and receiver.received(path)[2:], 20, "the replay")
    assert {r.headers["webhook-id"] for r in again} == {r.headers["webhook-id"] for r in first}


def test_a_batching_endpoint_gets_each_event_once_in_batches(webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, max_batch_size=50,
                               event_types=["message.accepted", "message.sent"])
    with grpc.insecure_channel(webhook_mesh.endpoint) as channel:
        messages_pb2_grpc.MessageServiceStub(channel).BatchSendEmails(messages_pb2.BatchSendEmailsRequest(
            requests=[messages_pb2.SendEmailRequest(
                message_class=common_pb2.MESSAGE_CLASS_BULK, subject=f"n{i}", text_body="n",
                to=[common_pb2.EmailAddress(email=f"r{i}@example.net")],
                **{"from": common_pb2.EmailAddress(email="shop@example.com")}) for i in range(20)]),
            metadata=webhook_mesh.auth(key), timeout=30)

    def events() -> list[dict[str, Any]]:
        return [e for r in receiver.received(path) for e in verified(endpoint.signing_secret, r)["data"]]

    wait_until(lambda: len(events()) >= 40, 30, "40 events", progress=lambda: len(events()))
    assert all(json.loads(r.body)["type"] == "batch" for r in receiver.received(path))
    assert len(receiver.received(path)) < 40
    names = [e["data"]["name"] for e in events()]
    assert len(names) == len(set(names)) == 40


def test_a_dead_endpoint_does_not_delay_a_healthy_one(webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    for i in range(3):  # each answers only after the 2 s timeout: every attempt to them times out
        receiver.script(f"{path}/dead{i}", default=Answer(delay_s=10))
        create_endpoint(webhook_mesh, key, f"{receiver.url}{path}/dead{i}", event_types=["message.accepted"])
    create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    for _ in range(12):
        send_email(webhook_mesh, key)
    # Twelve events to each dead endpoint keep its lane busy for several timeouts; the healthy one gets all twelve
    # meanwhile.
    wait_until(lambda: len(receiver.received(path)) >= 12, 10, "the healthy endpoint's twelve events",
               progress=lambda: len(receiver.received(path)))


def test_a_receiver_sending_an_endless_body_costs_one_short_attempt(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    receiver.script(path, default=Answer(endless_body=True))
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["test"])
    _endpoint_call(webhook_mesh, key, "SendTestWebhookEvent",
                   webhooks_pb2.SendTestWebhookEventRequest(name=endpoint.name))
    attempts = wait_until(lambda: _endpoint_call(webhook_mesh, key, "ListWebhookAttempts",
                                                 webhooks_pb2.ListWebhookAttemptsRequest(parent=endpoint.name)
                                                 ).attempts, 20, "the attempt")
    assert attempts[0].success and len(attempts[0].response_excerpt) <= 1024


def test_killing_the_dispatcher_mid_schedule_loses_nothing_and_keeps_the_webhook_id(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    receiver.script(path, default=Answer(500))
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    send_email(webhook_mesh, key)
    failed = wait_until(lambda: receiver.received(path), 20, "a first, failed try")
    webhook_mesh.mesh.processes["webhooks"].kill()
    receiver.script(path, default=Answer(200))
    webhook_mesh.mesh.start_service("webhooks")
    wait_until(lambda: any(a.success for a in _endpoint_call(
        webhook_mesh, key, "ListWebhookAttempts", webhooks_pb2.ListWebhookAttemptsRequest(parent=endpoint.name)
    ).attempts), 30, "a successful try after the restart")
    assert {r.headers["webhook-id"] for r in receiver.received(path)} == {failed[0].headers["webhook-id"]}


def test_crossing_the_low_balance_threshold_is_pushed_as_an_account_event(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    from esp.v1 import credits_pb2, credits_pb2_grpc

    tenant, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["account.low_balance"])
    with grpc.insecure_channel(webhook_mesh.endpoint) as channel:
        credits_pb2_grpc.CreditServiceStub(channel).SetLowBalanceThreshold(credits_pb2.SetLowBalanceThresholdRequest(
            tenant=f"tenants/{tenant}", threshold=999_999_999), metadata=webhook_mesh.auth(key), timeout=10)
    send_email(webhook_mesh, key)
    notice = wait_until(lambda: receiver.received(path), 20, "the low-balance notice")
    document = verified(endpoint.signing_secret, notice[0])
    assert document["type"] == "account.low_balance"
    assert document["data"]["attributes"]["threshold"] == "999999999"


def test_an_endpoint_failing_for_longer_than_the_limit_is_disabled_and_the_tenant_told(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    import psycopg

    _, key, path = fresh(webhook_mesh)
    receiver.script(path, default=Answer(500))
    failing = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.accepted"])
    watcher = create_endpoint(webhook_mesh, key, receiver.url + path + "/watcher",
                              event_types=["webhook_endpoint.disabled"])
    # As if it had failed for a day more than the mesh's limit (ESP_WEBHOOK_DISABLE_AFTER_S, an hour here).
    with psycopg.connect(webhook_mesh.config.postgres_dsn, autocommit=True) as conn:
        conn.execute("UPDATE webhooks.endpoints SET failing_since = now() - interval '25 hours' WHERE id = %s",
                     (failing.name.removeprefix("webhookEndpoints/"),))
    send_email(webhook_mesh, key)
    notice = wait_until(lambda: receiver.received(path + "/watcher"), 20, "the endpoint-disabled notice")
    assert verified(watcher.signing_secret, notice[0])["data"]["attributes"]["webhook_endpoint"] == failing.name
    after = _endpoint_call(webhook_mesh, key, "GetWebhookEndpoint",
                           webhooks_pb2.GetWebhookEndpointRequest(name=failing.name))
    assert not after.enabled and "failing since" in after.disabled_reason


def test_an_update_without_a_mask_changes_only_the_fields_it_sets(
        webhook_mesh: CampaignMesh, receiver: Receiver) -> None:
    _, key, path = fresh(webhook_mesh)
    endpoint = create_endpoint(webhook_mesh, key, receiver.url + path, event_types=["message.sent"])

    updated = _endpoint_call(webhook_mesh, key, "UpdateWebhookEndpoint", webhooks_pb2.UpdateWebhookEndpointRequest(
        webhook_endpoint=webhooks_pb2.WebhookEndpoint(name=endpoint.name, description="renamed")))

    assert (updated.description, updated.url, list(updated.event_types), updated.enabled) == (
        "renamed", endpoint.url, ["message.sent"], True)
