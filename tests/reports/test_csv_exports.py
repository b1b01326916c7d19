"""CSV exports through a real mesh (services as processes): ``EventService.ExportEvents`` over gRPC at the public
edge and over REST through the gateway, and ``StatsService.ExportStats`` over REST against GetStats.

The events are recorded straight into the mesh's database by the real recorder (as reports' consumer records them),
for tenants made at the edge with API keys of their own, so each test knows exactly what exists. The CSV is read
back with Python's ``csv`` module, a reader independent of the writer's code.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import events_pb2, events_pb2_grpc, messages_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from libs.common.timestamps import to_timestamp
from services.reports.envelopes import decode_envelope
from services.reports.recorder import record_events
from tests.campaigns.conftest import CampaignMesh, campaign_mesh
from tests.reports.builders import accepted, new_id, sender_event

__all__ = ["campaign_mesh"]  # the module-scoped mesh fixture, used here

M = messages_pb2
HEADER = ["event_id", "type", "time", "message", "sequence", "recipient", "provider", "tags", "campaign", "class",
          "reason", "bounce_type", "url", "attempt", "metadata"]
MESSAGES = 5000  # four events each: 20,000 events
CAMPAIGN = "campaigns/cmp-export"


@dataclass(frozen=True)
class Recorded:
    """What the module recorded: a tenant's 20,000 events and another tenant's few, in one range."""

    tenant: str
    key: str
    other_key: str
    other_event_ids: frozenset[str]
    start: datetime
    end: datetime
    envelopes: tuple[queue_pb2.EventEnvelope, ...]
    """The tenant's, in export order (time, then event id)."""
    injection_message: str


def _time(envelope: queue_pb2.EventEnvelope) -> datetime:
    return envelope.event.event_time.ToDatetime(tzinfo=UTC)


def _message_events(tenant: str, index: int, when: datetime) -> list[queue_pb2.EventEnvelope]:
    """Four events of one message; three messages share each second, so keyset pages cut through ties."""
    message_id = f"m{index:05d}-{new_id()[:8]}"
    recipient = f"user{index}@example.com"
    tags = ("export", "even" if index % 2 == 0 else "odd")
    events = [accepted(tenant, message_id, when, to=(recipient,), tags=tags,
                       campaign=CAMPAIGN if index % 5 == 0 else "", message_class="bulk" if index % 3 else "otp")]
    events.append(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_SENT, when + timedelta(minutes=1),
                               provider="ses", provider_message_id=new_id(), final=True))
    if index % 10 == 0:
        events.append(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, when + timedelta(minutes=2),
                                   recipient=recipient, bounce_type="hard", reason="550 5.1.1 no such user"))
        events.append(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_COMPLAINED, when + timedelta(minutes=3),
                                   recipient=recipient))
    else:
        events.append(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_DELIVERED, when + timedelta(minutes=2),
                                   recipient=recipient, provider="ses"))
        events.append(sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CLICKED, when + timedelta(minutes=3),
                                   recipient=recipient, url=f"https://shop.example/p/{index}"))
    return events


def _injection_events(tenant: str, when: datetime) -> list[queue_pb2.EventEnvelope]:
    """A message whose outside-controlled fields would be formulas in a spreadsheet."""
    message_id = f"inject-{new_id()[:8]}"
    envelope = accepted(tenant, message_id, when, to=("+33600000000@example.com",),
                        tags=("=HYPERLINK(\"http://evil.example\")", "safe"))
    envelope.message.metadata.clear()
    envelope.message.metadata["note"] = "=1+1"
    bounced = sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_BOUNCED, when + timedelta(seconds=1),
                           recipient="+33600000000@example.com", bounce_type="soft", reason="-2+3 mailbox full")
    clicked = sender_event(tenant, message_id, M.MESSAGE_EVENT_TYPE_CLICKED, when + timedelta(seconds=2),
                           recipient="+33600000000@example.com", url="@SUM(1+1)")
    return [envelope, bounced, clicked]


async def _record(dsn: str, envelopes: Sequence[queue_pb2.EventEnvelope]) -> None:
    """Record ``envelopes`` as reports' consumer does, in batches of 2,000."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for offset in range(0, len(envelopes), 2000):
            async with conn.transaction():
                await record_events(conn, [decode_envelope(e.SerializeToString())
                                           for e in envelopes[offset:offset + 2000]])


@pytest.fixture(scope="module")
async def recorded(campaign_mesh: CampaignMesh) -> Recorded:
    tenant, key = campaign_mesh.new_tenant(0)
    other, other_key = campaign_mesh.new_tenant(0)
    # Recent days, inside retention, so the mesh's retention worker leaves them be.
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    end = start + timedelta(days=2)
    envelopes: list[queue_pb2.EventEnvelope] = []
    for index in range(MESSAGES):
        envelopes += _message_events(tenant, index, start + timedelta(seconds=10 + index // 3))
    injection = _injection_events(tenant, start + timedelta(hours=20))
    envelopes += injection
    # Outside the range: never exported.
    envelopes += _message_events(tenant, 99_999, start - timedelta(hours=1))
    envelopes += _message_events(tenant, 99_998, end)
    # Another tenant's, in the same range and even the same message ids.
    others = [_message_events(other, index, start + timedelta(seconds=10 + index)) for index in range(50)]
    other_envelopes = [e for group in others for e in group]
    await _record(campaign_mesh.config.postgres_dsn, envelopes + other_envelopes)
    inside = sorted((e for e in envelopes if start <= _time(e) < end), key=lambda e: (_time(e), e.event.event_id))
    return Recorded(tenant, key, other_key, frozenset(e.event.event_id for e in other_envelopes), start, end,
                    tuple(inside), injection[0].message_id)


def _grpc_export(mesh: CampaignMesh, key: str, **request: Any) -> tuple[str, bytes]:
    """(content type, CSV) of ExportEvents at the public gRPC edge."""
    with grpc.insecure_channel(mesh.endpoint) as channel:
        chunks = list(events_pb2_grpc.EventServiceStub(channel).ExportEvents(
            events_pb2.ExportEventsRequest(**request), metadata=mesh.auth(key), timeout=120))
    assert chunks, "no message at all"
    assert all(len(c.data) <= 70 * 1024 for c in chunks)  # ~64 KiB chunks, never one buffer
    return chunks[0].content_type, b"".join(c.data for c in chunks)


def _grpc_refusal(mesh: CampaignMesh, key: str, **request: Any) -> tuple[grpc.StatusCode, dict[str, str]]:
    with grpc.insecure_channel(mesh.endpoint) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            list(events_pb2_grpc.EventServiceStub(channel).ExportEvents(
                events_pb2.ExportEventsRequest(**request), metadata=mesh.auth(key), timeout=30))
    status = rpc_status.from_call(raised.value)
    assert status is not None
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update({v.field: v.description for v in bad.field_violations})
    return raised.value.code(), violations


def _rows(body: bytes) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""))
    header = next(reader)
    assert header == HEADER
    rows = [dict(zip(header, row, strict=True)) for row in reader]
    return rows


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _range(recorded: Recorded, start: datetime | None = None, end: datetime | None = None) -> dict[str, Any]:
    return {"start_time": to_timestamp(start or recorded.start), "end_time": to_timestamp(end or recorded.end)}


@pytest.fixture(scope="module")
def whole_export(campaign_mesh: CampaignMesh, recorded: Recorded) -> tuple[str, list[dict[str, str]]]:
    """The tenant's whole range over gRPC (shared: it is the large one)."""
    content_type, body = _grpc_export(campaign_mesh, recorded.key, **_range(recorded))
    return content_type, _rows(body)


def test_every_event_of_the_range_is_exported_once_in_order(whole_export: tuple[str, list[dict[str, str]]],
                                                             recorded: Recorded) -> None:
    content_type, rows = whole_export
    assert content_type == "text/csv; charset=utf-8"
    assert len(recorded.envelopes) == 4 * MESSAGES + 3
    assert [r["event_id"] for r in rows] == [e.event.event_id for e in recorded.envelopes]
    assert [r["time"] for r in rows] == [_rfc3339(_time(e)) for e in recorded.envelopes]
    assert not {r["event_id"] for r in rows} & recorded.other_event_ids


def test_each_column_says_what_the_event_api_says(campaign_mesh: CampaignMesh, recorded: Recorded,
                                                  whole_export: tuple[str, list[dict[str, str]]]) -> None:
    _, rows = whole_export
    by_id = {r["event_id"]: r for r in rows}
    # The first message's events, as ListEvents shows them.
    first = next(e.message_id for e in recorded.envelopes if e.message_id.startswith("m00000-"))
    with grpc.insecure_channel(campaign_mesh.endpoint) as channel:
        listed = events_pb2_grpc.EventServiceStub(channel).ListEvents(
            events_pb2.ListEventsRequest(message=f"messages/{first}", page_size=100), metadata=campaign_mesh.auth(
                recorded.key), timeout=30).events
    assert len(listed) == 4
    for event in listed:
        row = by_id[event.name.removeprefix("events/")]
        assert row == {
            "event_id": event.name.removeprefix("events/"), "type": event.type,
            "time": _rfc3339(event.event_time.ToDatetime(tzinfo=UTC)), "message": event.message,
            "sequence": str(event.sequence), "recipient": event.recipient, "provider": event.provider,
            "tags": ";".join(event.tags), "campaign": event.campaign, "class": "otp", "reason": event.reason,
            "bounce_type": event.bounce_type, "url": event.url, "attempt": str(event.attempt),
            "metadata": json.dumps(dict(event.metadata), sort_keys=True, separators=(",", ":")),
        }
    assert [by_id[e.name.removeprefix("events/")]["type"] for e in listed] == [
        "message.accepted", "message.sent", "message.bounced", "message.complained"]
    bounced = next(r for r in rows if r["message"] == f"messages/{first}" and r["type"] == "message.bounced")
    assert bounced["bounce_type"] == "hard" and bounced["reason"] == "550 5.1.1 no such user"
    assert bounced["tags"] == "export;even" and bounced["campaign"] == CAMPAIGN
    assert bounced["metadata"] == '{"order":"42"}'
    assert sorted({r["sequence"] for r in rows if r["message"] == f"messages/{first}"}) == ["1", "2", "3", "4"]


def test_cells_a_spreadsheet_would_evaluate_are_neutralised(whole_export: tuple[str, list[dict[str, str]]],
                                                            recorded: Recorded) -> None:
    _, rows = whole_export
    mine = [r for r in rows if r["message"] == f"messages/{recorded.injection_message}"]
    assert [r["type"] for r in mine] == ["message.accepted", "message.bounced", "message.clicked"]
    accepted_row, bounced, clicked = mine
    assert accepted_row["recipient"] == "'+33600000000@example.com"
    assert accepted_row["tags"] == "'=HYPERLINK(\"http://evil.example\");safe"
    assert accepted_row["metadata"] == '{"note":"=1+1"}'  # a JSON object starts with {: nothing to evaluate
    assert bounced["reason"] == "'-2+3 mailbox full"
    assert clicked["url"] == "'@SUM(1+1)"
    formula_starts = ("=", "+", "-", "@", "\t", "\r")
    assert not [cell for row in rows for cell in row.values() if cell.startswith(formula_starts)]


def _index(envelope: queue_pb2.EventEnvelope) -> int:
    """The number of the message an event is about (-1 for the injection message, which has none)."""
    return int(envelope.message_id[1:6]) if envelope.message_id.startswith("m") else -1


@pytest.mark.parametrize(("request_filter", "keep"), [
    ({"types": ["message.bounced", "message.complained"]},
     lambda e: e.event.type in (M.MESSAGE_EVENT_TYPE_BOUNCED, M.MESSAGE_EVENT_TYPE_COMPLAINED)),
    ({"recipient": "USER42@example.com"}, lambda e: e.message_id.startswith("m00042-")),
    ({"tag": "odd", "types": ["message.clicked"]},
     lambda e: e.event.type == M.MESSAGE_EVENT_TYPE_CLICKED and _index(e) >= 0 and _index(e) % 2 == 1),
    ({"campaign": CAMPAIGN}, lambda e: _index(e) % 5 == 0),
])
def test_filters_apply(campaign_mesh: CampaignMesh, recorded: Recorded, request_filter: dict[str, Any],
                       keep: Any) -> None:
    _, body = _grpc_export(campaign_mesh, recorded.key, **_range(recorded), **request_filter)
    expected = [e.event.event_id for e in recorded.envelopes if keep(e)]
    assert expected
    assert [r["event_id"] for r in _rows(body)] == expected


def test_a_message_filter_and_a_narrower_range(campaign_mesh: CampaignMesh, recorded: Recorded) -> None:
    message_id = recorded.envelopes[-1].message_id
    _, body = _grpc_export(campaign_mesh, recorded.key, **_range(recorded), message=f"messages/{message_id}")
    assert {r["message"] for r in _rows(body)} == {f"messages/{message_id}"}
    start, end = recorded.start + timedelta(seconds=100), recorded.start + timedelta(seconds=200)
    _, body = _grpc_export(campaign_mesh, recorded.key, **_range(recorded, start, end))
    assert [r["event_id"] for r in _rows(body)] == [
        e.event.event_id for e in recorded.envelopes if start <= _time(e) < end]


def test_another_tenant_sees_only_its_own_events(campaign_mesh: CampaignMesh, recorded: Recorded) -> None:
    _, body = _grpc_export(campaign_mesh, recorded.other_key, **_range(recorded))
    assert {r["event_id"] for r in _rows(body)} == recorded.other_event_ids
    # Filters naming the first tenant's things find nothing of theirs: the header alone.
    _, body = _grpc_export(campaign_mesh, recorded.other_key, **_range(recorded),
                           message=f"messages/{recorded.injection_message}")
    assert _rows(body) == []


def test_bad_ranges_are_refused_naming_the_field_and_the_limit(campaign_mesh: CampaignMesh,
                                                               recorded: Recorded) -> None:
    start = to_timestamp(recorded.start)
    code, violations = _grpc_refusal(campaign_mesh, recorded.key)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations) == {"start_time", "end_time"} and "required" in violations["start_time"]
    code, violations = _grpc_refusal(campaign_mesh, recorded.key, start_time=start)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and set(violations) == {"end_time"}
    code, violations = _grpc_refusal(campaign_mesh, recorded.key, start_time=start, end_time=start)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and violations == {"end_time": "must be after start_time"}
    code, violations = _grpc_refusal(campaign_mesh, recorded.key, start_time=start,
                                     end_time=to_timestamp(recorded.start + timedelta(days=30, seconds=1)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "30 days" in violations["end_time"]
    code, violations = _grpc_refusal(campaign_mesh, recorded.key, **_range(recorded), types=["message.nope"])
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "types" in violations
    code, violations = _grpc_refusal(campaign_mesh, recorded.key, **_range(recorded), campaign="nope/1")
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "campaign" in violations
    # Exactly 30 days is allowed.
    _, body = _grpc_export(campaign_mesh, recorded.key, start_time=start,
                           end_time=to_timestamp(recorded.start + timedelta(days=30)), types=["message.complained"])
    assert len(_rows(body)) == MESSAGES // 10


@pytest.fixture(scope="module")
def gateway(campaign_mesh: CampaignMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{campaign_mesh.config.gateway_port}", timeout=120) as client:
        yield client


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_the_rest_export_streams_the_same_csv(gateway: httpx.Client, recorded: Recorded,
                                              whole_export: tuple[str, list[dict[str, str]]]) -> None:
    chunks: list[bytes] = []
    with gateway.stream("GET", "/v1/events:export", params={"startTime": _iso(recorded.start),
                                                           "endTime": _iso(recorded.end)},
                        headers={"Authorization": f"Bearer {recorded.key}"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert response.headers["transfer-encoding"] == "chunked"
        # Named by reports, passed on by the edge and the gateway: what a browser saves the download as.
        assert response.headers["content-disposition"].startswith('attachment; filename="events-')
        chunks += response.iter_raw()
    assert len(chunks) > 1
    assert _rows(b"".join(chunks)) == whole_export[1]


def test_rest_filters_and_tenant_isolation(gateway: httpx.Client, recorded: Recorded) -> None:
    params: list[tuple[str, str]] = [("startTime", _iso(recorded.start)), ("endTime", _iso(recorded.end)),
                                     ("types", "message.bounced"), ("types", "message.complained")]
    response = gateway.get("/v1/events:export", params=params,
                           headers={"Authorization": f"Bearer {recorded.key}"})
    assert response.status_code == 200
    kinds = {r["type"] for r in _rows(response.content)}
    assert kinds == {"message.bounced", "message.complained"}
    response = gateway.get("/v1/events:export", params=params[:2],
                           headers={"Authorization": f"Bearer {recorded.other_key}"})
    assert {r["event_id"] for r in _rows(response.content)} == recorded.other_event_ids


def test_rest_refusals_are_status_json(gateway: httpx.Client, recorded: Recorded) -> None:
    response = gateway.get("/v1/events:export", params={"startTime": _iso(recorded.start),
                                                       "endTime": _iso(recorded.start + timedelta(days=31))},
                           headers={"Authorization": f"Bearer {recorded.key}"})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    bad = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))
    assert bad["fieldViolations"][0]["field"] == "end_time"
    assert "30 days" in bad["fieldViolations"][0]["description"]
    response = gateway.get("/v1/events:export", params={"startTime": _iso(recorded.start)})
    assert response.status_code == 401


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _expected_cells(row: dict[str, Any], dimensions: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """A GetStats JSON row as the CSV's cells, by the contract's field names (independent of the writer)."""
    cells = [row.get("dimensions", {}).get(d, "") for d in dimensions]
    for metric in metrics:
        value = row.get(_camel(metric))
        if isinstance(value, dict):  # a latency: LatencyPercentiles
            cells += [f"{value.get('p50Ms', 0):.3f}", f"{value.get('p95Ms', 0):.3f}",
                      f"{value.get('p99Ms', 0):.3f}", str(int(value.get("count", "0")))]
        elif metric.endswith("_latency"):
            cells += ["0.000", "0.000", "0.000", "0"]
        elif metric in ("complaint_rate",):
            status = row.get("complaintRateStatus", "COMPLAINT_RATE_STATUS_OK")
            cells += [f"{value or 0:.6f}", status.removeprefix("COMPLAINT_RATE_STATUS_").lower()]
        elif isinstance(value, float) or metric.endswith(("_rate", "_delivered")):
            cells.append(f"{value or 0:.6f}")
        else:
            cells.append(str(int(value or "0")))
    return [f"'{c}" if c.startswith(("=", "+", "-", "@", "\t", "\r")) else c for c in cells]


@pytest.mark.parametrize("query", [
    {"query.dimensions": ["provider"]},
    {"query.dimensions": ["message_class", "campaign"], "query.bucket": "day"},
    {"query.bucket": "hour", "query.metrics": ["delivered", "bounced", "complaint_rate", "delivery_latency"]},
])
def test_the_stats_export_has_the_rows_get_stats_has(gateway: httpx.Client, recorded: Recorded,
                                                     query: dict[str, Any]) -> None:
    params = {"query.startTime": _iso(recorded.start), "query.endTime": _iso(recorded.end), **query}
    auth = {"Authorization": f"Bearer {recorded.key}"}
    stats = gateway.get("/v1/stats", params={k.removeprefix("query."): v for k, v in params.items()}, headers=auth)
    assert stats.status_code == 200, stats.text
    figures = stats.json()
    exported = gateway.get("/v1/stats:export", params=params, headers=auth)
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"] == "text/csv; charset=utf-8"
    reader = csv.reader(io.StringIO(exported.content.decode("utf-8"), newline=""))
    header, *rows = list(reader)
    dimensions, metrics = figures["dimensions"], figures["metrics"]
    assert header[:len(dimensions)] == dimensions
    assert rows == [_expected_cells(row, dimensions, metrics) for row in figures.get("rows", [])]
    assert len(rows) >= 2
