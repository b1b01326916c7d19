"""The routing lab's report (libs/routing_sim/report.py) on a hand-built day: three providers, eight three-hour
windows, three policies and the oracle, no simulation.

The comparison's rows and text table carry the right figures; the HTML document fetches nothing and escapes the
scenario's strings; and it opens in a real headless Chromium without a console error, every plot drawn. The
screenshot is saved under test-artifacts/ (or $ESP_TEST_ARTIFACTS) for a person to look at.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from libs.routing_sim import scenario as scenario_module
from libs.routing_sim.report import comparison_rows, comparison_table, html_report, write_report
from libs.routing_sim.results import OracleResult, PolicyResult, WindowFigures
from libs.routing_sim.scenario import Scenario
from tests.dashboard import conftest as dashboard

browser = dashboard.browser
"""Headless Chromium as the dashboard's browser test starts it (a fixture; fails the test when it cannot start)."""

PRICES = {"cheap": 100, "mid": 300, "premium": 1200}
WINDOWS = 8
EXPECTED_PLOTS = (3 + 1) + 3 + 3 + 1 + 2
"""Cost: a panel a policy and the oracle's; quota burn: a panel a policy; latency: a panel a class; failovers: one;
allocation: the oracle's and production's."""


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "three-providers",
        "description": "A small market for the report's tests.",
        "window_minutes": 180,
        "providers": [
            {"id": "cheap", "type": "smtp", "price_per_email_micros": PRICES["cheap"], "daily_quota": 500,
             "latency": {"median_ms": 300, "p99_ms": 2000}, "classes": ["transactional", "bulk"]},
            {"id": "mid", "type": "ses", "price_per_email_micros": PRICES["mid"], "daily_quota": 2000,
             "latency": {"median_ms": 150, "p99_ms": 900}},
            {"id": "premium", "type": "postmark", "price_per_email_micros": PRICES["premium"],
             "latency": {"median_ms": 60, "p99_ms": 250}},
        ],
        "events": [
            {"kind": "outage", "provider": "mid", "at_h": 6, "until_h": 8},
            {"kind": "quota_cut", "provider": "cheap", "at_h": 12, "daily_quota": 400},
            {"kind": "brownout", "provider": "premium", "at_h": 18, "until_h": 20, "latency_factor": 5},
        ],
        "traffic": {"emails": 1200, "mix": {"otp": 0.2, "transactional": 0.3, "bulk": 0.5}},
    }
    raw.update(changes)
    return raw


def _windows(scenario: Scenario, shares: Mapping[str, float], slowness: float) -> tuple[WindowFigures, ...]:
    """150 emails a window split by ``shares``; the otp p99 climbs through the day, bulk sends nothing at night
    (each policy's latency and failovers a little apart, so that the screenshot shows every line)."""
    used = dict.fromkeys(PRICES, 0)
    windows = []
    for i in range(scenario.windows):
        sent = {p: round(150 * share) for p, share in shares.items()}
        for p, count in sent.items():
            used[p] += count
        latency = {"otp": (200.0 + 50 * i) * slowness, "transactional": 900.0 * slowness}
        if i > 1:
            latency["bulk"] = 20_000.0 * slowness
        windows.append(WindowFigures(
            start_s=i * scenario.window_s, sent=sent, cost_micros={p: n * PRICES[p] for p, n in sent.items()},
            quota_used=dict(used), failed_calls={}, throttled_calls={}, latency_p99_ms=latency,
            failovers=round((5 if i == 2 else i % 2) * slowness)))
    return tuple(windows)


def _policy(scenario: Scenario, name: str, delivered: int, failed: int, pending: int, micros_each: float,
            shares: Mapping[str, float], slowness: float) -> PolicyResult:
    return PolicyResult(
        policy=name, accepted=1200, delivered=delivered, failed=failed, pending=pending,
        cost_micros=delivered * micros_each,
        latency_ms={"otp": {"p50": 150, "p95": 400, "p99": 550.0}, "transactional": {"p99": 900.0},
                    "bulk": {"p99": 20_000.0}},
        failovers=12, calls=delivered + 12, windows=_windows(scenario, shares, slowness))


def _day(**changes: Any) -> tuple[Scenario, dict[str, PolicyResult], OracleResult]:
    scenario = scenario_module.parse(_raw(**changes))
    assert scenario.windows == WINDOWS
    results = {
        "production": _policy(scenario, "production", 1188, 8, 4, 250, {"cheap": 0.5, "mid": 0.3, "premium": 0.2},
                              1.0),
        "round_robin": _policy(scenario, "round_robin", 1150, 50, 0, 400,
                               {"cheap": 0.34, "mid": 0.33, "premium": 0.33}, 1.6),
        "cheapest_first": _policy(scenario, "cheapest_first", 1200, 0, 0, 180, {"cheap": 0.8, "mid": 0.2}, 2.5),
    }
    allocation = {(i, p): share * 150 for i in range(WINDOWS) for p, share in
                  {"cheap": 0.4, "mid": 0.5, "premium": 0.1}.items()}
    oracle = OracleResult(status="optimal", cost_micros=1200 * 150, delivered=1200, undeliverable=0,
                          allocation=allocation,
                          cost_by_window={key: n * PRICES[key[1]] for key, n in allocation.items()})
    return scenario, results, oracle


# ---- the comparison ---------------------------------------------------------------------------------------------

def test_rows_one_per_policy_then_the_oracle() -> None:
    rows = comparison_rows(*_day())

    assert [row["policy"] for row in rows] == ["production", "round_robin", "cheapest_first", "oracle"]
    production, round_robin, cheapest, oracle = rows
    assert production["delivered_ratio"] == pytest.approx(1188 / 1200)
    assert round_robin["delivered_ratio"] == pytest.approx(1150 / 1200)
    assert cheapest["delivered_ratio"] == 1.0
    assert oracle["delivered_ratio"] == 1.0
    # Dollars per 1,000 delivered: micros per email / 1000.
    assert [row["cost_per_delivered"] for row in rows] == pytest.approx([0.25, 0.4, 0.18, 0.15])
    assert [row["cost_vs_oracle"] for row in rows] == pytest.approx([250 / 150, 400 / 150, 180 / 150, 1.0])
    assert production["otp_p99_ms"] == 550.0 and production["bulk_p99_ms"] == 20_000.0
    assert (production["failovers"], production["pending"], production["failed"]) == (12, 4, 8)
    # The oracle has no latency and makes no calls; its failed emails are the undeliverable ones.
    assert all(math.isnan(float(oracle[key])) for key in ("otp_p99_ms", "transactional_p99_ms", "bulk_p99_ms",
                                                          "failovers"))
    assert (oracle["pending"], oracle["failed"]) == (0, 0)


def test_rows_without_an_oracle_cost_compare_to_nothing() -> None:
    scenario, results, _ = _day()
    infeasible = OracleResult(status="infeasible", cost_micros=0.0, delivered=0.0, undeliverable=1200.0,
                              allocation={}, cost_by_window={})

    rows = comparison_rows(scenario, results, infeasible)

    assert all(math.isnan(float(row["cost_vs_oracle"])) for row in rows)
    assert rows[-1]["delivered_ratio"] == 0.0 and rows[-1]["failed"] == 1200.0
    assert "oracle: infeasible" in comparison_table(scenario, results, infeasible)


def test_table_is_aligned_with_a_row_per_policy_and_the_oracle() -> None:
    lines = comparison_table(*_day()).splitlines()

    assert lines[0] == "scenario: three-providers"
    header, rule, *rows = lines[1:]
    assert header.split()[:3] == ["policy", "delivered", "$/1k"]
    assert set(rule) == {"-", " "}
    assert [row.split()[0] for row in rows] == ["production", "round_robin", "cheapest_first", "oracle"]
    # Fixed width: every line as long as the rule, each column's figures ending where its heading's dashes end.
    assert {len(line) for line in (header, *rows)} == {len(rule)}
    production = rows[0].split()
    assert production[1:6] == ["99.00", "%", "0.250", "1.67x", "550"]
    assert rows[-1].split()[1:5] == ["100.00", "%", "0.150", "1.00x"]
    assert rows[-1].split()[5:] == ["-", "-", "-", "-", "0", "0"]


def test_table_shows_control_characters_escaped() -> None:
    table = comparison_table(*_day(name="red\x1b[31m alert"))

    assert "\x1b" not in table
    assert table.splitlines()[0] == "scenario: red\\x1b[31m alert"


# ---- the HTML document ------------------------------------------------------------------------------------------

SVG_NAMESPACE = 'xmlns="http://www.w3.org/2000/svg"'


def test_html_fetches_nothing() -> None:
    document = html_report(*_day())

    assert document.startswith("<!DOCTYPE html>")
    rest = document.replace(SVG_NAMESPACE, "")
    for reference in ("http://", "https://", "@import", "url(", "src=", "href=", "<script", "<link", "<img",
                      "<iframe", "<object"):
        assert reference not in rest.lower(), reference
    assert document.count("<svg ") == document.count(SVG_NAMESPACE) == EXPECTED_PLOTS


def test_html_escapes_every_scenario_string() -> None:
    hostile_provider = '"><svg onload=alert(1)>'
    raw = _raw(name='<script>alert("name")</script>', description="<img src=x onerror=alert(2)> & more")
    raw["providers"][2]["id"] = hostile_provider
    raw["events"][2]["provider"] = hostile_provider
    scenario = scenario_module.parse(raw)
    _, results, oracle = _day()

    document = html_report(scenario, results, oracle)

    assert "<script" not in document.lower()
    assert "<img" not in document.lower()
    assert "<svg onload" not in document.lower()
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt;" in document
    assert "&lt;img src=x onerror=alert(2)&gt; &amp; more" in document
    assert "&quot;&gt;&lt;svg onload=alert(1)&gt;" in document


def test_html_lists_the_market_events() -> None:
    document = html_report(*_day())

    events = document[document.index("<h2>Market events</h2>"):document.index("<h2>Cost over time</h2>")]
    assert re.findall(r"<td>(outage|quota_cut|brownout)</td><td>(\w+)</td><td>([\d:]+)&ndash;([\d:]+)</td>",
                      events) == [("outage", "mid", "06:00", "08:00"), ("quota_cut", "cheap", "12:00", "24:00"),
                                  ("brownout", "premium", "18:00", "20:00")]
    assert "daily quota becomes 400" in events and "calls take 5 times as long, 30% fail" in events


def test_html_gives_each_provider_one_colour_in_every_plot() -> None:
    document = html_report(*_day())

    # Stacked layers are filled in the provider's colour, quota lines stroked in it; each carries a <title>.
    colours: dict[str, set[str]] = {}
    for colour, title in re.findall(r'<path d="[^"]*" fill="(#\w+)" fill-opacity="[\d.]+" stroke="#\w+" '
                                    r'stroke-width="[\d.]+"><title>([^<]+)</title>', document):
        colours.setdefault(title, set()).add(colour)
    for colour, title in re.findall(r'<path d="[^"]*" fill="none" stroke="(#\w+)"[^>]*><title>(\w+) '
                                    r"(?:quota used|daily quota)</title>", document):
        colours.setdefault(title, set()).add(colour)
    assert set(colours) == set(PRICES)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({c.pop() for c in colours.values()}) == len(PRICES)


def test_write_report(tmp_path: Path) -> None:
    day = _day()

    path = write_report(tmp_path / "reports" / "day.html", *day)

    assert path == tmp_path / "reports" / "day.html"
    assert path.read_text(encoding="utf-8") == html_report(*day)


# ---- in a browser -----------------------------------------------------------------------------------------------

def _artifacts() -> Path:
    directory = Path(os.environ.get("ESP_TEST_ARTIFACTS") or dashboard.ARTIFACTS)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _severe(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_opens_in_chromium(browser: webdriver.Chrome, tmp_path: Path) -> None:
    path = write_report(tmp_path / "report.html", *_day())

    browser.get(path.as_uri())

    assert _severe(browser) == []
    assert browser.title == "Routing lab: three-providers"
    plots = browser.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(plots) == len(browser.find_elements(By.TAG_NAME, "svg")) == EXPECTED_PLOTS
    for plot in plots:
        assert plot.size["width"] > 400 and plot.size["height"] > 150, plot.accessible_name
        assert plot.find_elements(By.TAG_NAME, "path"), plot.accessible_name
    # The whole page in one picture: a window as tall as the document (plus the browser's own frame).
    height, frame = browser.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
    browser.set_window_size(dashboard.WINDOW[0], height + frame)
    try:
        screenshot = _artifacts() / "routing-report.png"
        assert browser.save_screenshot(str(screenshot))
    finally:
        browser.set_window_size(*dashboard.WINDOW)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hostile_scenario_runs_nothing_in_chromium(browser: webdriver.Chrome, tmp_path: Path) -> None:
    name = '<script>alert("name")</script><img src=x onerror=alert(2)>'
    scenario = scenario_module.parse(_raw(name=name))
    _, results, oracle = _day()
    path = write_report(tmp_path / "hostile.html", scenario, results, oracle)

    browser.get(path.as_uri())

    # A script that ran would have left an alert open, which fails every further command.
    assert browser.title == f"Routing lab: {name}"
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Routing lab: {name}"
    assert _severe(browser) == []
