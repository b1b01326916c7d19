// Time-series charts drawn with the vendored uPlot (see ../VENDORED.md).

import uPlot from "./vendor/uplot-1.6.32/uPlot.esm.js";

const HEIGHT = 240;
const charts = new Map();

function width(element) {
  return Math.max(280, Math.floor(element.clientWidth || element.parentElement.clientWidth || 600));
}

function options(element, spec) {
  return {
    width: width(element),
    height: HEIGHT,
    legend: { show: true },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, y: { range: (_u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: [
      { stroke: "#555" },
      { stroke: "#555", size: 60, label: spec.yLabel, values: (_u, ticks) => ticks.map(spec.format) },
    ],
    series: [
      {},
      ...spec.series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: s.dash ? 1.5 : 2,
        dash: s.dash ? [6, 4] : undefined,
        spanGaps: Boolean(s.dash),
        points: { show: !s.dash, size: 4 },
        value: (_u, v) => (v === null || v === undefined ? "–" : spec.format(v)),
      })),
    ],
  };
}

/**
 * Draw (or redraw) the chart `id` in `element`: `spec.series` lists each line's label, colour and whether it is a
 * dashed threshold line; `data` is uPlot's columns ([x seconds, ...one array per series]). Returns the data the
 * chart holds now.
 */
export function drawChart(id, element, spec, data) {
  const existing = charts.get(id);
  const signature = spec.series.map((s) => s.label).join("|");
  if (existing && existing.signature === signature) {
    existing.plot.setData(data);
    return existing.plot.data;
  }
  if (existing) {
    existing.plot.destroy();
  }
  const plot = new uPlot(options(element, spec), data, element);
  charts.set(id, { plot, signature, element });
  return plot.data;
}

/** Forget every chart (signing out). */
export function destroyCharts() {
  for (const { plot } of charts.values()) {
    plot.destroy();
  }
  charts.clear();
}

window.addEventListener("resize", () => {
  for (const { plot, element } of charts.values()) {
    plot.setSize({ width: width(element), height: HEIGHT });
  }
});
