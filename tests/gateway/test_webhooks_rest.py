"""WebhookService and EventService over HTTP, through the gateway of a real mesh (services as processes, the provider
simulator as the provider, a local HTTP receiver as the webhook endpoint): what a REST client sees."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.campaigns.conftest import CampaignMesh, wait_until
from tests.webhooks.conftest import receiver, webhook_mesh
from tests.webhooks.receiver import Receiver

__all__ = ["receiver", "webhook_mesh"]  # the module-scoped mesh and receiver fixtures, used here


@pytest.fixture
def http(webhook_mesh: CampaignMesh) -> Iterator[httpx.Client]:
    """A client of the gateway, as a fresh tenant of its own."""
    _, key = webhook_mesh.new_tenant(1_000_000)
    with httpx.Client(base_url=f"http://127.0.0.1:{webhook_mesh.config.gateway_port}",
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield client


@pytest.fixture
def url(receiver: Receiver) -> str:
    """A receiver URL of the test's own."""
    return f"{receiver.url}/{secrets.token_hex(4)}"


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def create(http: httpx.Client, url: str, **fields: Any) -> dict[str, Any]:
    return ok(http.post("/v1/webhookEndpoints", json={"url": url, **fields}))


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def send(http: httpx.Client, **fields: Any) -> str:
    sent = ok(http.post("/v1/messages:send", json={
        "messageClass": "MESSAGE_CLASS_TRANSACTIONAL", "from": {"email": "shop@example.com"},
        "to": [{"email": "rcpt@example.net"}], "subject": "hello", "textBody": "hi", **fields}))
    name: str = sent["message"]["name"]
    return name


def test_post_creates_an_endpoint_and_returns_its_secret_once(http: httpx.Client, url: str) -> None:
    created = create(http, url, eventTypes=["message.sent"], tags=["receipts"], description="orders",
                     maxBatchSize=5)

    assert created["name"].startswith("webhookEndpoints/")
    assert (created["url"], created["eventTypes"], created["tags"], created["maxBatchSize"]) == (
        url, ["message.sent"], ["receipts"], 5)
    assert created["enabled"] is True and created["signingSecret"].startswith("whsec_")
    got = ok(http.get(f"/v1/{created['name']}"))
    assert got["name"] == created["name"] and got["description"] == "orders"
    assert "signingSecret" not in got


def test_get_lists_the_tenants_endpoints(http: httpx.Client, url: str) -> None:
    first, second = create(http, url + "/a"), create(http, url + "/b")

    listed = ok(http.get("/v1/webhookEndpoints", params={"pageSize": 10}))

    assert {e["name"] for e in listed["webhookEndpoints"]} == {first["name"], second["name"]}
    assert all("signingSecret" not in e for e in listed["webhookEndpoints"])


def test_patch_changes_only_the_fields_in_the_update_mask(http: httpx.Client, url: str) -> None:
    created = create(http, url, description="before", eventTypes=["message.sent"])

    patched = ok(http.patch(f"/v1/{created['name']}", params={"updateMask": "description,enabled"},
                            json={"description": "after", "enabled": False, "url": url + "/ignored"}))

    assert (patched["description"], patched["enabled"], patched["url"]) == ("after", False, url)
    assert patched["eventTypes"] == ["message.sent"]


def test_patch_without_a_mask_changes_the_fields_in_the_body(http: httpx.Client, url: str) -> None:
    created = create(http, url, description="kept", eventTypes=["message.sent"])

    patched = ok(http.patch(f"/v1/{created['name']}", json={"eventTypes": ["message.delivered"]}))

    assert (patched["eventTypes"], patched["description"], patched["enabled"]) == (["message.delivered"], "kept",
                                                                                   True)


def test_rotate_secret_returns_a_new_secret_that_signs_the_test_event(
        http: httpx.Client, url: str, receiver: Receiver) -> None:
    created = create(http, url)

    rotated = ok(http.post(f"/v1/{created['name']}:rotateSecret", json={"overlap": "0s"}))

    assert rotated["signingSecret"].startswith("whsec_") and rotated["signingSecret"] != created["signingSecret"]
    sent = ok(http.post(f"/v1/{created['name']}:sendTestEvent", json={}))
    [request] = wait_until(lambda: receiver.received(path_of(url)), 20, "the test delivery")
    assert request.headers["webhook-id"] == sent["webhookId"]
    assert Webhook(rotated["signingSecret"]).verify(request.body, request.headers)["type"] == "test"


def test_attempts_lists_the_delivery_log_newest_first(http: httpx.Client, url: str) -> None:
    created = create(http, url)
    first = ok(http.post(f"/v1/{created['name']}:sendTestEvent", json={}))["webhookId"]
    wait_until(lambda: ok(http.get(f"/v1/{created['name']}/attempts")).get("attempts"), 20, "the first attempt")
    second = ok(http.post(f"/v1/{created['name']}:sendTestEvent", json={}))["webhookId"]

    attempts = wait_until(lambda: len(a := ok(http.get(f"/v1/{created['name']}/attempts")).get("attempts", [])) == 2
                          and a, 20, "both attempts")

    assert [a["webhookId"] for a in attempts] == [second, first]
    newest = attempts[0]
    assert (newest["attempt"], newest["statusCode"], newest["success"], newest["eventTypes"]) == (
        1, 200, True, ["test"])
    assert "attemptTime" in newest
    page = ok(http.get(f"/v1/{created['name']}/attempts", params={"pageSize": 1}))
    assert [a["webhookId"] for a in page["attempts"]] == [second] and page["nextPageToken"]


def test_delete_removes_the_endpoint(http: httpx.Client, url: str) -> None:
    created = create(http, url)

    assert ok(http.delete(f"/v1/{created['name']}")) == {}

    gone = http.get(f"/v1/{created['name']}")
    assert gone.status_code == 404 and gone.json()["code"] == 5


def test_an_unknown_event_type_is_400_naming_it(http: httpx.Client, url: str) -> None:
    refused = http.post("/v1/webhookEndpoints", json={"url": url, "eventTypes": ["message.teleported"]})

    assert refused.status_code == 400 and refused.json()["code"] == 3
    assert "message.teleported" in refused.text


def test_events_are_listed_oldest_first_with_the_filters_given(http: httpx.Client) -> None:
    tagged = send(http, tags=["rest-events"])
    other = send(http, tags=["other"])
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")

    def sent_events() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = ok(http.get("/v1/events", params={"types": "message.sent", "startTime": since}))\
            .get("events", [])
        return found if {e["message"] for e in found} == {tagged, other} else []

    wait_until(sent_events, 30, "both messages sent")
    by_tag = ok(http.get("/v1/events", params={"tag": "rest-events", "types": "message.sent"}))["events"]
    assert [(e["type"], e["message"]) for e in by_tag] == [("message.sent", tagged)]
    mine = ok(http.get("/v1/events", params={"message": tagged}))["events"]
    assert mine[0]["type"] == "message.accepted" and "message.sent" in [e["type"] for e in mine]
    assert [e["eventTime"] for e in mine] == sorted(e["eventTime"] for e in mine)
    assert all(e["tags"] == ["rest-events"] and e["recipient"] == "rcpt@example.net" for e in mine)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert ok(http.get("/v1/events", params={"message": tagged, "startTime": later})).get("events", []) == []


def test_openapi_lists_the_webhook_and_event_operations(http: httpx.Client) -> None:
    document = ok(http.get("/openapi.json"))
    operations = {op["operationId"]: (method, path) for path, item in document["paths"].items()
                  for method, op in item.items() if isinstance(op, dict) and "operationId" in op}

    assert operations["WebhookService_CreateWebhookEndpoint"] == ("post", "/v1/webhookEndpoints")
    assert operations["WebhookService_ListWebhookEndpoints"] == ("get", "/v1/webhookEndpoints")
    assert operations["WebhookService_GetWebhookEndpoint"] == ("get", "/v1/webhookEndpoints/{webhookEndpoint}")
    assert operations["WebhookService_UpdateWebhookEndpoint"] == ("patch", "/v1/webhookEndpoints/{webhookEndpoint}")
    assert operations["WebhookService_DeleteWebhookEndpoint"] == ("delete",
                                                                  "/v1/webhookEndpoints/{webhookEndpoint}")
    assert operations["WebhookService_RotateWebhookSecret"] == (
        "post", "/v1/webhookEndpoints/{webhookEndpoint}:rotateSecret")
    assert operations["WebhookService_SendTestWebhookEvent"] == (
        "post", "/v1/webhookEndpoints/{webhookEndpoint}:sendTestEvent")
    assert operations["WebhookService_ReplayWebhookEvents"] == ("post", "/v1/webhookEndpoints/{webhookEndpoint}:replay")
    assert operations["WebhookService_ListWebhookAttempts"] == (
        "get", "/v1/webhookEndpoints/{webhookEndpoint}/attempts")
    assert operations["EventService_ListEvents"] == ("get", "/v1/events")
