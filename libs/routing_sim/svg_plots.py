"""Charts over the hours of a day as inline SVG text: the plotting primitives of the routing lab's report.

No plotting library and no script: the report is one self-contained HTML file that any browser draws offline, so a
chart here is a string of SVG elements (a frame with hour ticks, shaded intervals, lines or stacked areas). Every
label is escaped here, because the report's labels come from scenario files, which are user input.

A chart never uses element ids (a clip path, a gradient): the report puts many charts in one document, where ids
would collide. Values outside the plot area are clamped to its edge instead of clipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["Band", "Chart", "Series", "render", "y_top"]

WIDTH = 600
HEIGHT = 280
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 30, 42
"""Margins around the plot area: room for the y tick labels, the title, the x tick labels and the axis label."""
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
"""Fonts the machine already has: nothing is fetched."""
GRID = "#e4e4e4"
AXIS = "#555"


@dataclass(frozen=True)
class Series:
    """One line, or one layer of a stacked chart.

    ``ys`` holds NaN where there is no value (the line has a gap there). With ``stairs`` the ``xs`` are bin edges
    (one more than ``ys``) and each value holds from its edge to the next: a figure of a time window.
    """

    label: str
    colour: str
    xs: Sequence[float]
    ys: Sequence[float]
    dashed: bool = False
    stairs: bool = False

    def __post_init__(self) -> None:
        expected = len(self.ys) + 1 if self.stairs else len(self.ys)
        if len(self.xs) != expected:
            raise ValueError(f"series {self.label!r}: {len(self.xs)} xs for {len(self.ys)} ys "
                             f"({'stairs need one edge more' if self.stairs else 'need as many'})")


@dataclass(frozen=True)
class Band:
    """An interval of the x axis shaded behind the data (a market event), labelled at the top of the plot."""

    start: float
    end: float
    label: str
    colour: str
    tooltip: str = ""


@dataclass(frozen=True)
class Chart:
    """What a chart shows besides its series: title, axes and shaded intervals."""

    title: str
    y_label: str
    x_label: str = "hour of the day"
    x_max: float = 24.0
    log_y: bool = False
    stacked: bool = False
    """Draw the series as areas stacked on each other (they must share their xs)."""
    y_max: float | None = None
    """Top of the y axis, for panels that must share a scale; None: fitted to the data."""
    bands: Sequence[Band] = ()
    empty_note: str = "no data"
    """Written across the plot area when no series has a value."""


def render(chart: Chart, series: Sequence[Series]) -> str:
    """The chart as one ``<svg>`` element (scales with its container's width)."""
    if chart.stacked and chart.log_y:
        raise ValueError("a stacked chart cannot have a log scale (its layers start at zero)")
    layers = _stack(series) if chart.stacked else None
    values = [y for layer in layers for y in layer[1]] if layers else [y for s in series for y in s.ys]
    scale = _LogScale(values) if chart.log_y else _LinearScale(values, chart.y_max)
    frame = _Frame(chart.x_max, scale)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(chart.title)}" '
             f'font-family="{escape(FONT)}" font-size="11">',
             f"<title>{escape(chart.title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{frame.width}" height="{frame.height}" fill="#fff"/>']
    parts += _bands(frame, chart.bands)
    parts += _grid(frame, chart)
    if layers:
        parts += _areas(frame, series, layers)
    else:
        parts += _lines(frame, series)
    parts += _band_labels(frame, chart.bands)
    if not any(math.isfinite(y) and (y > 0 or not chart.log_y) for y in values):
        parts.append(f'<text x="{LEFT + frame.width / 2:.1f}" y="{TOP + frame.height / 2:.1f}" text-anchor="middle" '
                     f'fill="#888" font-size="13">{escape(chart.empty_note)}</text>')
    parts.append(f'<text x="{LEFT}" y="{TOP - 10}" font-size="13" font-weight="600" fill="#222">'
                 f"{escape(chart.title)}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def y_top(series: Iterable[Series], *, stacked: bool = False) -> float:
    """The largest value the series reach (stacked: their largest sum), for a scale several panels share."""
    series = list(series)
    values = [y for _, ys in _stack(series) for y in ys] if stacked else [y for s in series for y in s.ys]
    return max((y for y in values if math.isfinite(y)), default=0.0)


# ---- scales -----------------------------------------------------------------------------------------------------


class _LinearScale:
    """From zero to a round number at or above the largest value, ticked at a round step."""

    def __init__(self, values: Sequence[float], top: float | None) -> None:
        largest = max((v for v in values if math.isfinite(v)), default=0.0)
        largest = max(largest, top or 0.0)
        if largest <= 0:
            largest = 1.0
        # Some headroom, so that a line at the largest value (a quota) does not run along the frame.
        largest *= 1.04
        self.step = _round_step(largest / 8)  # four to eight steps up the axis
        self.top = math.ceil(largest / self.step - 1e-9) * self.step

    def fraction(self, y: float) -> float | None:
        """Where ``y`` sits between the bottom (0) and the top (1); None when it has no place (NaN)."""
        if not math.isfinite(y):
            return None
        return min(1.0, max(0.0, y / self.top))

    def ticks(self) -> list[float]:
        """The values the axis labels."""
        count = round(self.top / self.step)
        return [i * self.step for i in range(count + 1)]


class _LogScale:
    """Whole decades around the positive values (latency spans milliseconds to minutes)."""

    def __init__(self, values: Sequence[float]) -> None:
        positive = [v for v in values if math.isfinite(v) and v > 0]
        self.low = math.floor(math.log10(min(positive))) if positive else 0
        self.high = math.ceil(math.log10(max(positive))) if positive else 1
        if self.high <= self.low:
            self.high = self.low + 1

    def fraction(self, y: float) -> float | None:
        """Where ``y`` sits between the bottom (0) and the top (1); None for zero, negatives and NaN."""
        if not math.isfinite(y) or y <= 0:
            return None
        return min(1.0, max(0.0, (math.log10(y) - self.low) / (self.high - self.low)))

    def ticks(self) -> list[float]:
        """One label a decade (every other decade when there are many, so the labels do not crowd)."""
        every = 1 if self.high - self.low <= 6 else 2
        return [10.0 ** k for k in range(self.low, self.high + 1, every)]


def _round_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``raw``."""
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if factor * magnitude >= raw * (1 - 1e-9):
            return factor * magnitude
    return 10 * magnitude


def _tick_label(value: float) -> str:
    """Short labels: 0.05, 2.5, 750, 12k, 1.5M."""
    if value == 0:
        return "0"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:g}{suffix}"
    return f"{value:.4g}"


# ---- drawing ----------------------------------------------------------------------------------------------------


class _Frame:
    """Maps data to SVG coordinates."""

    def __init__(self, x_max: float, scale: _LinearScale | _LogScale) -> None:
        self.x_max = x_max
        self.scale = scale
        self.width = WIDTH - LEFT - RIGHT
        self.height = HEIGHT - TOP - BOTTOM

    def x(self, value: float) -> float:
        """The SVG x of a data x, clamped to the plot area."""
        return LEFT + min(1.0, max(0.0, value / self.x_max)) * self.width

    def y(self, value: float) -> float | None:
        """The SVG y of a data y (clamped), None where the value has no place on the scale."""
        fraction = self.scale.fraction(value)
        return None if fraction is None else TOP + (1 - fraction) * self.height


def _grid(frame: _Frame, chart: Chart) -> list[str]:
    """Gridlines, axes, ticks and their labels, and the axis labels."""
    bottom = TOP + frame.height
    parts = []
    for value in frame.scale.ticks():
        y = frame.y(value)
        if y is None:
            continue
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + frame.width}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS}">'
                     f"{_tick_label(value)}</text>")
    # A tick mark every hour, a label and a gridline every third (every hour on a short axis).
    label_every = 3 if chart.x_max > 12 else 1
    for hour in range(math.floor(chart.x_max) + 1):
        x = frame.x(hour)
        labelled = hour % label_every == 0
        if labelled and 0 < hour < chart.x_max:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{bottom}" stroke="{GRID}"/>')
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + (5 if labelled else 3)}" '
                     f'stroke="{AXIS}"/>')
        if labelled:
            parts.append(f'<text x="{x:.1f}" y="{bottom + 17}" text-anchor="middle" fill="{AXIS}">{hour}</text>')
    parts.append(f'<path d="M{LEFT},{TOP} V{bottom} H{LEFT + frame.width}" fill="none" stroke="{AXIS}"/>')
    parts.append(f'<text x="{LEFT + frame.width / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle" fill="#333">'
                 f"{escape(chart.x_label)}</text>")
    middle = TOP + frame.height / 2
    parts.append(f'<text transform="translate(14 {middle:.1f}) rotate(-90)" text-anchor="middle" fill="#333">'
                 f"{escape(chart.y_label)}</text>")
    return parts


def _bands(frame: _Frame, bands: Sequence[Band]) -> list[str]:
    """Shaded intervals, with a line where each begins (drawn behind the data)."""
    parts = []
    bottom = TOP + frame.height
    for band in bands:
        x0, x1 = frame.x(band.start), frame.x(band.end)
        parts.append(f'<rect x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 1):.1f}" height="{frame.height}" '
                     f'fill="{band.colour}" fill-opacity="0.13"><title>{escape(band.tooltip or band.label)}</title>'
                     "</rect>")
        parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{TOP}" y2="{bottom}" stroke="{band.colour}" '
                     f'stroke-opacity="0.7"/>')
    return parts


def _band_labels(frame: _Frame, bands: Sequence[Band]) -> list[str]:
    """The intervals' labels at the top of the plot, over the data on a white halo, staggered so that labels of
    intervals starting close together stay readable."""
    return [f'<text x="{frame.x(band.start) + 3:.1f}" y="{TOP + 11 + 11 * (i % 3)}" fill="{band.colour}" '
            f'font-size="10" font-weight="600" stroke="#fff" stroke-width="3" paint-order="stroke">'
            f"{escape(band.label)}<title>{escape(band.tooltip or band.label)}</title></text>"
            for i, band in enumerate(bands)]


def _points(xs: Sequence[float], ys: Sequence[float], stairs: bool) -> list[tuple[float, float]]:
    """The vertices of a line (stairs: two a value, at both its edges); NaN values stay, to break the line."""
    if not stairs:
        return list(zip(xs, ys, strict=True))
    points = []
    for i, y in enumerate(ys):
        points += [(xs[i], y), (xs[i + 1], y)]
    return points


def _lines(frame: _Frame, series: Sequence[Series]) -> list[str]:
    parts = []
    for s in series:
        segments: list[list[str]] = [[]]
        for x, y in _points(s.xs, s.ys, s.stairs):
            sy = frame.y(y)
            if sy is None:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append(f"{frame.x(x):.1f},{sy:.1f}")
        path = " ".join("M" + " L".join(segment) for segment in segments if segment)
        if not path:
            continue
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(f'<path d="{path}" fill="none" stroke="{s.colour}" stroke-width="1.8" '
                     f'stroke-linejoin="round"{dash}><title>{escape(s.label)}</title></path>')
    return parts


def _stack(series: Sequence[Series]) -> list[tuple[list[float], list[float]]]:
    """Each layer's bottom and top (NaN counts as nothing)."""
    if any(s.xs != series[0].xs or s.stairs != series[0].stairs for s in series):
        raise ValueError("stacked series must share their xs")
    layers = []
    below = [0.0] * (len(series[0].ys) if series else 0)
    for s in series:
        above = [b + (y if math.isfinite(y) else 0.0) for b, y in zip(below, s.ys, strict=True)]
        layers.append((below, above))
        below = above
    return layers


def _areas(frame: _Frame, series: Sequence[Series], layers: list[tuple[list[float], list[float]]]) -> list[str]:
    parts = []
    for s, (below, above) in zip(series, layers, strict=True):
        if all(a == b for a, b in zip(above, below, strict=True)):
            continue  # a provider with nothing in this panel: no sliver of outline
        upper = _points(s.xs, above, s.stairs)
        lower = _points(s.xs, below, s.stairs)[::-1]
        vertices = [f"{frame.x(x):.1f},{_or_bottom(frame, frame.y(y)):.1f}" for x, y in upper + lower]
        parts.append(f'<path d="M{" L".join(vertices)} Z" fill="{s.colour}" fill-opacity="0.85" '
                     f'stroke="{s.colour}" stroke-width="0.6"><title>{escape(s.label)}</title></path>')
    return parts


def _or_bottom(frame: _Frame, y: float | None) -> float:
    """A stacked layer's edge where the scale has no place for it sits on the x axis."""
    return TOP + frame.height if y is None else y
