// The dashboard: asks for a key, finds whether it is a tenant's API key or the platform admin token, then draws
// the figures of the REST API of this origin and refreshes them every 15 s. The address may choose the first range
// and the refresh period (`?range=1h&refresh=5`); it never carries the key.
//
// What was drawn last is in `window.__dashboard` (the numbers each chart and table holds), for tests and for
// anyone curious in the browser's console.

import {
  ApiError, apiGet, apiPost, campaignsResponse, providersResponse, routeResponse, statsResponse, tenantName,
} from "./api.js";
import { destroyCharts, drawChart } from "./charts.js";

const KEY_STORAGE = "esp.dashboard.key";
const RANGES = {
  "1h": { ms: 3600e3, bucket: "minute" },
  "24h": { ms: 86400e3, bucket: "hour" },
  "7d": { ms: 7 * 86400e3, bucket: "hour" },
  "30d": { ms: 30 * 86400e3, bucket: "day" },
};
const BUCKET_MS = { minute: 60e3, hour: 3600e3, day: 86400e3 };
/** The classes the routing panel ranks for, each with the size of a typical email of it (bytes). */
const ROUTED_CLASSES = [
  ["otp", "MESSAGE_CLASS_OTP", 3000],
  ["transactional", "MESSAGE_CLASS_TRANSACTIONAL", 25000],
  ["bulk", "MESSAGE_CLASS_BULK", 60000],
];
const COLORS = {
  accepted: "#7a7a7a", sent: "#1f77b4", delivered: "#2ca02c", bounced: "#ff7f0e", failed: "#d62728",
  complained: "#9467bd", warning: "#e6a700", critical: "#d62728",
};

const $ = (id) => document.getElementById(id);

const state = {
  key: "",
  view: "",          // "tenant" or "platform"
  tenant: "",        // platform view: "tenants/{id}" picked, or "" for every tenant
  timer: 0,
  refreshing: false,
  again: false,      // something changed during a refresh: another one follows it at once
  refreshCount: 0,
  generation: 0,     // bumped on sign-out, so answers for an old key are dropped
};

function refreshSeconds() {
  const asked = Number(new URLSearchParams(window.location.search).get("refresh"));
  return Number.isFinite(asked) && asked >= 1 && asked <= 3600 ? asked : 15;
}

// ---- formatting ------------------------------------------------------------------------------------------------

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });

function fmtInt(n) { return integer.format(n); }
function fmtPct(rate) { return `${decimal.format(rate * 100)} %`; }
function fmtMs(ms) { return ms >= 10000 ? `${decimal.format(ms / 1000)} s` : `${integer.format(ms)} ms`; }
function fmtNum(n) { return decimal.format(n); }
function fmtMicros(micros) { return new Intl.NumberFormat("en-US", { maximumFractionDigits: 6 }).format(micros / 1e6); }
function fmtQuota(used, limit) { return limit > 0 ? `${fmtInt(used)} / ${fmtInt(limit)}` : `${fmtInt(used)} / no limit`; }
function shortStatus(status) { return status.replace("COMPLAINT_RATE_STATUS_", "").toLowerCase(); }

/** Fill `table` with a header row and body rows; `cells` are text (never HTML) or a ready Node. */
function fillTable(table, header, rows, emptyText) {
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const title of header) {
    const th = document.createElement("th");
    th.textContent = title;
    head.appendChild(th);
  }
  const body = table.createTBody();
  if (rows.length === 0) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = header.length;
    cell.className = "muted";
    cell.textContent = emptyText;
    return;
  }
  for (const row of rows) {
    const tr = body.insertRow();
    for (const value of row) {
      const td = tr.insertCell();
      if (value instanceof Node) {
        td.appendChild(value);
      } else {
        td.textContent = String(value);
      }
    }
  }
}

function badge(text, kind) {
  const span = document.createElement("span");
  span.className = `badge ${kind}`;
  span.textContent = text;
  return span;
}

// ---- queries ---------------------------------------------------------------------------------------------------

/** The range and bucket of this refresh: from the bucket boundary before now − range, to now. */
function currentQuery() {
  const range = RANGES[$("range-select").value] || RANGES["24h"];
  const bucketMs = BUCKET_MS[range.bucket];
  const end = Date.now();
  const start = Math.floor((end - range.ms) / bucketMs) * bucketMs;
  return {
    startTime: new Date(start).toISOString(),
    endTime: new Date(end).toISOString(),
    bucket: range.bucket,
  };
}

function statsParams(query, extra) {
  return [["startTime", query.startTime], ["endTime", query.endTime], ...extra];
}

function tenantParam() {
  return state.view === "platform" && state.tenant ? [["tenant", state.tenant]] : [];
}

async function fetchAll(key, query) {
  const get = (path, params) => apiGet(path, params, key);
  const scoped = tenantParam();
  const requests = {
    series: get("/v1/stats", statsParams(query, [["bucket", query.bucket], ...scoped])).then(statsResponse),
    providers: get("/v1/stats", statsParams(query, [["dimensions", "provider"], ...scoped])).then(statsResponse),
  };
  if (state.view === "platform") {
    requests.tenants = get("/v1/stats", statsParams(query, [["dimensions", "tenant"]])).then(statsResponse);
    requests.health = get("/v1/stats:compareProviders", statsParams(query, [])).then(providersResponse);
    requests.routing = Promise.all(ROUTED_CLASSES.map(([name, messageClass, bytes]) =>
      apiPost("/v1/providers:route", { messageClass, messageBytes: String(bytes), recipientCount: 1 }, key)
        .then((raw) => ({ messageClass: name, ...routeResponse(raw) }))));
    const campaignDims = state.tenant ? [["dimensions", "campaign"]] : [["dimensions", "tenant"], ["dimensions", "campaign"]];
    requests.campaignStats = get("/v1/stats", statsParams(query, [...campaignDims, ...scoped])).then(statsResponse);
  } else {
    requests.campaigns = get("/v1/campaigns", [["pageSize", 20]]).then(campaignsResponse);
  }
  const names = Object.keys(requests);
  const values = await Promise.all(names.map((name) => requests[name]));
  return Object.fromEntries(names.map((name, i) => [name, values[i]]));
}

// ---- drawing ---------------------------------------------------------------------------------------------------

/** Every bucket start in the range (seconds) plus any the answer has, and each row by its bucket. */
function timeline(query, rows) {
  const step = BUCKET_MS[query.bucket];
  const start = Date.parse(query.startTime);
  const end = Date.parse(query.endTime);
  const byBucket = new Map();
  for (const row of rows) {
    const at = Date.parse(row.dimensions.bucket || "");
    if (Number.isFinite(at)) {
      byBucket.set(at, row);
    }
  }
  const xs = new Set();
  for (let t = start; t < end; t += step) {
    xs.add(t);
  }
  for (const at of byBucket.keys()) {
    xs.add(at);
  }
  const sorted = [...xs].sort((a, b) => a - b);
  return { ms: sorted, seconds: sorted.map((t) => t / 1000), rowAt: (t) => byBucket.get(t) };
}

function drawSeries(query, stats) {
  const line = timeline(query, stats.rows);
  const column = (pick, empty) => line.ms.map((t) => {
    const row = line.rowAt(t);
    return row ? pick(row) : empty;
  });
  // A rate or a latency of a bucket with nothing to measure is a gap, not a zero.
  const rate = (pick, denominator) => column((r) => (denominator(r) > 0 ? pick(r) * 100 : null), null);
  const warning = stats.complaintRateWarning * 100;
  const critical = stats.complaintRateCritical * 100;

  const volumeSeries = ["accepted", "sent", "delivered", "bounced", "failed"];
  const volume = drawChart("volume", $("chart-volume"), {
    yLabel: "emails", format: fmtInt,
    series: volumeSeries.map((name) => ({ label: name, color: COLORS[name] })),
  }, [line.seconds, ...volumeSeries.map((name) => column((r) => r[name], 0))]);

  const rates = drawChart("rates", $("chart-rates"), {
    yLabel: "% of sent", format: (v) => `${decimal.format(v)} %`,
    series: [{ label: "delivery rate", color: COLORS.delivered }, { label: "bounce rate", color: COLORS.bounced }],
  }, [line.seconds, rate((r) => r.deliveryRate, (r) => r.sent), rate((r) => r.bounceRate, (r) => r.sent)]);

  const complaints = drawChart("complaints", $("chart-complaints"), {
    yLabel: "% of delivered", format: (v) => `${decimal.format(v)} %`,
    series: [
      { label: "complaint rate", color: COLORS.complained },
      { label: `warning ${decimal.format(warning)} %`, color: COLORS.warning, dash: true },
      { label: `critical ${decimal.format(critical)} %`, color: COLORS.critical, dash: true },
    ],
  }, [line.seconds, rate((r) => r.complaintRate, (r) => r.delivered),
    line.ms.map(() => warning), line.ms.map(() => critical)]);

  const latencySeries = [];
  const latencyColumns = [];
  for (const [kind, pickLatency, color] of [["send", (r) => r.sendLatency, "#1f77b4"],
    ["delivery", (r) => r.deliveryLatency, "#2ca02c"]]) {
    for (const [p, dash] of [["p50", false], ["p95", false], ["p99", false]]) {
      latencySeries.push({ label: `${kind} ${p}`, color: shade(color, p), dash });
      latencyColumns.push(column((r) => (pickLatency(r).count > 0 ? pickLatency(r)[p] : null), null));
    }
  }
  const latencyData = drawChart("latency", $("chart-latency"), {
    yLabel: "ms", format: fmtInt, series: latencySeries,
  }, [line.seconds, ...latencyColumns]);

  const labelled = (spec, data) => ({ labels: spec, data: data.map((c) => Array.from(c)) });
  return {
    volume: labelled(["time", ...volumeSeries], volume),
    rates: labelled(["time", "deliveryRate", "bounceRate"], rates),
    complaints: labelled(["time", "complaintRate", "warning", "critical"], complaints),
    latency: labelled(["time", ...latencySeries.map((s) => s.label)], latencyData),
  };
}

function shade(hex, percentile) {
  const factor = { p50: 1, p95: 0.75, p99: 0.5 }[percentile];
  const channel = (i) => Math.round(parseInt(hex.slice(i, i + 2), 16) * factor).toString(16).padStart(2, "0");
  return `#${channel(1)}${channel(3)}${channel(5)}`;
}

function drawTotals(total) {
  const items = [
    ["accepted", fmtInt(total.accepted)], ["sent", fmtInt(total.sent)], ["delivered", fmtInt(total.delivered)],
    ["bounced", fmtInt(total.bounced)], ["failed", fmtInt(total.failed)], ["complained", fmtInt(total.complained)],
    ["delivery rate", fmtPct(total.deliveryRate)], ["bounce rate", fmtPct(total.bounceRate)],
    ["complaint rate", fmtPct(total.complaintRate)], ["credits charged", fmtInt(total.creditsCharged)],
  ];
  const container = $("totals");
  container.replaceChildren(...items.map(([label, value]) => {
    const box = document.createElement("div");
    box.className = "total";
    box.dataset.metric = label.replace(/ /g, "-");
    const v = document.createElement("strong");
    v.textContent = value;
    const l = document.createElement("span");
    l.textContent = label;
    box.append(v, l);
    return box;
  }));
  const status = shortStatus(total.complaintRateStatus);
  $("complaint-status").replaceChildren(badge(status, status));
}

function drawLatencyTable(total) {
  fillTable($("latency-table"), ["latency", "p50", "p95", "p99", "measured"], [
    ["accept → sent", fmtMs(total.sendLatency.p50), fmtMs(total.sendLatency.p95), fmtMs(total.sendLatency.p99),
      fmtInt(total.sendLatency.count)],
    ["accept → delivered", fmtMs(total.deliveryLatency.p50), fmtMs(total.deliveryLatency.p95),
      fmtMs(total.deliveryLatency.p99), fmtInt(total.deliveryLatency.count)],
    ["provider call", fmtMs(total.providerCallLatency.p50), fmtMs(total.providerCallLatency.p95),
      fmtMs(total.providerCallLatency.p99), fmtInt(total.providerCallLatency.count)],
  ], "");
}

function providerRows(stats) {
  // Accepted mail has no provider yet: its row (provider "") holds only what happened before one was chosen.
  return stats.rows.filter((r) => r.dimensions.provider).map((r) => ({
    provider: r.dimensions.provider || r.key,
    sent: r.sent,
    delivered: r.delivered,
    creditsCharged: r.creditsCharged,
    creditsPerThousandDelivered: r.creditsPerThousandDelivered,
    providerCostMicros: r.providerCostMicros,
    providerCostMicrosPerThousandDelivered: r.providerCostMicrosPerThousandDelivered,
  }));
}

function drawCost(rows) {
  const platform = state.view === "platform";
  const header = ["provider", "sent", "delivered", "credits charged", "credits / 1,000 delivered"];
  if (platform) {
    header.push("provider cost", "provider cost / 1,000 delivered");
  }
  fillTable($("cost-table"), header, rows.map((r) => {
    const cells = [r.provider, fmtInt(r.sent), fmtInt(r.delivered), fmtInt(r.creditsCharged),
      fmtNum(r.creditsPerThousandDelivered)];
    if (platform) {
      cells.push(fmtMicros(r.providerCostMicros), fmtMicros(r.providerCostMicrosPerThousandDelivered));
    }
    return cells;
  }), "No email went through a provider in this range.");
}

function tenantRows(stats) {
  return stats.rows.map((r) => ({
    tenant: tenantName(r.dimensions.tenant || r.key),
    accepted: r.accepted, sent: r.sent, delivered: r.delivered, bounced: r.bounced, failed: r.failed,
    complained: r.complained, deliveryRate: r.deliveryRate, complaintRate: r.complaintRate,
    complaintRateStatus: r.complaintRateStatus, creditsCharged: r.creditsCharged,
  }));
}

function drawTenants(rows) {
  fillTable($("tenants-table"), ["tenant", "accepted", "sent", "delivered", "bounced", "failed", "complained",
    "delivery rate", "complaint rate", "credits charged"], rows.map((r) => [
    r.tenant.replace(/^tenants\//, ""), fmtInt(r.accepted), fmtInt(r.sent), fmtInt(r.delivered), fmtInt(r.bounced),
    fmtInt(r.failed), fmtInt(r.complained), fmtPct(r.deliveryRate),
    badge(fmtPct(r.complaintRate), shortStatus(r.complaintRateStatus)), fmtInt(r.creditsCharged),
  ]), "No tenant sent email in this range.");
  const select = $("tenant-select");
  const known = new Set([...select.options].map((o) => o.value));
  for (const r of rows) {
    if (!known.has(r.tenant)) {
      select.add(new Option(r.tenant.replace(/^tenants\//, ""), r.tenant));
    }
  }
}

function healthRows(providers) {
  return providers.map((p) => ({
    provider: p.provider, providerType: p.providerType, enabled: p.enabled,
    breakerState: p.breakerState, dailyQuotaUsed: p.dailyQuotaUsed, dailyQuotaLimit: p.dailyQuotaLimit,
    monthlyQuotaUsed: p.monthlyQuotaUsed, monthlyQuotaLimit: p.monthlyQuotaLimit,
    pricePerEmailMicros: p.pricePerEmailMicros, sent: p.figures.sent, delivered: p.figures.delivered,
    deliveryRate: p.figures.deliveryRate, providerCallP95: p.figures.providerCallLatency.p95,
    providerErrorRate: p.figures.providerErrorRate, providerThrottleRate: p.figures.providerThrottleRate,
  }));
}

/** Each class's fallback chain for a typical email of it, as the sender would rank it now, and why (RouteEmail). */
function routingRows(routes) {
  const rows = [];
  for (const route of routes) {
    route.ranked.forEach((p, i) => rows.push({
      messageClass: route.messageClass, rank: i + 1, provider: p.provider, expectedCostMicros: p.expectedCostMicros,
      latencyP99EstimateMs: p.latencyP99EstimateMs, why: p.belowFloorReason || "meets the class's floor",
    }));
    for (const p of route.excluded) {
      rows.push({
        messageClass: route.messageClass, rank: 0, provider: p.provider, expectedCostMicros: p.expectedCostMicros,
        latencyP99EstimateMs: p.latencyP99EstimateMs, why: `left out: ${p.excludedReason}`,
      });
    }
  }
  return rows;
}

function drawRouting(rows) {
  fillTable($("routing-table"), ["class", "rank", "provider", "cost / email", "p99 estimate", "why"], rows.map((r) => [
    r.messageClass, r.rank ? String(r.rank) : "–", r.provider, fmtMicros(r.expectedCostMicros),
    r.latencyP99EstimateMs ? fmtMs(r.latencyP99EstimateMs) : "not measured", r.why,
  ]), "No provider in the catalog.");
}

function drawHealth(rows) {
  fillTable($("health-table"), ["provider", "type", "enabled", "breaker", "daily quota", "monthly quota",
    "delivery rate", "call p95", "error rate", "throttle rate", "price / email"], rows.map((r) => [
    r.provider, r.providerType || "–", r.enabled ? "yes" : "no",
    badge(r.breakerState || "no calls", (r.breakerState || "none").replace("_", "-")),
    fmtQuota(r.dailyQuotaUsed, r.dailyQuotaLimit), fmtQuota(r.monthlyQuotaUsed, r.monthlyQuotaLimit),
    fmtPct(r.deliveryRate), fmtMs(r.providerCallP95), fmtPct(r.providerErrorRate), fmtPct(r.providerThrottleRate),
    fmtMicros(r.pricePerEmailMicros),
  ]), "No provider in the catalog.");
}

function progressBar(done, total) {
  const bar = document.createElement("progress");
  bar.max = Math.max(total, 1);
  bar.value = Math.min(done, bar.max);
  bar.textContent = `${fmtInt(done)} / ${fmtInt(total)}`;
  return bar;
}

function drawCampaigns(campaigns) {
  fillTable($("campaigns-table"), ["campaign", "state", "progress", "recipients", "pending", "sent", "delivered",
    "bounced", "complained", "failed", "suppressed"], campaigns.map((c) => {
    const done = c.sent + c.failed + c.suppressed + c.cancelled;
    return [c.displayName || c.name, badge(c.state, c.state), progressBar(done, c.recipients), fmtInt(c.recipients),
      fmtInt(c.pending + c.queued), fmtInt(c.sent), fmtInt(c.delivered), fmtInt(c.bounced), fmtInt(c.complained),
      fmtInt(c.failed), fmtInt(c.suppressed)];
  }), "No campaign yet.");
}

function campaignStatRows(stats) {
  // Mail of no campaign comes as a row with an empty campaign: not a campaign.
  return stats.rows.filter((r) => r.dimensions.campaign).map((r) => ({
    campaign: r.dimensions.campaign, tenant: tenantName(r.dimensions.tenant || ""),
    accepted: r.accepted, sent: r.sent, delivered: r.delivered, bounced: r.bounced, complained: r.complained,
    failed: r.failed,
  }));
}

function drawCampaignStats(rows) {
  fillTable($("campaigns-table"), ["campaign", "tenant", "accepted", "sent", "delivered", "bounced", "complained",
    "failed"], rows.map((r) => [r.campaign, r.tenant.replace(/^tenants\//, "") || state.tenant.replace(/^tenants\//, ""),
    fmtInt(r.accepted), fmtInt(r.sent), fmtInt(r.delivered), fmtInt(r.bounced), fmtInt(r.complained),
    fmtInt(r.failed)]), "No campaign sent email in this range.");
}

// ---- the refresh loop ------------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function describe(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) {
      return "This key was not accepted.";
    }
    if (error.status === 403) {
      return `This key may not read these figures: ${error.message}`;
    }
    return `The API answered ${error.status}: ${error.message}`;
  }
  return `Could not reach the API: ${error.message}`;
}

async function refresh() {
  window.clearTimeout(state.timer);
  if (!state.key) {
    return;
  }
  if (state.refreshing) {
    // A range, a tenant or a key chosen while figures are on their way: fetch again once they are in.
    state.again = true;
    return;
  }
  state.refreshing = true;
  state.again = false;
  document.body.dataset.state = "loading";
  const generation = state.generation;
  const query = currentQuery();
  try {
    const answers = await fetchAll(state.key, query);
    if (generation !== state.generation) {
      return;
    }
    render(query, answers);
    showError("");
    document.body.dataset.state = "ready";
  } catch (error) {
    if (generation !== state.generation) {
      return;
    }
    showError(describe(error));
    document.body.dataset.state = "error";
    if (!(error instanceof ApiError)) {
      console.warn("dashboard refresh failed", error);
    }
    if (error instanceof ApiError && error.status === 401) {
      signOut("This key was not accepted.");
      return;
    }
  } finally {
    state.refreshing = false;
    if (state.key && state.again) {
      refresh();
    } else if (state.key && generation === state.generation) {
      state.timer = window.setTimeout(refresh, refreshSeconds() * 1000);
    }
  }
}

function render(query, answers) {
  const charts = drawSeries(query, answers.series);
  drawTotals(answers.series.total);
  drawLatencyTable(answers.series.total);
  const providers = providerRows(answers.providers);
  drawCost(providers);
  const snapshot = {
    view: state.view,
    tenant: state.tenant,
    range: $("range-select").value,
    query,
    total: answers.series.total,
    thresholds: { warning: answers.series.complaintRateWarning, critical: answers.series.complaintRateCritical },
    charts,
    providers,
    tenants: [],
    health: [],
    routing: [],
    campaigns: [],
  };
  if (state.view === "platform") {
    snapshot.tenants = tenantRows(answers.tenants);
    drawTenants(snapshot.tenants);
    snapshot.health = healthRows(answers.health);
    drawHealth(snapshot.health);
    snapshot.routing = routingRows(answers.routing);
    drawRouting(snapshot.routing);
    snapshot.campaigns = campaignStatRows(answers.campaignStats);
    drawCampaignStats(snapshot.campaigns);
  } else {
    snapshot.campaigns = answers.campaigns;
    drawCampaigns(snapshot.campaigns);
  }
  state.refreshCount += 1;
  const now = new Date();
  snapshot.refreshCount = state.refreshCount;
  snapshot.updatedAt = now.toISOString();
  $("updated-at").textContent = `Updated ${now.toLocaleTimeString()} · every ${refreshSeconds()} s`;
  document.body.dataset.refreshCount = String(state.refreshCount);
  window.__dashboard = snapshot;
}

/** "platform" when the key may compare providers (platform admins only), "tenant" when it is refused that. */
async function detectView(key) {
  const end = Date.now();
  try {
    await apiGet("/v1/stats:compareProviders", [
      ["startTime", new Date(end - 3600e3).toISOString()], ["endTime", new Date(end).toISOString()]], key);
    return "platform";
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      throw error;
    }
    // 403 for a tenant's key; anything else (a mesh without the RPC) is no proof of an admin either.
    return "tenant";
  }
}

async function signIn(key) {
  showError("");
  $("key-submit").disabled = true;
  try {
    state.view = await detectView(key);
  } catch (error) {
    showError(describe(error));
    sessionStorage.removeItem(KEY_STORAGE);
    document.body.dataset.state = "signed-out";
    return;
  } finally {
    $("key-submit").disabled = false;
  }
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  $("key-form").hidden = true;
  $("controls").hidden = false;
  $("dashboard").hidden = false;
  const platform = state.view === "platform";
  $("view-label").textContent = platform ? "platform: every tenant" : "tenant";
  $("view-label").hidden = false;
  $("tenant-control").hidden = !platform;
  $("tenants-panel").hidden = !platform;
  $("health-panel").hidden = !platform;
  $("routing-panel").hidden = !platform;
  document.body.dataset.view = state.view;
  await refresh();
}

function signOut(message) {
  state.generation += 1;
  window.clearTimeout(state.timer);
  state.key = "";
  state.view = "";
  state.tenant = "";
  state.refreshCount = 0;
  sessionStorage.removeItem(KEY_STORAGE);
  destroyCharts();
  const select = $("tenant-select");
  select.replaceChildren(new Option("All tenants", ""));
  $("key-form").hidden = false;
  $("controls").hidden = true;
  $("dashboard").hidden = true;
  $("view-label").hidden = true;
  delete document.body.dataset.view;
  delete document.body.dataset.refreshCount;
  document.body.dataset.state = "signed-out";
  window.__dashboard = undefined;
  showError(message || "");
}

function start() {
  const range = new URLSearchParams(window.location.search).get("range");
  if (range && RANGES[range]) {
    $("range-select").value = range;
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) {
      signIn(key);
    }
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("refresh-button").addEventListener("click", () => refresh());
  $("range-select").addEventListener("change", () => refresh());
  $("tenant-select").addEventListener("change", (event) => {
    state.tenant = event.target.value;
    refresh();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.key && !state.refreshing) {
      refresh();
    }
  });
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) {
    signIn(saved);
  }
}

start();
