"""Every CampaignService operation over HTTP, through the gateway of a real mesh (services as processes, the provider
simulator as the provider): what a REST client sees, errors included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.campaigns.conftest import CampaignMesh, campaign_mesh, wait_until

__all__ = ["campaign_mesh"]  # the module-scoped mesh fixture, used here


@pytest.fixture
def http(campaign_mesh: CampaignMesh) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"http://127.0.0.1:{campaign_mesh.config.gateway_port}",
        headers={"Authorization": f"Bearer {campaign_mesh.api_key}"},
        timeout=30,
    ) as client:
        yield client


def new_campaign(tag: str, **fields: Any) -> dict[str, Any]:
    return {
        "displayName": tag,
        "from": {"email": "news@example.com", "name": "News"},
        "subject": "Hello {{ first_name }}",
        "textBody": "Hi {{ first_name }}, code {{ code }}",
        "tags": [tag],
        **fields,
    }


def create(http: httpx.Client, tag: str, **fields: Any) -> str:
    response = http.post("/v1/campaigns", params={"requestId": f"{tag}-create"}, json=new_campaign(tag, **fields))
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "CAMPAIGN_STATE_DRAFT"
    name: str = response.json()["name"]
    return name


def csv_rows(indices: range) -> str:
    return "".join(f"r{i}@example.org,Person {i},N{i},C{i}\n" for i in indices)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in body["details"] if d["@type"] == f"type.googleapis.com/google.rpc.{kind}")
    return found


def test_a_template_syntax_error_is_400_naming_the_field_line_and_column(http: httpx.Client) -> None:
    response = http.post("/v1/campaigns", json=new_campaign("rest-bad", textBody="Line one\n  {{ first_name + }}"))

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    [violation] = detail(body, "BadRequest")["fieldViolations"]
    assert violation["field"].startswith("campaign.text")
    assert "line 2, column 19" in violation["description"]


def test_recipients_as_ndjson_frames_csv_json_lines_and_an_imported_upload_all_get_their_emails(
    campaign_mesh: CampaignMesh, http: httpx.Client
) -> None:
    tag = "rest-recipients"
    name = create(http, tag)
    add = f"/v1/{name}:addRecipients"

    def recipient(i: int) -> dict[str, Any]:
        return {"address": {"email": f"r{i}@example.org"}, "variables": {"first_name": f"N{i}", "code": f"C{i}"}}

    frames = [{"recipients": [recipient(i) for i in batch]} for batch in (range(0, 5), range(5, 10))]
    ndjson = "".join(json.dumps(frame) + "\n" for frame in frames)
    assert ok(http.post(add, content=ndjson, headers={"Content-Type": "application/x-ndjson"})) == {"addedCount": "10"}

    # Header (row 1), rows 2-11, a blank row 12, a bad address on row 13: the service counts it as its 11th
    # recipient, the gateway reports the file's row.
    csv = "email,name,first_name,code\n" + csv_rows(range(10, 20)) + "\nnot-an-address,X,Y,Z\n"
    added = ok(http.post(add, content=csv, headers={"Content-Type": "text/csv"}))
    assert (added["addedCount"], added["rejectedCount"]) == ("10", "1")
    [error] = added["errors"]
    assert (error["row"], error["address"]) == ("13", "not-an-address")
    assert error["reason"].startswith("INVALID_ADDRESS")

    nested = [{"email": f"r{i}@example.org", "variables": {"first_name": f"N{i}", "code": f"C{i}"}}
              for i in range(20, 25)]
    flat = [{"email": f"r{i}@example.org", "first_name": f"N{i}", "code": f"C{i}"} for i in range(25, 30)]
    lines: list[dict[str, Any]] = [*nested, *flat]
    lines.append({"email": "r0@example.org", "first_name": "again"})  # already added by the NDJSON frames
    jsonl = "".join(json.dumps(line) + "\n" for line in lines)
    added = ok(http.post(add, content=jsonl, headers={"Content-Type": "application/jsonl"}))
    assert (added["addedCount"], added["duplicateCount"]) == ("10", "1")

    upload = ok(http.post("/v1/attachments", params={"filename": "more.csv"},
                          content="email,name,first_name,code\n" + csv_rows(range(30, 40)),
                          headers={"Content-Type": "text/csv"}))
    assert upload["contentType"] == "text/csv"
    imported = ok(http.post(f"/v1/{name}:importRecipients", json={"attachmentId": upload["id"]}))
    assert imported == {"addedCount": "10"}

    draft = ok(http.get(f"/v1/{name}"))
    assert (draft["progress"]["recipients"], draft["progress"]["invalid"], draft["progress"]["duplicates"]) == (
        "40", "1", "1")

    assert ok(http.post(f"/v1/{name}:start", json={}))["state"] == "CAMPAIGN_STATE_RUNNING"
    delivered = wait_until(lambda: len(found := campaign_mesh.delivered(tag)) >= 40 and found, 60, "40 emails")
    by_recipient = {message["to"][0]: message for message in delivered}
    assert set(by_recipient) == {f"r{i}@example.org" for i in range(40)}
    for i in (0, 12, 27, 39):  # one of each way in
        assert by_recipient[f"r{i}@example.org"]["subject"] == f"Hello N{i}"
        assert f"code C{i}" in by_recipient[f"r{i}@example.org"]["text"]
    done = wait_until(lambda: (c := ok(http.get(f"/v1/{name}")))["state"] == "CAMPAIGN_STATE_COMPLETED" and c, 30,
                      "completed")
    assert done["progress"]["sent"] == "40"
    assert "endTime" in done


def test_a_campaign_is_started_listed_by_state_paused_resumed_and_cancelled(http: httpx.Client) -> None:
    name = create(http, "rest-lifecycle", sendRate=1.0)  # slow: it is still running when paused
    draft = create(http, "rest-draft")
    added = http.post(f"/v1/{name}:addRecipients", content="email,first_name,code\n" + "".join(
        f"l{i}@example.org,N{i},C{i}\n" for i in range(20)), headers={"Content-Type": "text/csv"})
    assert ok(added) == {"addedCount": "20"}

    started = ok(http.post(f"/v1/{name}:start", json={"requestId": "start-1"}))
    assert started["state"] == "CAMPAIGN_STATE_RUNNING" and "startTime" in started
    current = ok(http.get(f"/v1/{name}"))
    assert current["progress"]["recipients"] == "20"

    def listed(state: str) -> set[str]:
        page = ok(http.get("/v1/campaigns", params={"state": state, "pageSize": 200}))
        assert all(c["state"] == state for c in page.get("campaigns", []))
        return {c["name"] for c in page.get("campaigns", [])}

    assert name in listed("CAMPAIGN_STATE_RUNNING") and draft not in listed("CAMPAIGN_STATE_RUNNING")
    assert draft in listed("CAMPAIGN_STATE_DRAFT") and name not in listed("CAMPAIGN_STATE_DRAFT")

    paused = ok(http.post(f"/v1/{name}:pause", json={}))
    assert (paused["state"], paused["pauseReason"]) == ("CAMPAIGN_STATE_PAUSED", "PAUSE_REASON_BY_CUSTOMER")
    assert name in listed("CAMPAIGN_STATE_PAUSED")

    assert ok(http.post(f"/v1/{name}:resume", json={}))["state"] == "CAMPAIGN_STATE_RUNNING"
    cancelled = ok(http.post(f"/v1/{name}:cancel", json={}))
    assert cancelled["state"] == "CAMPAIGN_STATE_CANCELLED" and "endTime" in cancelled

    refused = http.post(f"/v1/{name}:resume", json={})
    assert refused.status_code == 400  # FAILED_PRECONDITION is 400 in grpc-gateway's mapping
    body = refused.json()
    assert body["code"] == 9
    info = detail(body, "ErrorInfo")
    assert info["reason"] == "ILLEGAL_TRANSITION"
    assert info["metadata"]["state"] == "CANCELLED"
    assert "cancelled" in body["message"]


def test_starting_a_campaign_without_recipients_is_refused_with_its_state(http: httpx.Client) -> None:
    name = create(http, "rest-empty")

    refused = http.post(f"/v1/{name}:start", json={})

    assert refused.status_code == 400
    assert refused.json()["code"] == 9
    info = detail(refused.json(), "ErrorInfo")
    assert (info["reason"], info["metadata"]["state"]) == ("NO_RECIPIENTS", "DRAFT")
    assert http.get("/v1/campaigns/does-not-exist").status_code == 404
