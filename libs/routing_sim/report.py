"""The routing lab's what-if report: how each routing policy and the hindsight oracle fared on one scenario's day.

The same comparison in three forms: ``comparison_rows`` (the figures, one dict a policy and one for the oracle),
``comparison_table`` (fixed-width text for a terminal) and ``html_report`` (one self-contained HTML document: the
table, the market events and the plots as inline SVG, drawn by :mod:`libs.routing_sim.svg_plots`). The document
fetches nothing — no script, font, stylesheet or image — so it can be mailed, attached to an issue or opened
offline, and its Content-Security-Policy forbids any fetch or script should a string slip through unescaped.

Scenario files are user input: every string from one (names, descriptions, provider ids) is HTML-escaped before
it enters the document, and its control characters are shown escaped before they reach a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path

from libs.common.message_classes import MessageClass
from libs.routing_sim.results import OracleResult, PolicyResult, WindowFigures
from libs.routing_sim.scenario import MarketEvent, Scenario, SimProvider
from libs.routing_sim.svg_plots import Band, Chart, Series, render, y_top

__all__ = ["COLUMNS", "ORACLE", "comparison_rows", "comparison_table", "html_report", "write_report"]

ORACLE = "oracle"
"""The oracle's row in the comparison."""
REFERENCE_POLICY = "production"
"""The policy whose sends the last plot sets beside the oracle's allocation."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("policy", "policy"),
    ("delivered_ratio", "delivered"),
    ("cost_per_delivered", "$/1k delivered"),
    ("cost_vs_oracle", "vs oracle"),
    *((f"{c.value}_p99_ms", f"{c.value} p99 ms") for c in MessageClass),
    ("failovers", "failovers"),
    ("pending", "pending"),
    ("failed", "failed"),
)
"""The comparison's columns: key in a row, and heading in the table."""

PROVIDER_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                    "#9c755f", "#bab0ac")
"""Tableau 10, by the provider's place in the scenario: a provider has the same colour in every plot."""
POLICY_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
"""Dark 2, by the policy's place in the results: distinct from the provider colours, so a reader does not take a
policy for a provider."""
EVENT_COLOURS = {"outage": "#d62728", "brownout": "#ff7f0e", "throttle": "#8c8c00", "quota_cut": "#9467bd",
                 "price_change": "#17becf"}


# ---- the comparison ---------------------------------------------------------------------------------------------


def comparison_rows(scenario: Scenario, results: Mapping[str, PolicyResult],
                    oracle: OracleResult) -> list[dict[str, str | float]]:
    """One row per policy (in the order of ``results``) and the oracle's last, keyed as ``COLUMNS``.

    ``cost_per_delivered`` is in dollars per 1,000 delivered emails; ``cost_vs_oracle`` divides it by the oracle's
    (NaN when the oracle's is zero). Figures the oracle has no notion of — latency, failovers — are NaN in its row;
    its ``failed`` are the emails no provider could take. (The figures all come from the results; the scenario is
    taken so that the three forms of the report are called alike.)
    """
    oracle_micros = oracle.cost_per_delivered_micros
    rows: list[dict[str, str | float]] = []
    for name, result in results.items():
        row: dict[str, str | float] = {
            "policy": name,
            "delivered_ratio": result.delivered_ratio,
            "cost_per_delivered": result.cost_per_delivered_micros / 1000,
            "cost_vs_oracle": result.cost_per_delivered_micros / oracle_micros if oracle_micros else math.nan,
        }
        for message_class in MessageClass:
            row[f"{message_class.value}_p99_ms"] = result.latency_ms.get(message_class.value, {}).get("p99", math.nan)
        row.update(failovers=result.failovers, pending=result.pending, failed=result.failed)
        rows.append(row)
    planned = oracle.delivered + oracle.undeliverable
    oracle_row: dict[str, str | float] = {
        "policy": ORACLE,
        "delivered_ratio": oracle.delivered / planned if planned else 1.0,
        "cost_per_delivered": oracle_micros / 1000,
        "cost_vs_oracle": 1.0 if oracle_micros else math.nan,
    }
    for message_class in MessageClass:
        oracle_row[f"{message_class.value}_p99_ms"] = math.nan
    # The oracle plans every window's emails within that window: nothing is left pending at the end of the day.
    oracle_row.update(failovers=math.nan, pending=0, failed=oracle.undeliverable)
    rows.append(oracle_row)
    return rows


def comparison_table(scenario: Scenario, results: Mapping[str, PolicyResult], oracle: OracleResult) -> str:
    """The comparison as fixed-width text for a terminal: the scenario's name, a header line, a row a policy."""
    rows = comparison_rows(scenario, results, oracle)
    cells = [[heading for _, heading in COLUMNS]]
    cells += [[_printable(_cell(key, row[key])) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: Sequence[str]) -> str:
        # The policy name reads left to right; figures align on their last digit.
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    text = [f"scenario: {_printable(scenario.name)}", line(cells[0]), line(["-" * w for w in widths])]
    text += [line(values) for values in cells[1:]]
    if oracle.status != "optimal":
        text.append(f"oracle: {_printable(oracle.status)}")
    return "\n".join(text) + "\n"


def _cell(key: str, value: str | float) -> str:
    """A figure as the table shows it; NaN (not applicable) as a dash."""
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "-"
    if key == "delivered_ratio":
        return f"{value * 100:.2f} %"
    if key == "cost_per_delivered":
        return f"{value:.3f}"
    if key == "cost_vs_oracle":
        return f"{value:.2f}x"
    return f"{value:,.0f}"  # latency in ms, and counts


def _printable(text: str) -> str:
    """``text`` with its control characters escaped: a scenario name must not drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# ---- the HTML document ------------------------------------------------------------------------------------------


def html_report(scenario: Scenario, results: Mapping[str, PolicyResult], oracle: OracleResult) -> str:
    """The report as one self-contained HTML document (inline CSS and SVG, no script, nothing fetched).

    It holds the comparison, the providers, the market events, and plots of cost, quota burn, latency p99,
    failovers and the oracle's allocation beside the production policy's sends over the day.
    """
    view = _View(scenario, results, oracle)
    name = escape(scenario.name)
    body = [
        f"<header><h1>Routing lab: {name}</h1>",
        f'<p class="description">{escape(scenario.description)}</p>' if scenario.description else "",
        f'<p class="meta">{_meta(scenario)}</p></header>',
        _comparison_section(scenario, results, oracle),
        _providers_section(view),
        _events_section(view),
        _cost_section(view),
        _quota_section(view),
        _latency_section(view),
        _failover_section(view),
        _allocation_section(view),
    ]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        # Nothing may be fetched or run: a belt to html.escape's braces.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Routing lab: {name}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        *(part for part in body if part),
        "</body>",
        "</html>",
        "",
    ])


def write_report(path: Path, scenario: Scenario, results: Mapping[str, PolicyResult], oracle: OracleResult) -> Path:
    """Write ``html_report`` to ``path`` (creating its directory) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(scenario, results, oracle), encoding="utf-8")
    return path


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;margin:0 auto;padding:16px 24px;
max-width:1500px;background:#fafafa}
h1{font-size:22px;margin:4px 0}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
p{margin:4px 0}.description{font-size:15px}.meta,.note{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.warning{color:#a00;font-weight:600}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;margin-right:4px}
.dash{display:inline-block;width:18px;border-top:2px dashed #444;vertical-align:3px;margin-right:4px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px;margin:6px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:10px}
.plots svg{width:100%;height:auto;background:#fff;border:1px solid #e4e4e4}
"""


class _View:
    """What every plot section needs: the day's window edges, each provider's and policy's colour, the shaded
    market events."""

    def __init__(self, scenario: Scenario, results: Mapping[str, PolicyResult], oracle: OracleResult) -> None:
        self.scenario = scenario
        self.results = results
        self.oracle = oracle
        self.x_max = scenario.day_s / 3600
        self.edges = [min(i * scenario.window_s, scenario.day_s) / 3600 for i in range(scenario.windows + 1)]
        self.provider_colour = {p.id: PROVIDER_COLOURS[i % len(PROVIDER_COLOURS)]
                                for i, p in enumerate(scenario.providers)}
        self.policy_colour = {name: POLICY_COLOURS[i % len(POLICY_COLOURS)] for i, name in enumerate(results)}
        self.events = sorted(scenario.events, key=lambda e: (e.start_s, e.provider))
        # Plain text (the plots and the legends escape it): "E1 outage ses 09:00-10:30", and what it does.
        self.event_names = [f"E{i} {e.kind} {e.provider} {_clock(e.start_s)}-{_clock(e.end_s, scenario.day_s)}"
                            for i, e in enumerate(self.events, start=1)]
        self.bands = [Band(e.start_s / 3600, e.end_s / 3600, f"E{i}", EVENT_COLOURS.get(e.kind, "#888"),
                           f"{name}: {_parameters(e)}")
                      for i, (e, name) in enumerate(zip(self.events, self.event_names, strict=True), start=1)]
        self.window_label = f"{scenario.window_s / 60:g}-min window"

    def chart(self, title: str, y_label: str, *, log_y: bool = False, stacked: bool = False,
              y_max: float | None = None, empty_note: str = "no data") -> Chart:
        """A chart over the day with the market events shaded."""
        return Chart(title=title, y_label=y_label, x_max=self.x_max, log_y=log_y, stacked=stacked, y_max=y_max,
                     bands=self.bands, empty_note=empty_note)

    def per_window(self, windows: Sequence[WindowFigures], value: Callable[[WindowFigures], float],
                   missing: float = 0.0) -> list[float]:
        """One value a window of the day, placed by the window's start (``missing`` where there is no window)."""
        values = [missing] * self.scenario.windows
        for w in windows:
            index = round(w.start_s / self.scenario.window_s)
            if 0 <= index < len(values):
                values[index] = value(w)
        return values

    def provider_stairs(self, windows: Sequence[WindowFigures],
                        value: Callable[[WindowFigures, str], float]) -> list[Series]:
        """A stairs series a provider (in the scenario's order) of ``value(window, provider id)``."""
        return [Series(p.id, self.provider_colour[p.id], self.edges,
                       self.per_window(windows, _bind(value, p.id)), stairs=True)
                for p in self.scenario.providers]

    def oracle_stairs(self, figures: Mapping[tuple[int, str], float]) -> list[Series]:
        """A stairs series a provider from the oracle's (window index, provider id) figures."""
        return [Series(p.id, self.provider_colour[p.id], self.edges,
                       [figures.get((i, p.id), 0.0) for i in range(self.scenario.windows)], stairs=True)
                for p in self.scenario.providers]

    def provider_legend(self, extra: str = "") -> str:
        """The provider colours and the market events' labels, above a group of plots."""
        entries = [f'<span><span class="swatch" style="background:{self.provider_colour[p.id]}"></span>'
                   f"{escape(p.id)}</span>" for p in self.scenario.providers]
        return self._legend(entries, extra)

    def policy_legend(self) -> str:
        """The policy colours and the market events' labels, above a group of plots."""
        entries = [f'<span><span class="swatch" style="background:{colour}"></span>{escape(name)}</span>'
                   for name, colour in self.policy_colour.items()]
        return self._legend(entries)

    def _legend(self, entries: list[str], extra: str = "") -> str:
        events = [f'<span><span class="swatch" style="background:{b.colour};opacity:.45"></span>'
                  f"{escape(name)}</span>" for b, name in zip(self.bands, self.event_names, strict=True)]
        return f'<div class="legend">{"".join(entries)}{extra}{"".join(events)}</div>'


def _section(title: str, note: str, legend: str, charts: Sequence[str]) -> str:
    """A group of plots under its heading (``title`` and ``note`` are HTML: escape what they quote)."""
    return "\n".join([f"<section><h2>{title}</h2>", f'<p class="note">{note}</p>', legend,
                      '<div class="plots">', *charts, "</div></section>"])


def _meta(scenario: Scenario) -> str:
    traffic = scenario.traffic
    campaigns = sum(c.recipients for c in traffic.campaigns)
    parts = [f"seed {scenario.seed}", f"{scenario.window_s / 60:g}-minute windows",
             f"{traffic.emails:,} single sends" + (f" and {campaigns:,} campaign emails" if campaigns else ""),
             "mix " + ", ".join(f"{escape(c)} {share:.0%}" for c, share in traffic.mix.items() if share),
             f"{len(scenario.providers)} providers", f"{len(scenario.events)} market events"]
    if scenario.source:
        parts.append(f"from {escape(scenario.source)}")
    return " · ".join(parts)


def _comparison_section(scenario: Scenario, results: Mapping[str, PolicyResult], oracle: OracleResult) -> str:
    rows = comparison_rows(scenario, results, oracle)
    head = "".join(f"<th>{escape(heading)}</th>" for _, heading in COLUMNS)
    body = []
    for row in rows:
        cells = [f"<td>{escape(_cell('policy', row['policy']))}</td>"]
        cells += [f'<td class="num">{escape(_cell(key, row[key]))}</td>' for key, _ in COLUMNS[1:]]
        body.append(f"<tr>{''.join(cells)}</tr>")
    status = "" if oracle.status == "optimal" else (
        f'<p class="warning">The oracle did not find an optimum: {escape(oracle.status)}.</p>')
    return "\n".join([
        "<section><h2>Policies compared</h2>",
        '<p class="note">Delivered: share of the accepted emails a provider accepted. $/1k delivered: cost per '
        "1,000 delivered emails. vs oracle: that cost over the hindsight oracle's, which knew every outage, quota and "
        "price in advance. p99: from acceptance to a provider accepting the email. Pending: still waiting for a "
        "retry when the day ended.</p>",
        status, f"<table><thead><tr>{head}</tr></thead><tbody>", *body, "</tbody></table></section>"])


def _providers_section(view: _View) -> str:
    rows = []
    for p in view.scenario.providers:
        quotas = _quota_changes(view.scenario, p)
        quota = " → ".join(f"{q:,}" if q else "none" for _, q in quotas)
        rows.append("<tr>" + "".join([
            f'<td><span class="swatch" style="background:{view.provider_colour[p.id]}"></span>{escape(p.id)}</td>',
            f"<td>{escape(p.type)}</td>",
            f'<td class="num">{p.price_per_email_micros:,}</td>',
            f'<td class="num">{p.price_per_mb_micros:,}</td>',
            f'<td class="num">{quota}</td>',
            f'<td class="num">{p.rate_limit_per_second:g}</td>' if p.rate_limit_per_second else "<td>none</td>",
            f'<td class="num">{p.latency.median_ms:g} / {p.latency.p99_ms:g}</td>',
            f'<td class="num">{p.error_rate:.2%}</td>',
            f"<td>{escape(', '.join(p.classes) or 'all')}</td>",
        ]) + "</tr>")
    return "\n".join([
        "<section><h2>Providers</h2>",
        "<table><thead><tr><th>provider</th><th>type</th><th>µ$ / email</th><th>µ$ / MB</th><th>daily quota</th>"
        "<th>calls / s</th><th>latency median / p99 ms</th><th>errors</th><th>classes</th></tr></thead><tbody>",
        *rows, "</tbody></table></section>"])


def _events_section(view: _View) -> str:
    if not view.events:
        return '<section><h2>Market events</h2><p class="note">None: a calm day.</p></section>'
    rows = [
        "<tr>" + "".join([
            f'<td><span class="swatch" style="background:{band.colour};opacity:.45"></span>{escape(band.label)}</td>',
            f"<td>{escape(e.kind)}</td>", f"<td>{escape(e.provider)}</td>",
            f"<td>{_clock(e.start_s)}&ndash;{_clock(e.end_s, view.scenario.day_s)}</td>",
            f"<td>{escape(_parameters(e))}</td>"]) + "</tr>"
        for e, band in zip(view.events, view.bands, strict=True)]
    return "\n".join([
        "<section><h2>Market events</h2>",
        '<p class="note">Shaded on every plot\'s time axis under their label. Quota cuts and price changes last for '
        "the rest of the day.</p>",
        "<table><thead><tr><th>#</th><th>kind</th><th>provider</th><th>from&ndash;until</th><th>parameters</th></tr>"
        "</thead><tbody>", *rows, "</tbody></table></section>"])


def _cost_section(view: _View) -> str:
    panels: list[tuple[str, list[Series]]] = []
    for name, result in view.results.items():
        panels.append((name, view.provider_stairs(result.windows, lambda w, p: w.cost_micros.get(p, 0.0) / 1e6)))
    oracle_cost = {key: micros / 1e6 for key, micros in view.oracle.cost_by_window.items()}
    panels.append((f"{ORACLE} (hindsight)", view.oracle_stairs(oracle_cost)))
    # One scale for every panel: the policies' costs compare at a glance.
    top = max(y_top(series, stacked=True) for _, series in panels)
    charts = [render(view.chart(title, f"$ per {view.window_label}", stacked=True, y_max=top), series)
              for title, series in panels]
    return _section("Cost over time", "What each provider was paid per window, stacked, at the price in force "
                    "when each email was sent.", view.provider_legend(), charts)


def _quota_section(view: _View) -> str:
    scenario = view.scenario
    limited = [p for p in scenario.providers if any(q for _, q in _quota_changes(scenario, p))]
    quota_lines = []
    for p in limited:
        changes = _quota_changes(scenario, p)
        edges = [at / 3600 for at, _ in changes] + [view.x_max]
        quota_lines.append(Series(f"{p.id} daily quota", view.provider_colour[p.id], edges,
                                  [float(q) if q else math.nan for _, q in changes], dashed=True, stairs=True))
    panels: list[tuple[str, list[Series]]] = []
    ends = [0.0, *view.edges[1:]]
    for name, result in view.results.items():
        used = []
        for p in limited:
            # The counter as it stood at the end of each window, from zero at midnight.
            values = view.per_window(result.windows, _bind(lambda w, p: float(w.quota_used.get(p, 0)), p.id),
                                     missing=math.nan)
            used.append(Series(f"{p.id} quota used", view.provider_colour[p.id], ends,
                               [0.0, *_carry_forward(values)]))
        panels.append((name, used + quota_lines))
    top = max((y_top(series) for _, series in panels), default=0.0)
    charts = [render(view.chart(title, "emails counted against the quota", y_max=top,
                                empty_note="no provider has a daily quota in this scenario"), series)
              for title, series in panels]
    return _section("Quota burn", "Each provider's daily quota counter through the day (solid) against its quota "
                    "(dashed; a quota cut lowers it). Providers without a daily quota are left out.",
                    view.provider_legend('<span><span class="dash"></span>daily quota</span>'), charts)


def _latency_section(view: _View) -> str:
    charts = []
    for message_class in _classes(view.scenario):
        series = []
        for name, result in view.results.items():
            p99 = view.per_window(result.windows,
                                  _bind(lambda w, c: w.latency_p99_ms.get(c, math.nan), message_class),
                                  missing=math.nan)
            series.append(Series(name, view.policy_colour[name], view.edges, p99, stairs=True))
        charts.append(render(view.chart(f"{message_class} p99 latency", "ms (log scale)", log_y=True), series))
    return _section("Latency p99 per class", "The 99th percentile, from acceptance to a provider accepting the "
                    "email, of each window's emails of the class; gaps: windows that sent none.",
                    view.policy_legend(), charts)


def _failover_section(view: _View) -> str:
    series = [Series(name, view.policy_colour[name], view.edges,
                     view.per_window(result.windows, lambda w: float(w.failovers)), stairs=True)
              for name, result in view.results.items()]
    chart = render(view.chart("Failovers per window", f"failovers per {view.window_label}"), series)
    return _section("Failovers", "Provider calls that were not an email's first: after a failure, a throttle or a "
                    "refused permit.", view.policy_legend(), [chart])


def _allocation_section(view: _View) -> str:
    oracle = view.oracle_stairs(view.oracle.allocation)
    name = REFERENCE_POLICY if REFERENCE_POLICY in view.results else next(iter(view.results), "")
    panels: list[tuple[str, list[Series]]] = [(f"{ORACLE}: allocation", oracle)]
    if name:
        sent = view.provider_stairs(view.results[name].windows, lambda w, p: float(w.sent.get(p, 0)))
        panels.append((f"{name}: sends", sent))
    top = max(y_top(series, stacked=True) for _, series in panels)
    charts = [render(view.chart(title, f"emails per {view.window_label}", stacked=True, y_max=top), series)
              for title, series in panels]
    return _section(f"Oracle allocation beside {escape(name or 'no policy')}",
                    "Where the hindsight oracle would have sent each window's emails, and where the policy sent "
                    "them.", view.provider_legend(), charts)


# ---- helpers ----------------------------------------------------------------------------------------------------


def _bind(value: Callable[[WindowFigures, str], float], key: str) -> Callable[[WindowFigures], float]:
    """``value`` of a window for one provider (or class): a closure made in a loop would see the last one only."""
    return lambda w: value(w, key)


def _classes(scenario: Scenario) -> list[str]:
    """The classes the day carries (campaign bursts are bulk)."""
    carried = {c for c, share in scenario.traffic.mix.items() if share > 0}
    if scenario.traffic.campaigns:
        carried.add(MessageClass.BULK.value)
    return [c.value for c in MessageClass if c.value in carried]


def _quota_changes(scenario: Scenario, provider: SimProvider) -> list[tuple[float, int]]:
    """The provider's daily quota through the day: (from second, quota), 0 meaning none; quota cuts change it."""
    changes = [(0.0, provider.daily_quota)]
    cuts = sorted((e for e in scenario.events if e.kind == "quota_cut" and e.provider == provider.id),
                  key=lambda e: e.start_s)
    for cut in cuts:
        if cut.start_s <= changes[-1][0]:
            changes[-1] = (changes[-1][0], cut.daily_quota)
        else:
            changes.append((cut.start_s, cut.daily_quota))
    return changes


def _carry_forward(values: list[float]) -> list[float]:
    """A counter's windows without a figure keep the last one (a counter does not drop to nothing)."""
    last = 0.0
    filled = []
    for v in values:
        last = last if math.isnan(v) else v
        filled.append(last)
    return filled


def _clock(seconds: float, day_s: float | None = None) -> str:
    """HH:MM of the day (24:00 at its end)."""
    if day_s is not None and seconds >= day_s:
        return "24:00"
    minutes = round(seconds / 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _parameters(event: MarketEvent) -> str:
    """What the event does, in words (plain text: escape it for HTML)."""
    if event.kind == "brownout":
        return f"calls take {event.latency_factor:g} times as long, {event.error_rate:.0%} fail"
    if event.kind == "throttle":
        return f"at most {event.rate_per_second:g} calls/s, Retry-After {event.retry_after_s:g} s"
    if event.kind == "quota_cut":
        return f"daily quota becomes {event.daily_quota:,}"
    if event.kind == "price_change":
        return (f"price becomes {event.price_per_email_micros:,} µ$/email, "
                f"{event.price_per_mb_micros:,} µ$/MB")
    if event.kind == "outage":
        return "every call fails"
    return ""
