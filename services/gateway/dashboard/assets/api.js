// The REST API of this origin, and its answers as plain numbers.
//
// Answers are proto3 JSON: int64 fields come as strings, absent fields mean zero, enums as their names.

/** An answer other than 2xx: `status` is the HTTP status, `message` the google.rpc.Status message if any. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
  }
}

/**
 * GET `path` with `params` (an array of [name, value] pairs: repeated fields repeat the name) and the key as a
 * bearer token. The key never goes into the URL.
 */
export async function apiGet(path, params, key) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of params) {
    if (value !== undefined && value !== null && value !== "") {
      url.searchParams.append(name, String(value));
    }
  }
  return answer(await fetch(url, {
    headers: { Authorization: `Bearer ${key}`, Accept: "application/json" },
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  }));
}

/** POST `body` (JSON) to `path` with the key as a bearer token; the answer as apiGet gives it. */
export async function apiPost(path, body, key) {
  return answer(await fetch(new URL(path, window.location.origin), {
    method: "POST",
    headers: { Authorization: `Bearer ${key}`, Accept: "application/json", "Content-Type": "application/json" },
    body: JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  }));
}

/** A response's JSON body ({} when empty); ApiError with the google.rpc.Status message for anything but 2xx. */
async function answer(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, body && typeof body.message === "string" ? body.message : text.slice(0, 200));
  }
  return body || {};
}

/** A proto3 JSON number (int64 as a string, a double possibly "NaN") as a finite number, 0 when absent. */
export function num(value) {
  const n = Number(value ?? 0);
  return Number.isFinite(n) ? n : 0;
}

function latency(raw) {
  const l = raw || {};
  return { p50: num(l.p50Ms), p95: num(l.p95Ms), p99: num(l.p99Ms), count: num(l.count) };
}

/** A StatsRow as plain numbers. */
export function statsRow(raw) {
  const r = raw || {};
  return {
    key: r.key || "",
    dimensions: { ...(r.dimensions || {}) },
    accepted: num(r.accepted),
    sent: num(r.sent),
    delivered: num(r.delivered),
    bounced: num(r.bounced),
    failed: num(r.failed),
    complained: num(r.complained),
    deferred: num(r.deferred),
    suppressed: num(r.suppressed),
    cancelled: num(r.cancelled),
    deliveryRate: num(r.deliveryRate),
    bounceRate: num(r.bounceRate),
    complaintRate: num(r.complaintRate),
    complaintRateStatus: r.complaintRateStatus || "COMPLAINT_RATE_STATUS_UNSPECIFIED",
    sendLatency: latency(r.sendLatency),
    deliveryLatency: latency(r.deliveryLatency),
    providerCallLatency: latency(r.providerCallLatency),
    creditsCharged: num(r.creditsCharged),
    creditsPerThousandDelivered: num(r.creditsPerThousandDelivered),
    providerCostMicros: num(r.providerCostMicros),
    providerCostMicrosPerThousandDelivered: num(r.providerCostMicrosPerThousandDelivered),
    providerCalls: num(r.providerCalls),
    providerErrors: num(r.providerErrors),
    providerThrottled: num(r.providerThrottled),
    providerErrorRate: num(r.providerErrorRate),
    providerThrottleRate: num(r.providerThrottleRate),
  };
}

/** A GetStatsResponse as plain numbers. */
export function statsResponse(raw) {
  const r = raw || {};
  return {
    rows: (r.rows || []).map(statsRow),
    total: statsRow(r.total),
    complaintRateWarning: num(r.complaintRateWarning),
    complaintRateCritical: num(r.complaintRateCritical),
  };
}

/** A CompareProvidersResponse as plain numbers. */
export function providersResponse(raw) {
  return ((raw || {}).providers || []).map((p) => ({
    provider: p.provider || "",
    providerType: p.providerType || "",
    enabled: Boolean(p.enabled),
    figures: statsRow(p.figures),
    breakerState: p.breakerState || "",
    dailyQuotaUsed: num(p.dailyQuotaUsed),
    dailyQuotaLimit: num(p.dailyQuotaLimit),
    monthlyQuotaUsed: num(p.monthlyQuotaUsed),
    monthlyQuotaLimit: num(p.monthlyQuotaLimit),
    pricePerEmailMicros: num(p.pricePerEmailMicros),
  }));
}

/** A RouteEmailResponse: the providers in fallback order and the ones left out, each with why. */
export function routeResponse(raw) {
  const score = (p) => ({
    provider: (p.provider || "").replace(/^providers\//, ""),
    expectedCostMicros: num(p.expectedCostMicros),
    latencyP99EstimateMs: num(p.latencyP99EstimateMs),
    belowFloorReason: p.belowFloorReason || "",
    excludedReason: p.excludedReason || "",
  });
  const r = raw || {};
  return { ranked: (r.ranked || []).map(score), excluded: (r.excluded || []).map(score) };
}

/** A ListCampaignsResponse: each campaign's name, state and progress counts. */
export function campaignsResponse(raw) {
  return ((raw || {}).campaigns || []).map((c) => {
    const p = c.progress || {};
    return {
      name: c.name || "",
      displayName: c.displayName || "",
      state: (c.state || "CAMPAIGN_STATE_UNSPECIFIED").replace("CAMPAIGN_STATE_", "").toLowerCase(),
      recipients: num(p.recipients),
      pending: num(p.pending),
      queued: num(p.queued),
      sent: num(p.sent),
      delivered: num(p.delivered),
      bounced: num(p.bounced),
      complained: num(p.complained),
      failed: num(p.failed),
      suppressed: num(p.suppressed),
      cancelled: num(p.cancelled),
      invalid: num(p.invalid),
      sendRate: num(p.sendRate),
    };
  });
}

/** "tenants/acme" for "acme" or "tenants/acme" (the tenant dimension's value), "" for "". */
export function tenantName(value) {
  if (!value) {
    return "";
  }
  return value.startsWith("tenants/") ? value : `tenants/${value}`;
}
