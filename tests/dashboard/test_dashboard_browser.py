"""The dashboard in headless Chromium, after real emails went through the mesh.

Two tenants send: ``acme`` (bounces, a complaint, plain deliveries and a small campaign) and a second tenant (plain
deliveries only). The tenant view must draw exactly acme's figures — equal to what was sent and to what GetStats
answers for the very range the page asked for — and nothing of the other tenant; the platform view (the admin
token) both tenants, the providers' health and their cost. The page must log no error to the console, and each
view's screenshot is saved under test-artifacts/.

Every wait is on progress (``tests.progress``): it fails when what it watches (message states, the stats, what the
page drew) stops moving for ``STALL_S``, never because a loaded machine is slower than a fixed deadline.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from esp.v1 import (
    campaigns_pb2,
    common_pb2,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
)
from google.protobuf import timestamp_pb2
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.campaigns.conftest import CampaignMesh, campaign, create_and_fill, progress
from tests.dashboard.conftest import WINDOW
from tests.progress import wait_for_progress

Metadata = Sequence[tuple[str, str]]

PROVIDER = "mailgun-us"
VOLUME = ("accepted", "sent", "delivered", "bounced", "failed")
GREEN, RED, PURPLE = (44, 160, 44), (214, 39, 40), (148, 103, 189)
"""The delivered line, the critical complaint-rate threshold and the complaint-rate line (dashboard.js COLORS)."""
STALL_S = 30.0
"""A wait fails when what it watches has not moved for this long."""


# ---- the mesh side ---------------------------------------------------------------------------------------------

def _send(mesh: CampaignMesh, key: str, count: int) -> list[str]:
    """``count`` transactional emails, each to an address of its own (a bounce or complaint suppresses it)."""
    names = []
    with grpc.insecure_channel(mesh.endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        for _ in range(count):
            reply = stub.SendEmail(messages_pb2.SendEmailRequest(
                message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, subject="Dashboard", text_body="hi",
                to=[common_pb2.EmailAddress(email=f"r-{secrets.token_hex(4)}@example.net")],
                **{"from": common_pb2.EmailAddress(email="shop@example.com")}),
                metadata=mesh.auth(key), timeout=10)
            names.append(reply.message.name or f"messages/{reply.message.id}")
    return names


def _wait_states(mesh: CampaignMesh, key: str, names: list[str], state: int) -> None:
    """Until every message in ``names`` is in ``state``."""
    with grpc.insecure_channel(mesh.endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        def state_of(name: str) -> int:
            try:
                return int(stub.GetMessage(messages_pb2.GetMessageRequest(name=name), metadata=mesh.auth(key),
                                           timeout=5).state)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # not recorded by reports yet
                    raise
                return int(messages_pb2.MESSAGE_STATE_UNSPECIFIED)

        wait_for_progress(lambda: [state_of(name) for name in names], lambda states: all(s == state for s in states),
                          what=f"{len(names)} message(s) in state {messages_pb2.MessageState.Name(state)}",
                          stall_s=STALL_S, every_s=0.2,
                          describe=lambda states: str([messages_pb2.MessageState.Name(s) for s in states]))


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def _stats(mesh: CampaignMesh, metadata: Metadata, query: dict[str, Any] | None = None,
           **fields: Any) -> reports_pb2.GetStatsResponse:
    """GetStats over the page's range (``query``: its startTime, endTime) or the last hour."""
    if query is not None:
        fields.update(start_time=_timestamp(query["startTime"]), end_time=_timestamp(query["endTime"]))
    else:
        end = time.time()
        fields.update(start_time=timestamp_pb2.Timestamp(seconds=int(end - 3600)),
                      end_time=timestamp_pb2.Timestamp(seconds=int(end) + 60))
    with grpc.insecure_channel(mesh.endpoint) as channel:
        return reports_pb2_grpc.StatsServiceStub(channel).GetStats(
            reports_pb2.GetStatsRequest(**fields), metadata=metadata, timeout=10)


def _compare(mesh: CampaignMesh, query: dict[str, Any]) -> reports_pb2.CompareProvidersResponse:
    with grpc.insecure_channel(mesh.endpoint) as channel:
        return reports_pb2_grpc.StatsServiceStub(channel).CompareProviders(reports_pb2.CompareProvidersRequest(
            start_time=_timestamp(query["startTime"]), end_time=_timestamp(query["endTime"])),
            metadata=_admin(mesh), timeout=10)


def _route(mesh: CampaignMesh, message_class: common_pb2.MessageClass.ValueType,
           message_bytes: int) -> providers_pb2.RouteEmailResponse:
    with grpc.insecure_channel(mesh.endpoint) as channel:
        return providers_pb2_grpc.ProviderServiceStub(channel).RouteEmail(providers_pb2.RouteEmailRequest(
            message_class=message_class, message_bytes=message_bytes, recipient_count=1),
            metadata=_admin(mesh), timeout=10)


ROUTED = (("otp", common_pb2.MESSAGE_CLASS_OTP, 3000), ("transactional", common_pb2.MESSAGE_CLASS_TRANSACTIONAL, 25000),
          ("bulk", common_pb2.MESSAGE_CLASS_BULK, 60000))
"""The classes and typical sizes the dashboard's routing panel ranks for."""


def _admin(mesh: CampaignMesh) -> Metadata:
    return (("authorization", f"Bearer {mesh.config.admin_token}"),)


def _counts(row: reports_pb2.StatsRow) -> dict[str, int]:
    return {name: int(getattr(row, name)) for name in (*VOLUME, "complained")}


def _send_everything(mesh: CampaignMesh, other_key: str) -> tuple[dict[str, int], dict[str, int], str]:
    """Mail of both tenants through the simulated Mailgun: acme's expected counts, the other's, acme's campaign."""
    knobs = mesh.knobs
    # Callbacks a little after the provider's answer, as real providers send them (reports has recorded the send).
    knobs(bounce_rate=1.0, complaint_rate=0.0, webhook_delay_ms=200, webhook_jitter_ms=100)
    _wait_states(mesh, mesh.api_key, _send(mesh, mesh.api_key, 2), messages_pb2.MESSAGE_STATE_BOUNCED)
    knobs(bounce_rate=0.0, complaint_rate=1.0)
    _wait_states(mesh, mesh.api_key, _send(mesh, mesh.api_key, 1), messages_pb2.MESSAGE_STATE_COMPLAINED)
    knobs(bounce_rate=0.0, complaint_rate=0.0)
    channel, stub = mesh.campaigns()
    with channel:
        created = create_and_fill(stub, mesh.auth(), campaign("dashboard-spring"), 3)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=mesh.auth(), timeout=10)
        plain = _send(mesh, mesh.api_key, 5)
        other = _send(mesh, other_key, 4)
        _wait_states(mesh, mesh.api_key, plain, messages_pb2.MESSAGE_STATE_DELIVERED)
        _wait_states(mesh, other_key, other, messages_pb2.MESSAGE_STATE_DELIVERED)
        wait_for_progress(lambda: progress(stub, mesh.auth(), created.name).progress, lambda p: p.delivered == 3,
                          what="the campaign's three emails delivered", stall_s=STALL_S, every_s=0.2)
    acme = {"accepted": 11, "sent": 11, "delivered": 9, "bounced": 2, "failed": 0, "complained": 1}
    return acme, {"accepted": 4, "sent": 4, "delivered": 4, "bounced": 0, "failed": 0, "complained": 0}, created.name


# ---- the browser side ------------------------------------------------------------------------------------------

def _snapshot(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page drew last (``window.__dashboard``), read at once (the page keeps refreshing)."""
    text = driver.execute_script("return window.__dashboard ? JSON.stringify(window.__dashboard) : null")
    return dict(json.loads(text)) if text else {}


def _drawn(snapshot: dict[str, Any]) -> str:
    """What of a snapshot moves towards the figures a test waits for (not its refresh count and clock, which move
    on every redraw of the same figures)."""
    return json.dumps({k: snapshot.get(k) for k in ("view", "tenant", "range", "total", "providers", "tenants")},
                      sort_keys=True)


def _wait_snapshot(driver: webdriver.Chrome, what: str, predicate: Any) -> dict[str, Any]:
    """The page's snapshot once ``predicate`` holds; fails when the figures it draws stopped changing for
    ``STALL_S`` without getting there."""
    try:
        return wait_for_progress(lambda: _snapshot(driver), lambda s: bool(s) and bool(predicate(s)),
                                 what=f"the dashboard showing {what}", stall_s=STALL_S, every_s=0.2, progress=_drawn,
                                 describe=lambda s: json.dumps(s)[:2000])
    except AssertionError as exc:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"{exc} (error shown: {error!r})") from None


def _sign_in(driver: webdriver.Chrome, key: str) -> None:
    # A page that shows a field either does so or not: nothing in between to watch move, so the stall window is
    # the whole wait.
    field = WebDriverWait(driver, STALL_S).until(lambda d: d.find_element(By.ID, "key-input"))
    WebDriverWait(driver, STALL_S).until(lambda d: field.is_displayed())
    field.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()


def _severe(driver: webdriver.Chrome, tenant_probe_expected: bool) -> list[dict[str, Any]]:
    """SEVERE console entries. A tenant's key is told apart from the admin token by CompareProviders answering
    403, which Chromium logs as a failed resource load: that one entry is expected in the tenant view."""
    entries = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[no-untyped-call]
    return [e for e in entries if not (
        tenant_probe_expected and e["source"] == "network" and "/v1/stats:compareProviders?" in e["message"]
        and "status of 403" in e["message"])]


def _pixels(driver: webdriver.Chrome, chart: str, rgb: tuple[int, int, int]) -> int:
    """How many pixels of ``rgb`` the chart's canvas holds: its lines were drawn, not only its axes."""
    return int(driver.execute_script("""
        const [id, r, g, b] = arguments;
        const canvas = document.querySelector(`#${id} canvas`);
        if (!canvas) { return -1; }
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4) {
          if (Math.abs(data[i] - r) < 8 && Math.abs(data[i + 1] - g) < 8 && Math.abs(data[i + 2] - b) < 8
              && data[i + 3] > 200) { n++; }
        }
        return n;""", chart, *rgb))


def _screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page, not only the window's height."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": WINDOW[0], "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _series(snapshot: dict[str, Any], chart: str) -> dict[str, list[Any]]:
    drawn = snapshot["charts"][chart]
    return dict(zip(drawn["labels"], drawn["data"], strict=True))


def _assert_volume_is_the_bucketed_stats(snapshot: dict[str, Any], replay: reports_pb2.GetStatsResponse) -> None:
    """Every bucket the page drew holds GetStats' figures for it (zero where GetStats has no row), and every row of
    GetStats is drawn."""
    volume = _series(snapshot, "volume")
    by_bucket = {_timestamp(row.dimensions["bucket"]).seconds: row for row in replay.rows}
    assert set(by_bucket) <= set(volume["time"]), "a bucket of GetStats is missing from the chart"
    for i, at in enumerate(volume["time"]):
        row = by_bucket.get(int(at))
        for name in VOLUME:
            assert volume[name][i] == (int(getattr(row, name)) if row else 0), (name, at)
    complaints = _series(snapshot, "complaints")
    for i, at in enumerate(complaints["time"]):
        row = by_bucket.get(int(at))
        if row is not None and row.delivered:
            assert complaints["complaintRate"][i] == _approx(row.complaint_rate * 100)


def _approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-9, abs=1e-12)


# ---- the test --------------------------------------------------------------------------------------------------

def test_the_dashboard_draws_each_keys_own_figures(browser: webdriver.Chrome, dashboard_mesh: CampaignMesh,
                                                   artifacts: Path) -> None:
    # (The browser first: without Chromium the test fails at once, before a mesh is started for nothing.)
    mesh = dashboard_mesh
    other_tenant, other_key = mesh.new_tenant(1_000_000)
    acme_sent, other_sent, campaign_name = _send_everything(mesh, other_key)
    wait_for_progress(lambda: _counts(_stats(mesh, mesh.auth()).total), lambda got: got == acme_sent,
                      what="acme's stats", stall_s=STALL_S, every_s=0.3)
    wait_for_progress(lambda: _counts(_stats(mesh, mesh.auth(other_key)).total), lambda got: got == other_sent,
                      what="the other's stats", stall_s=STALL_S, every_s=0.3)
    gateway = f"http://127.0.0.1:{mesh.config.gateway_port}"

    # A tenant's key may not reach past its own figures through the API the page calls.
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {mesh.api_key}"}, timeout=10) as api:
        assert api.get("/v1/stats:compareProviders").status_code == 403
        assert api.get("/v1/stats", params={"tenant": f"tenants/{other_tenant}"}).status_code in (403, 404)
        assert api.get("/v1/stats", params={"dimensions": "tenant"}).status_code == 403

    # ---- the tenant view
    browser.get(f"{gateway}/dashboard?range=1h&refresh=2")
    _sign_in(browser, mesh.api_key)
    tenant_view = _wait_snapshot(browser, "acme's figures", lambda s: s["view"] == "tenant"
                                 and s["total"]["accepted"] == acme_sent["accepted"])
    assert "esp.dashboard.key" not in browser.current_url and mesh.api_key not in browser.current_url
    query = tenant_view["query"]
    assert (query["bucket"], tenant_view["range"]) == ("minute", "1h")

    # Totals: what was sent, and what GetStats answers for the page's own range.
    total = _stats(mesh, mesh.auth(), query).total
    assert {name: tenant_view["total"][name] for name in acme_sent} == acme_sent == _counts(total)
    assert tenant_view["total"]["creditsCharged"] == total.credits_charged > 0
    assert tenant_view["total"]["complaintRate"] == _approx(total.complaint_rate)
    for kind in ("sendLatency", "deliveryLatency"):
        replayed = getattr(total, "send_latency" if kind == "sendLatency" else "delivery_latency")
        assert [tenant_view["total"][kind][p] for p in ("p50", "p95", "p99", "count")] == [
            replayed.p50_ms, replayed.p95_ms, replayed.p99_ms, replayed.count]
    assert tenant_view["total"]["deliveryLatency"]["count"] == acme_sent["delivered"]

    # The charts hold the bucketed figures, summing to the totals; the thresholds are the response's.
    replay = _stats(mesh, mesh.auth(), query, bucket="minute")
    _assert_volume_is_the_bucketed_stats(tenant_view, replay)
    volume = _series(tenant_view, "volume")
    assert {name: sum(volume[name]) for name in VOLUME} == {name: acme_sent[name] for name in VOLUME}
    complaints = _series(tenant_view, "complaints")
    assert set(complaints["warning"]) == {replay.complaint_rate_warning * 100} == {0.1}
    assert set(complaints["critical"]) == {replay.complaint_rate_critical * 100} == {0.3}
    assert tenant_view["thresholds"] == {"warning": 0.001, "critical": 0.003}
    assert _pixels(browser, "chart-volume", GREEN) > 0, "no delivered line drawn"
    assert _pixels(browser, "chart-complaints", RED) > 0, "no critical threshold drawn"
    assert _pixels(browser, "chart-complaints", PURPLE) > 0, "no complaint rate drawn"

    # Cost per provider and campaign progress.
    by_provider = _stats(mesh, mesh.auth(), query, dimensions=["provider"])
    assert [(p["provider"], p["delivered"], p["creditsCharged"]) for p in tenant_view["providers"]] == [
        (row.dimensions["provider"], row.delivered, row.credits_charged) for row in by_provider.rows
        if row.dimensions["provider"]] == [
        (PROVIDER, acme_sent["delivered"], total.credits_charged)]
    assert tenant_view["providers"][0]["creditsPerThousandDelivered"] == _approx(
        next(r for r in by_provider.rows if r.dimensions["provider"] == PROVIDER).credits_per_thousand_delivered)
    channel, stub = mesh.campaigns()
    with channel:
        shown = progress(stub, mesh.auth(), campaign_name).progress
    assert [(c["name"], c["recipients"], c["sent"], c["delivered"]) for c in tenant_view["campaigns"]] == [
        (campaign_name, shown.recipients, shown.sent, shown.delivered)] == [(campaign_name, 3, 3, 3)]

    # Nothing of the other tenant, anywhere on the page.
    page = browser.page_source
    assert other_tenant not in page and other_key not in page and mesh.api_key not in page
    assert tenant_view["tenants"] == [] and tenant_view["health"] == [] and tenant_view["routing"] == []
    assert not browser.find_element(By.ID, "health-panel").is_displayed()
    assert not browser.find_element(By.ID, "routing-panel").is_displayed()
    assert not browser.find_element(By.ID, "tenants-panel").is_displayed()

    # It refreshes itself: one more email shows up without a reload.
    before = tenant_view["refreshCount"]
    _wait_states(mesh, mesh.api_key, _send(mesh, mesh.api_key, 1), messages_pb2.MESSAGE_STATE_DELIVERED)
    refreshed = _wait_snapshot(browser, "the new email", lambda s: s["total"]["accepted"] == 12
                               and s["total"]["delivered"] == 10)
    assert refreshed["refreshCount"] > before
    assert browser.find_element(By.ID, "updated-at").text.startswith("Updated ")
    _screenshot(browser, artifacts / "dashboard-tenant.png")
    assert _severe(browser, tenant_probe_expected=True) == []

    # ---- the platform view: the admin token sees both tenants, the providers' health and cost
    browser.find_element(By.ID, "sign-out").click()
    _sign_in(browser, mesh.config.admin_token)
    platform = _wait_snapshot(browser, "every tenant", lambda s: s["view"] == "platform"
                              and len(s["tenants"]) == 2 and s["total"]["accepted"] == 16)
    query = platform["query"]
    per_tenant = _stats(mesh, _admin(mesh), query, dimensions=["tenant"])
    drawn = {t["tenant"]: {name: t[name] for name in acme_sent} for t in platform["tenants"]}
    assert drawn == {f"tenants/{row.dimensions['tenant'].removeprefix('tenants/')}": _counts(row)
                     for row in per_tenant.rows}
    assert drawn == {"tenants/acme": {**acme_sent, "accepted": 12, "sent": 12, "delivered": 10},
                     f"tenants/{other_tenant}": other_sent}
    everyone = _stats(mesh, _admin(mesh), query).total
    assert {name: platform["total"][name] for name in acme_sent} == _counts(everyone)
    health = _compare(mesh, query)
    assert [(h["provider"], h["breakerState"], h["dailyQuotaUsed"], h["dailyQuotaLimit"])
            for h in platform["health"]] == [
        (p.provider, p.breaker_state, p.daily_quota_used, p.daily_quota_limit) for p in health.providers]
    assert next(h for h in platform["health"] if h["provider"] == PROVIDER)["breakerState"] == "closed"
    assert browser.find_element(By.ID, "health-panel").is_displayed()
    # How each class is routed now, with the reasons RouteEmail gives.
    expected_routing = []
    for name, message_class, size in ROUTED:
        route = _route(mesh, message_class, size)
        expected_routing += [(name, i + 1, s.provider.removeprefix("providers/"),
                              s.below_floor_reason or "meets the class's floor") for i, s in enumerate(route.ranked)]
        expected_routing += [(name, 0, s.provider.removeprefix("providers/"), f"left out: {s.excluded_reason}")
                             for s in route.excluded]
    assert [(r["messageClass"], r["rank"], r["provider"], r["why"]) for r in platform["routing"]] == expected_routing
    assert any(r["rank"] == 1 for r in platform["routing"])
    assert browser.find_element(By.ID, "routing-panel").is_displayed()
    cost = _stats(mesh, _admin(mesh), query, dimensions=["provider"])
    assert [(p["provider"], p["providerCostMicros"]) for p in platform["providers"]] == [
        (row.dimensions["provider"], row.provider_cost_micros) for row in cost.rows if row.dimensions["provider"]]
    assert platform["providers"][0]["providerCostMicros"] > 0
    by_campaign = _stats(mesh, _admin(mesh), query, dimensions=["tenant", "campaign"])
    assert [(c["campaign"], c["tenant"], c["sent"], c["delivered"]) for c in platform["campaigns"]] == [
        (row.dimensions["campaign"], f"tenants/{row.dimensions['tenant'].removeprefix('tenants/')}", row.sent,
         row.delivered) for row in by_campaign.rows if row.dimensions["campaign"]] == [
        (campaign_name, "tenants/acme", 3, 3)]
    _screenshot(browser, artifacts / "dashboard-platform.png")

    # Every range the selector offers is a query the API accepts, with a bucket it allows.
    for value, bucket in (("24h", "hour"), ("7d", "hour"), ("30d", "day")):
        Select(browser.find_element(By.ID, "range-select")).select_by_value(value)
        ranged = _wait_snapshot(browser, f"the range {value}", lambda s, v=value: s["range"] == v)
        assert ranged["query"]["bucket"] == bucket
        assert {name: ranged["total"][name] for name in acme_sent} == _counts(everyone)
        assert sum(_series(ranged, "volume")["accepted"]) == everyone.accepted

    # The tenant picker narrows every panel to one tenant.
    Select(browser.find_element(By.ID, "tenant-select")).select_by_value(f"tenants/{other_tenant}")
    picked = _wait_snapshot(browser, "the other tenant alone", lambda s: s["tenant"] == f"tenants/{other_tenant}")
    assert {name: picked["total"][name] for name in other_sent} == other_sent
    assert _severe(browser, tenant_probe_expected=False) == []
