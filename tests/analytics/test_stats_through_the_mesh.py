"""Stats of mail sent through the whole mesh, checked against what was sent and what the simulator did with it.

Every figure is compared with one computed from the raw events (traffic.py): counts per grouping and time bucket,
rates as ratios of those counts, latency percentiles against exact percentiles of the raw latencies (within the
histogram's stated error: the estimate lies in the bucket of the exact value, and buckets grow by 25 %), credits
against the price book and provider cost against the catalog prices. Tenant keys see their own figures only, the
platform admin every tenant's; bad queries are refused at once, naming the field and the limit.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from esp.v1 import messages_pb2, reports_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.analytics.conftest import STALL_S, AnalyticsMesh, Traffic
from tests.analytics.traffic import (
    DOMAINS,
    PROVIDERS,
    SIMULATOR_CALLBACKS,
    SLOW_LATENCY_MS,
    SLOW_PROVIDER,
    Expected,
    Outcome,
    SentEmail,
    exact_percentile,
    expected_groups,
    expected_total,
    within_sketch_error,
)
from tests.progress import wait_for_progress

M, R = messages_pb2, reports_pb2
COUNTS = ("accepted", "sent", "delivered", "bounced", "bounced_hard", "bounced_soft", "complained", "failed",
          "deferred", "suppressed", "cancelled", "provider_calls", "provider_errors", "provider_throttled",
          "credits_charged")
ADMIN_COUNTS = (*COUNTS, "provider_cost_micros")
LATENCIES = {"send_latency": "send_latencies", "delivery_latency": "delivery_latencies",
             "provider_call_latency": "call_latencies"}
QUANTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}
FAST_ANSWER_S = 2.0
"""A refused query is answered at once, never after a slow query."""


# -- helpers -----------------------------------------------------------------------------------------------------
def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def stats_request(traffic: Traffic, **fields: Any) -> reports_pb2.GetStatsRequest:
    """A GetStats request over the traffic's range (unless ``start``/``end`` say otherwise)."""
    start: datetime = fields.pop("start", traffic.start)
    end: datetime = fields.pop("end", traffic.end)
    request = R.GetStatsRequest(**fields)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    return request


def get_stats(mesh: AnalyticsMesh, traffic: Traffic, who: str = "admin", **fields: Any) -> reports_pb2.GetStatsResponse:
    """GetStats at the gRPC edge as the platform admin or the tenant labelled ``who``."""
    metadata = mesh.admin() if who == "admin" else mesh.auth(who)
    return mesh.stats.GetStats(stats_request(traffic, **fields), metadata=metadata, timeout=10)


def rows_by_key(response: reports_pb2.GetStatsResponse) -> dict[tuple[str, ...], reports_pb2.StatsRow]:
    """Rows keyed like expected_groups: the bucket first, then each dimension's value."""
    return {tuple(row.dimensions[name] for name in response.dimensions): row for row in response.rows}


def counts_of(row: reports_pb2.StatsRow, names: Sequence[str] = COUNTS) -> dict[str, int]:
    return {name: getattr(row, name) for name in names}


def expected_counts(expected: Expected, names: Sequence[str] = COUNTS) -> dict[str, int]:
    return {name: expected.counts[name] for name in names}


def assert_groups(response: reports_pb2.GetStatsResponse, expected: Mapping[tuple[str, ...], Expected],
                  names: Sequence[str] = COUNTS) -> None:
    rows = rows_by_key(response)
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        assert counts_of(row, names) == expected_counts(expected[key], names), key


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def field_violations(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(error)
    assert status is not None, error
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += bad_request.field_violations
    return violations


def rest_counts(row: Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """Counts of a StatsRow in proto3 JSON (int64 as strings, zeros left out)."""
    return {name: int(row.get(_camel(name), 0)) for name in names}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


@pytest.fixture(scope="module")
def settled(analytics_mesh: AnalyticsMesh, traffic: Traffic) -> Traffic:
    """The traffic once the platform's stats count all of it (polled for as long as the counts keep moving)."""
    want = expected_counts(expected_total(traffic.emails, traffic.cost), ADMIN_COUNTS)
    wait_for_progress(lambda: counts_of(get_stats(analytics_mesh, traffic).total, ADMIN_COUNTS),
                      lambda got: got == want, what="the stats counting all the traffic", stall_s=STALL_S,
                      every_s=0.2, describe=lambda got: f"{got}, want {want}")
    return traffic


# -- what was sent -----------------------------------------------------------------------------------------------
def test_each_email_went_through_the_one_provider_of_its_class_and_met_its_planned_fate(settled: Traffic) -> None:
    for email in settled.emails:
        assert email.provider == email.plan.provider == settled.simulator_provider[email.message_id]
        assert settled.simulator_callbacks.get(email.message_id, []) == SIMULATOR_CALLBACKS[email.plan.outcome]
        assert {e.provider for e in email.events if e.type != M.MESSAGE_EVENT_TYPE_ACCEPTED} == {email.provider}
    outcomes = {outcome: sum(e.plan.outcome is outcome for e in settled.emails) for outcome in Outcome}
    assert outcomes == {Outcome.DELIVERED: 36, Outcome.HARD_BOUNCE: 4, Outcome.COMPLAINT: 3, Outcome.SOFT_BOUNCE: 3}
    assert {e.plan.mailbox_provider for e in settled.emails} == set(DOMAINS.values())


# -- counts per grouping -----------------------------------------------------------------------------------------
def test_the_platform_total_counts_every_event_once(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    total = get_stats(analytics_mesh, settled).total

    assert counts_of(total, ADMIN_COUNTS) == expected_counts(expected_total(settled.emails, settled.cost),
                                                             ADMIN_COUNTS)
    assert (total.accepted, total.sent, total.delivered, total.bounced_hard, total.bounced_soft,
            total.complained) == (46, 46, 39, 4, 3, 3)


@pytest.mark.parametrize("dimensions", [
    ("provider",), ("message_class",), ("mailbox_provider",), ("provider", "mailbox_provider"), ("tenant",),
    ("tenant", "message_class", "mailbox_provider"),
])
def test_each_grouping_counts_every_event_under_its_group(analytics_mesh: AnalyticsMesh, settled: Traffic,
                                                          dimensions: tuple[str, ...]) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=dimensions)

    assert tuple(response.dimensions) == dimensions
    assert_groups(response, expected_groups(settled.emails, settled.cost, dimensions), ADMIN_COUNTS)
    assert counts_of(response.total, ADMIN_COUNTS) == expected_counts(
        expected_total(settled.emails, settled.cost), ADMIN_COUNTS)


def test_the_accepted_event_is_counted_under_no_provider(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    rows = rows_by_key(get_stats(analytics_mesh, settled, dimensions=["provider"]))

    assert rows[("",)].accepted == len(settled.emails) and rows[("",)].sent == 0
    assert all(rows[(name,)].accepted == 0 for name in PROVIDERS)


def test_a_message_counts_under_each_of_its_tags_and_once_in_the_total(analytics_mesh: AnalyticsMesh,
                                                                       settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=["tag"])

    assert_groups(response, expected_groups(settled.emails, settled.cost, ("tag",)))
    rows = rows_by_key(response)
    assert sorted(rows) == [("eu",), ("login",), ("news",), ("promo",), ("receipt",)]
    tag_counts = [len(e.plan.tags) for e in settled.emails]
    assert 0 in tag_counts and 2 in tag_counts
    assert sum(row.sent for row in rows.values()) == sum(tag_counts)  # a two-tag email twice, an untagged one never
    assert response.total.sent == response.total.accepted == len(settled.emails)  # ... but each once in the total


def test_minute_buckets_by_provider_count_each_event_in_its_minute(analytics_mesh: AnalyticsMesh,
                                                                   settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, bucket="minute", dimensions=["provider"])

    assert tuple(response.dimensions) == ("bucket", "provider")
    assert_groups(response, expected_groups(settled.emails, settled.cost, ("provider",), "minute"))


def test_hour_buckets_by_message_class_and_tag_count_each_event_in_its_hour(analytics_mesh: AnalyticsMesh,
                                                                            settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, bucket="hour", dimensions=["message_class", "tag"])

    assert_groups(response, expected_groups(settled.emails, settled.cost, ("message_class", "tag"), "hour"))


def test_filters_keep_only_the_provider_tag_or_mailbox_provider_asked_for(analytics_mesh: AnalyticsMesh,
                                                                          settled: Traffic) -> None:
    emails = settled.emails
    by_provider = expected_groups(emails, settled.cost, ("provider",))[("sendgrid-1",)]
    by_tag = expected_groups(emails, settled.cost, ("tag",))[("eu",)]
    by_mailbox = expected_groups(emails, settled.cost, ("mailbox_provider",))[("apple",)]

    assert counts_of(get_stats(analytics_mesh, settled, provider="sendgrid-1").total) == expected_counts(by_provider)
    assert counts_of(get_stats(analytics_mesh, settled, tag="eu").total) == expected_counts(by_tag)
    assert counts_of(get_stats(analytics_mesh, settled, mailbox_provider="apple").total) == expected_counts(
        by_mailbox)


# -- rates -------------------------------------------------------------------------------------------------------
def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def test_rates_are_the_ratios_of_the_counts(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=["provider", "message_class"])
    expected = expected_groups(settled.emails, settled.cost, ("provider", "message_class"))

    for key, row in [*rows_by_key(response).items(), ((), response.total)]:
        counts = expected[key].counts if key else expected_total(settled.emails, settled.cost).counts
        assert row.delivery_rate == pytest.approx(_ratio(counts["delivered"], counts["sent"])), key
        assert row.bounce_rate == pytest.approx(_ratio(counts["bounced"], counts["sent"])), key
        assert row.complaint_rate == pytest.approx(_ratio(counts["complained"], counts["delivered"])), key


def test_the_complaint_rate_status_compares_with_gmails_thresholds(analytics_mesh: AnalyticsMesh,
                                                                   settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=["provider"])
    rows = rows_by_key(response)

    assert (response.complaint_rate_warning, response.complaint_rate_critical) == (0.001, 0.003)
    # mailgun-us (otp) had no complaints; sendgrid-1 and postmark-1 had some out of a few dozen: far above 0.3 %.
    assert rows[("mailgun-us",)].complaint_rate_status == R.COMPLAINT_RATE_STATUS_OK
    assert rows[("sendgrid-1",)].complaint_rate_status == R.COMPLAINT_RATE_STATUS_CRITICAL
    assert rows[("postmark-1",)].complaint_rate_status == R.COMPLAINT_RATE_STATUS_CRITICAL
    assert response.total.complaint_rate_status == R.COMPLAINT_RATE_STATUS_CRITICAL


# -- latency percentiles -----------------------------------------------------------------------------------------
def _assert_percentiles(figures: reports_pb2.LatencyPercentiles, raw: Sequence[float], what: str) -> None:
    assert figures.count == len(raw), what
    if not raw:
        return
    for name, quantile in QUANTILES.items():
        exact = exact_percentile(raw, quantile)
        estimate = getattr(figures, name)
        assert within_sketch_error(estimate, exact), f"{what} {name}: {estimate} vs exact {exact} (raw {sorted(raw)})"


@pytest.mark.parametrize("dimensions", [(), ("provider",), ("tenant",), ("message_class", "mailbox_provider")])
def test_latency_percentiles_are_within_the_sketch_error_of_the_raw_latencies(
        analytics_mesh: AnalyticsMesh, settled: Traffic, dimensions: tuple[str, ...]) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=dimensions,
                         metrics=["send_latency", "delivery_latency", "provider_call_latency"])
    expected = expected_groups(settled.emails, settled.cost, dimensions)

    groups = [(key, row) for key, row in rows_by_key(response).items()] if dimensions else [((), response.total)]
    for key, row in groups:
        for metric, raw in LATENCIES.items():
            _assert_percentiles(getattr(row, metric), getattr(expected[key], raw), f"{key} {metric}")


def test_the_slow_providers_call_latency_stands_above_the_others(analytics_mesh: AnalyticsMesh,
                                                                 settled: Traffic) -> None:
    rows = rows_by_key(get_stats(analytics_mesh, settled, dimensions=["provider"], metrics=["provider_call_latency"]))
    slow = rows[(SLOW_PROVIDER,)].provider_call_latency

    # The simulator held every call to the slow provider for its latency knob ...
    assert min(e.latency_ms for email in settled.emails if email.provider == SLOW_PROVIDER
               for e in email.events if e.type == M.MESSAGE_EVENT_TYPE_SENT) >= SLOW_LATENCY_MS
    # ... and the stats show it: its median call is slower than the knob allows for (the sketch's error) and
    # several times the others' (which answer at once; the margin leaves room for a busy machine).
    assert slow.p50_ms >= SLOW_LATENCY_MS * 0.8
    for name in PROVIDERS:
        if name != SLOW_PROVIDER:
            assert slow.p50_ms > rows[(name,)].provider_call_latency.p50_ms * 3, name
    assert rows[(SLOW_PROVIDER,)].latency_ms_p50 == slow.p50_ms  # the first API's fields tell the same


# -- cost --------------------------------------------------------------------------------------------------------
def _price(traffic: Traffic, email: SentEmail) -> int:
    book = traffic.price_books[email.plan.tenant]
    return int(getattr(book, f"{email.plan.message_class}_per_email"))


def test_each_message_is_charged_its_tenants_price_book_price(settled: Traffic) -> None:
    assert all(email.credits == _price(settled, email) for email in settled.emails)
    assert settled.price_books["A"].otp_per_email != settled.price_books["B"].otp_per_email


@pytest.mark.parametrize("who", ["A", "B"])
def test_credits_charged_are_the_price_book_credits_of_the_sent_messages(analytics_mesh: AnalyticsMesh,
                                                                         settled: Traffic, who: str) -> None:
    emails = settled.of(who, analytics_mesh)
    response = get_stats(analytics_mesh, settled, who, dimensions=["message_class"])

    for (message_class,), row in rows_by_key(response).items():
        assert row.credits_charged == sum(_price(settled, e) for e in emails
                                          if e.plan.message_class == message_class)
    assert response.total.credits_charged == sum(_price(settled, e) for e in emails)
    total = response.total
    assert total.credits_per_delivered == pytest.approx(total.credits_charged / total.delivered)
    assert total.credits_per_thousand_delivered == pytest.approx(1000 * total.credits_charged / total.delivered)


def test_provider_cost_is_each_sent_email_at_its_providers_catalog_price(analytics_mesh: AnalyticsMesh,
                                                                         settled: Traffic) -> None:
    rows = rows_by_key(get_stats(analytics_mesh, settled, dimensions=["provider"]))

    for name, plan in PROVIDERS.items():
        sent = [e for e in settled.emails if e.provider == name]
        expected = sum(plan.price_per_email_micros + plan.price_per_mb_micros * e.plan.message_bytes() // 1_000_000
                       for e in sent)
        row = rows[(name,)]
        assert row.provider_cost_micros == expected, name
        assert row.provider_cost_micros_per_delivered == pytest.approx(expected / row.delivered)
    # The per-MB part shows: sendgrid-1's emails cost more than its price per email alone.
    assert rows[("sendgrid-1",)].provider_cost_micros > 120 * rows[("sendgrid-1",)].sent


# -- provider comparison -----------------------------------------------------------------------------------------
def _compare_request(traffic: Traffic) -> reports_pb2.CompareProvidersRequest:
    request = R.CompareProvidersRequest()
    request.start_time.FromDatetime(traffic.start)
    request.end_time.FromDatetime(traffic.end)
    return request


def test_compare_providers_shows_each_provider_with_its_get_stats_figures_and_health(
        analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    compared = analytics_mesh.stats.CompareProviders(_compare_request(settled), metadata=analytics_mesh.admin(),
                                                     timeout=10)
    rows = rows_by_key(get_stats(analytics_mesh, settled, dimensions=["provider"]))

    assert [p.provider for p in compared.providers] == sorted(PROVIDERS)
    for entry in compared.providers:
        row = rows[(entry.provider,)]
        figures = entry.figures
        assert counts_of(figures, ADMIN_COUNTS) == counts_of(row, ADMIN_COUNTS), entry.provider
        for name in ("delivery_rate", "bounce_rate", "complaint_rate", "provider_cost_micros_per_thousand_delivered"):
            assert getattr(figures, name) == pytest.approx(getattr(row, name)), (entry.provider, name)
        for metric in LATENCIES:
            assert getattr(figures, metric) == getattr(row, metric), (entry.provider, metric)
        plan = PROVIDERS[entry.provider]
        assert (entry.provider_type, entry.enabled, entry.price_per_email_micros) == (
            {"mailgun-us": "mailgun", "sendgrid-1": "sendgrid", "postmark-1": "postmark"}[entry.provider], True,
            plan.price_per_email_micros)
        assert entry.breaker_state == "closed"
        assert (entry.daily_quota_limit, entry.monthly_quota_limit) == (0, 0)
        # Every provider here took mail today: its quota counters saw it, and a month holds its day.
        assert entry.monthly_quota_used >= entry.daily_quota_used > 0, entry.provider


def test_compare_providers_is_refused_to_a_tenant_key(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    error = rpc_error(lambda: analytics_mesh.stats.CompareProviders(
        _compare_request(settled), metadata=analytics_mesh.auth("A"), timeout=10))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# -- tenant isolation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["A", "B"])
def test_a_tenant_key_sees_only_its_own_figures(analytics_mesh: AnalyticsMesh, settled: Traffic, who: str) -> None:
    own = settled.of(who, analytics_mesh)
    response = get_stats(analytics_mesh, settled, who, dimensions=["provider", "mailbox_provider"])

    assert counts_of(response.total) == expected_counts(expected_total(own, settled.cost))
    assert_groups(response, expected_groups(own, settled.cost, ("provider", "mailbox_provider")))
    assert response.total.provider_cost_micros == 0  # the providers' cost is not a tenant's to see


def test_a_tenant_key_naming_another_tenant_gets_not_found(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    other = f"tenants/{analytics_mesh.tenant_ids['B']}"
    error = rpc_error(lambda: get_stats(analytics_mesh, settled, "A", tenant=other))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    own = get_stats(analytics_mesh, settled, "A", tenant=f"tenants/{analytics_mesh.tenant_ids['A']}")
    assert counts_of(own.total) == expected_counts(expected_total(settled.of("A", analytics_mesh), settled.cost))


@pytest.mark.parametrize("fields", [{"dimensions": ["tenant"]}, {"metrics": ["provider_cost_micros"]},
                                    {"metrics": ["provider_cost_micros_per_delivered"]}])
def test_admin_only_dimensions_and_metrics_are_refused_to_a_tenant_key(analytics_mesh: AnalyticsMesh,
                                                                       settled: Traffic,
                                                                       fields: dict[str, Any]) -> None:
    error = rpc_error(lambda: get_stats(analytics_mesh, settled, "A", **fields))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def _export(analytics_mesh: AnalyticsMesh, settled: Traffic, who: str, **fields: Any) -> list[dict[str, str]]:
    chunks = analytics_mesh.stats.ExportStats(R.ExportStatsRequest(query=stats_request(settled, **fields)),
                                              metadata=analytics_mesh.auth(who), timeout=10)
    text = b"".join(chunk.data for chunk in chunks).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_a_tenants_csv_export_holds_only_its_own_rows(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    rows = _export(analytics_mesh, settled, "A", dimensions=["provider"], metrics=["sent", "delivered",
                                                                                   "credits_charged"])
    expected = expected_groups(settled.of("A", analytics_mesh), settled.cost, ("provider",))

    got = {row["provider"]: (int(row["sent"]), int(row["delivered"]), int(row["credits_charged"])) for row in rows}
    assert got == {key[0]: (e.counts["sent"], e.counts["delivered"], e.counts["credits_charged"])
                   for key, e in expected.items()}


def test_a_tenants_csv_export_refuses_the_tenant_dimension(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    error = rpc_error(lambda: _export(analytics_mesh, settled, "A", dimensions=["tenant"]))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_admin_sees_every_tenant_and_the_platform_total_is_their_sum(analytics_mesh: AnalyticsMesh,
                                                                         settled: Traffic) -> None:
    response = get_stats(analytics_mesh, settled, dimensions=["tenant"])
    rows = rows_by_key(response)
    a, b = (analytics_mesh.tenant_ids[label] for label in ("A", "B"))

    assert sorted(rows) == sorted([(a,), (b,)])
    for label, tenant_id in (("A", a), ("B", b)):
        assert counts_of(rows[(tenant_id,)], ADMIN_COUNTS) == expected_counts(
            expected_total(settled.of(label, analytics_mesh), settled.cost), ADMIN_COUNTS)
    assert counts_of(response.total, ADMIN_COUNTS) == {
        name: getattr(rows[(a,)], name) + getattr(rows[(b,)], name) for name in ADMIN_COUNTS}
    one = get_stats(analytics_mesh, settled, tenant=f"tenants/{b}")
    assert counts_of(one.total, ADMIN_COUNTS) == counts_of(rows[(b,)], ADMIN_COUNTS)


# -- REST and the dashboard's requests ---------------------------------------------------------------------------
Params = list[tuple[str, str | int | float | bool | None]]


def _dashboard_params(traffic: Traffic, *extra: tuple[str, str]) -> Params:
    """The query string the dashboard sends (camelCase, dimensions repeated)."""
    return [("startTime", _rfc3339(traffic.start)), ("endTime", _rfc3339(traffic.end)), *extra]


def test_rest_stats_equal_the_grpc_stats(analytics_mesh: AnalyticsMesh, settled: Traffic) -> None:
    dimensions = ("provider", "mailbox_provider")
    with analytics_mesh.rest(analytics_mesh.keys["A"]) as http:
        response = http.get("/v1/stats", params=_dashboard_params(
            settled, *(("dimensions", d) for d in dimensions)))
    assert response.status_code == 200, response.text
    body = response.json()
    grpc_rows = rows_by_key(get_stats(analytics_mesh, settled, "A", dimensions=dimensions))

    rest_rows = {tuple(row["dimensions"][d] for d in body["dimensions"]): row for row in body["rows"]}
    assert sorted(rest_rows) == sorted(grpc_rows)
    for key, row in rest_rows.items():
        assert rest_counts(row, COUNTS) == counts_of(grpc_rows[key]), key


def test_the_dashboards_requests_with_a_tenant_key_see_only_that_tenant(analytics_mesh: AnalyticsMesh,
                                                                        settled: Traffic) -> None:
    own = expected_total(settled.of("A", analytics_mesh), settled.cost)
    other = f"tenants/{analytics_mesh.tenant_ids['B']}"
    with analytics_mesh.rest(analytics_mesh.keys["A"]) as http:
        series = http.get("/v1/stats", params=_dashboard_params(settled, ("bucket", "minute")))
        providers = http.get("/v1/stats", params=_dashboard_params(settled, ("dimensions", "provider")))
        tenants = http.get("/v1/stats", params=_dashboard_params(settled, ("dimensions", "tenant")))
        named = http.get("/v1/stats", params=_dashboard_params(settled, ("tenant", other)))
        health = http.get("/v1/stats:compareProviders", params=_dashboard_params(settled))
        export_params: Params = [("query.startTime", _rfc3339(settled.start)),
                                 ("query.endTime", _rfc3339(settled.end)), ("query.dimensions", "tenant")]
        export = http.get("/v1/stats:export", params=export_params)

    for answer in (series, providers):
        assert answer.status_code == 200, answer.text
        assert rest_counts(answer.json()["total"], COUNTS) == expected_counts(own)
    assert sum(int(row.get("sent", 0)) for row in series.json()["rows"]) == own.counts["sent"]
    assert (tenants.status_code, named.status_code, health.status_code, export.status_code) == (403, 404, 403, 403)


def test_the_dashboards_requests_with_the_admin_token_see_every_tenant(analytics_mesh: AnalyticsMesh,
                                                                       settled: Traffic) -> None:
    with analytics_mesh.rest(analytics_mesh.admin_token) as http:
        tenants = http.get("/v1/stats", params=_dashboard_params(settled, ("dimensions", "tenant")))
        health = http.get("/v1/stats:compareProviders", params=_dashboard_params(settled))

    assert tenants.status_code == 200 and health.status_code == 200, (tenants.text, health.text)
    assert {row["dimensions"]["tenant"] for row in tenants.json()["rows"]} == set(analytics_mesh.tenant_ids.values())
    assert rest_counts(tenants.json()["total"], ADMIN_COUNTS) == expected_counts(
        expected_total(settled.emails, settled.cost), ADMIN_COUNTS)
    assert sorted(p["provider"] for p in health.json()["providers"]) == sorted(PROVIDERS)


# -- bad input ---------------------------------------------------------------------------------------------------
_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
_BAD_QUERIES: dict[str, tuple[dict[str, Any], str, Sequence[str]]] = {
    "unknown dimension": ({"dimensions": ["country"]}, "dimensions", ("'country'", "provider, message_class")),
    "unknown metric": ({"metrics": ["sent", "opens"]}, "metrics", ("'opens'", "delivered")),
    "end before start": ({"start": _NOW, "end": _NOW - timedelta(hours=1)}, "end_time", ("after start_time",)),
    "range over 400 days": ({"start": _NOW - timedelta(days=401), "end": _NOW}, "start_time", ("400 days",)),
    "minute buckets over more than a day": ({"start": _NOW - timedelta(days=2), "end": _NOW, "bucket": "minute"},
                                            "bucket", ("2880", "at most 1440")),
    "minute buckets over a year": ({"start": _NOW - timedelta(days=365), "end": _NOW, "bucket": "minute"},
                                   "bucket", ("525600", "at most 1440")),
    "hour buckets over more than 31 days": ({"start": _NOW - timedelta(days=32), "end": _NOW, "bucket": "hour"},
                                            "bucket", ("768", "at most 744")),
    "unknown bucket": ({"bucket": "week"}, "bucket", ("minute, hour, day",)),
}


@pytest.mark.parametrize("case", list(_BAD_QUERIES))
def test_a_bad_query_is_refused_at_once_naming_the_field_and_the_limit(analytics_mesh: AnalyticsMesh,
                                                                       traffic: Traffic, case: str) -> None:
    fields, field, words = _BAD_QUERIES[case]
    began = time.monotonic()
    error = rpc_error(lambda: get_stats(analytics_mesh, traffic, "A", **fields))
    elapsed = time.monotonic() - began

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    violations = field_violations(error)
    assert [v.field for v in violations] == [field], violations
    text = f"{error.details()} {violations[0].description}"
    assert all(word in text for word in words), text
    assert elapsed < FAST_ANSWER_S


def test_a_bad_query_over_rest_is_a_400_naming_the_field(analytics_mesh: AnalyticsMesh, traffic: Traffic) -> None:
    with analytics_mesh.rest(analytics_mesh.keys["A"]) as http:
        params: Params = [("startTime", "2025-01-01T00:00:00Z"), ("endTime", "2025-03-01T00:00:00Z"),
                          ("bucket", "minute")]
        response = http.get("/v1/stats", params=params)

    assert response.status_code == 400, response.text
    details = response.json()["details"]
    bad_request = next(d for d in details if d["@type"].endswith("google.rpc.BadRequest"))
    assert bad_request["fieldViolations"][0]["field"] == "bucket"
    assert "at most 1440" in bad_request["fieldViolations"][0]["description"]
