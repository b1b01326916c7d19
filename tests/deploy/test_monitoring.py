"""The chart's alert rules and Grafana dashboards: they render behind their values flags, every PromQL expression
parses (promql-parser, the Rust PromQL parser's Python binding) and names only metrics the code exports, and the
dashboards satisfy a Grafana dashboard schema and pick their Prometheus through a variable."""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

from tests.deploy.manifests import CHART_DIR, REPO_ROOT, Rendering, render_helm
from tests.deploy.test_helm_chart import merged_values, schema_validator

RULES_FILE = CHART_DIR / "monitoring" / "alerts.yaml"
DASHBOARDS = sorted((CHART_DIR / "dashboards").glob("*.json"))
DASHBOARD_SCHEMA = json.loads((Path(__file__).with_name("schemas") / "grafana-dashboard.json").read_text("utf-8"))
DATASOURCE = "${datasource}"
SEVERITIES = {"warning", "critical"}
# Grafana's variables, as a query would see them once Grafana substituted them (any value of the right type).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(?P<label>[a-zA-Z_]\w*)\)$")
# Each fact issue 19 asks an alert for, and the alert that covers it.
REQUIRED_ALERTS = {
    "provider error rate": "EspProviderErrorRateHigh",
    "circuit breaker open": "EspProviderCircuitBreakerOpen",
    "OTP p99 latency": "EspOtpLatencyHigh",
    "JetStream consumer lag": "EspJetStreamConsumerLagHigh",
    "webhook delivery backlog": "EspWebhookBacklogHigh",
    "provider quota low": "EspProviderQuotaLow",
}


@functools.cache
def exported_metrics() -> frozenset[str]:
    """Every sample name the mesh's code can export: each module of ``libs`` and ``services`` imported (never a
    ``__main__``), then every collector in prometheus_client's default registry asked for its families."""
    for package in ("libs", "services"):
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (by name or by a ``__name__`` matcher).

    Raises:
        ValueError: the expression is not valid PromQL (unbalanced, wrong argument types, unknown function ...).
    """
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def rules_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_file()["groups"] for rule in group["rules"]]


def dashboard(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def grafana_query(expr: str, board: dict[str, Any]) -> str:
    """``expr`` with Grafana's built-in and the dashboard's own variables replaced as Grafana would."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for variable in board["templating"]["list"]:
        for form in (f"${{{variable['name']}}}", f"${variable['name']}"):
            expr = expr.replace(form, ".*")
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def prometheus_rule(rendering: Rendering) -> dict[str, Any]:
    (rule,) = rendering.of_kind("PrometheusRule")
    return rule


def dashboards_config_map(rendering: Rendering) -> dict[str, Any]:
    (config_map,) = [c for c in rendering.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    return config_map


# -- the metrics ---------------------------------------------------------------------------------------------------
def test_the_metric_census_sees_the_metrics_the_alerts_need() -> None:
    # Guards the census itself: were it to find nothing, every expression below would fail for the wrong reason.
    assert {"esp_sender_attempts_total", "esp_provider_breaker_open", "esp_jetstream_consumer_pending",
            "esp_webhook_deliveries_due", "esp_sender_accept_to_sent_seconds_bucket",
            "esp_provider_quota_daily_limit"} <= exported_metrics()
    assert "esp_no_such_metric" not in exported_metrics()


def test_the_parser_rejects_broken_promql_and_names_what_an_expression_selects() -> None:
    assert metric_names('sum by (p) (rate(a_total{x="y"}[5m])) / on() group_left max({__name__="b"})') == {
        "a_total", "b"}
    for broken in ("sum(rate(a_total[5m])", "rate(a_total)", "histogram_quantile(0.99)", "a_total{x=}"):
        with pytest.raises(ValueError):
            metric_names(broken)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_parses_and_uses_only_exported_metrics(rule: dict[str, Any]) -> None:
    assert metric_names(rule["expr"]) - exported_metrics() == set()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_every_dashboard_query_parses_and_uses_only_exported_metrics(path: Path) -> None:
    board = dashboard(path)
    queries = [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]
    assert queries
    for expr in queries:
        assert metric_names(grafana_query(expr, board)) - exported_metrics() == set(), expr
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = LABEL_VALUES.match(variable["query"]["query"])
            assert found is not None and found["metric"] in exported_metrics(), variable["name"]


# -- the alert rules -----------------------------------------------------------------------------------------------
def test_the_alerts_cover_each_fact_the_platform_team_watches() -> None:
    names = {rule["alert"] for rule in alert_rules()}

    assert {fact: alert for fact, alert in REQUIRED_ALERTS.items() if alert not in names} == {}
    assert len(names) == len(alert_rules()), "alert names repeat"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_waits_has_a_severity_and_says_what_to_do(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"[0-9]+[smh]", rule["for"])
    assert rule["labels"]["severity"] in SEVERITIES
    assert {"summary", "description", "runbook"} <= set(rule["annotations"])
    assert all(text.strip() for text in rule["annotations"].values())


def test_the_rendered_prometheus_rule_carries_the_plain_rules_file(renderings: dict[str, Rendering]) -> None:
    for name in ("helm-default", "helm-prod", "helm-without-keda"):
        assert prometheus_rule(renderings[name])["spec"] == rules_file(), name


def test_the_prometheus_rule_takes_the_labels_a_rule_selector_needs() -> None:
    rendering = render_helm("labels", {"monitoring": {"prometheusRule": {"labels": {"release": "kps"}}}})

    assert prometheus_rule(rendering)["metadata"]["labels"]["release"] == "kps"


def test_turning_the_rules_off_removes_the_prometheus_rule_only() -> None:
    rendering = render_helm("no-rules", {"monitoring": {"prometheusRule": {"enabled": False}}})

    assert rendering.of_kind("PrometheusRule") == []
    assert dashboards_config_map(rendering)


# -- the dashboards ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_every_dashboard_satisfies_the_grafana_dashboard_schema(path: Path) -> None:
    validator_class = jsonschema.validators.validator_for(DASHBOARD_SCHEMA)
    validator_class.check_schema(DASHBOARD_SCHEMA)

    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator_class(DASHBOARD_SCHEMA).iter_errors(dashboard(path))]

    assert errors == []


def test_the_dashboard_schema_rejects_a_panel_without_a_position_or_a_query() -> None:
    board = dashboard(DASHBOARDS[0])
    panel = next(p for p in board["panels"] if p["type"] != "row")
    del panel["gridPos"]
    panel["targets"] = []
    validator = jsonschema.Draft202012Validator(DASHBOARD_SCHEMA)

    messages = [error.message for error in validator.iter_errors(board)]

    assert any("gridPos" in message for message in messages)
    assert any("[]" in message for message in messages)


def test_the_dashboards_are_a_mesh_overview_and_a_providers_board_with_unique_uids() -> None:
    boards = {path.stem: dashboard(path) for path in DASHBOARDS}

    assert {"mesh-overview", "providers"} <= set(boards)
    assert len({board["uid"] for board in boards.values()}) == len(boards)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_every_query_uses_the_datasource_variable_never_a_fixed_uid(path: Path) -> None:
    board = dashboard(path)
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")

    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert all(target["datasource"]["uid"] == DATASOURCE for target in panel["targets"]), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable.get("datasource", {"uid": DATASOURCE})["uid"] == DATASOURCE


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_panels_fit_the_grid_without_overlapping(path: Path) -> None:
    taken: dict[tuple[int, int], str] = {}
    ids = [panel["id"] for panel in panels(dashboard(path))]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard(path)):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_the_dashboards_config_map_is_labelled_for_the_grafana_sidecar(renderings: dict[str, Rendering]) -> None:
    config_map = dashboards_config_map(renderings["helm-default"])

    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == {path.name for path in DASHBOARDS}
    for path in DASHBOARDS:
        assert json.loads(config_map["data"][path.name]) == dashboard(path)


def test_dashboard_annotations_and_labels_come_from_the_values() -> None:
    rendering = render_helm("folder", {"monitoring": {"dashboards": {
        "annotations": {"grafana_folder": "ESP mesh"}, "labels": {"team": "platform"}}}})
    config_map = dashboards_config_map(rendering)

    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ESP mesh"}
    assert config_map["metadata"]["labels"]["team"] == "platform"


def test_turning_the_dashboards_off_removes_their_config_map_only() -> None:
    rendering = render_helm("no-dashboards", {"monitoring": {"dashboards": {"enabled": False}}})

    assert [c for c in rendering.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")] == []
    assert prometheus_rule(rendering)


# -- the values ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {"monitoring": {"prometheusRule": {"enabled": False}, "dashboards": {"enabled": False}}},
    {"monitoring": {"prometheusRule": {"labels": {"release": "kube-prometheus-stack"}}}},
    {"monitoring": {"dashboards": {"labels": {"example.com/team": "platform"},
                                   "annotations": {"grafana_folder": "ESP mesh"}}}},
])
def test_the_values_schema_accepts_the_monitoring_values(overrides: dict[str, Any]) -> None:
    assert list(schema_validator().iter_errors(merged_values(overrides))) == []


@pytest.mark.parametrize(("overrides", "blamed"), [
    ({"monitoring": {"prometheusRule": {"enabled": "yes"}}}, "monitoring/prometheusRule/enabled"),
    ({"monitoring": {"dashboards": {"labels": {"team": "not a label value"}}}}, "monitoring/dashboards/labels/team"),
    ({"monitoring": {"dashboards": {"folder": "ESP"}}}, "monitoring/dashboards"),
])
def test_the_values_schema_rejects_bad_monitoring_values(overrides: dict[str, Any], blamed: str) -> None:
    errors = list(schema_validator().iter_errors(merged_values(overrides)))

    assert ["/".join(map(str, error.absolute_path)) for error in errors] == [blamed]


def test_the_rules_file_is_documented_where_operators_look() -> None:
    deployment = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")

    for alert in (rule["alert"] for rule in alert_rules()):
        assert alert in deployment, f"{alert} is not explained in docs/DEPLOYMENT.md"
