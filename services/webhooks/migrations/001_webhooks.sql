-- Webhook endpoints and the deliveries to them (issue 18). The dispatcher's queue lives here, per endpoint: a
-- delivery is one HTTP message (one event, or a batch) with its webhook-id fixed at creation, so every retry and a
-- restart after a crash send the same id.
CREATE SCHEMA IF NOT EXISTS webhooks;

CREATE TABLE webhooks.endpoints (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    url text NOT NULL,
    description text NOT NULL DEFAULT '',
    event_types text[] NOT NULL DEFAULT '{}',
    tags text[] NOT NULL DEFAULT '{}',
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text NOT NULL DEFAULT '',
    max_batch_size integer NOT NULL DEFAULT 1 CHECK (max_batch_size BETWEEN 1 AND 100),
    request_id text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    last_success_time timestamptz,
    failing_since timestamptz
);
CREATE INDEX endpoints_by_tenant ON webhooks.endpoints (tenant_id, id);
CREATE UNIQUE INDEX endpoints_by_request ON webhooks.endpoints (tenant_id, request_id) WHERE request_id <> '';

-- Signing secrets, sealed (libs/common/secret_box.py, context webhooks.endpoint_secrets/<endpoint id>). Several
-- are active during a rotation's overlap: deliveries are signed with each secret not yet expired.
CREATE TABLE webhooks.endpoint_secrets (
    endpoint_id text NOT NULL REFERENCES webhooks.endpoints (id) ON DELETE CASCADE,
    secret_id bigserial,
    sealed bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz,
    PRIMARY KEY (endpoint_id, secret_id)
);

-- The queue's tables name their endpoint without a foreign key: a key check per inserted row would read (and
-- share-lock) the endpoint's row for every event, the row the dispatcher updates. EndpointStore.delete removes
-- an endpoint's rows from each.

-- One HTTP message to send: its body is fixed when it is queued (a retry sends the same bytes under a fresh
-- timestamp and signature). dedupe_key makes queueing idempotent: the event consumer's key is the webhook-id, a
-- replay's carries its request.
CREATE TABLE webhooks.deliveries (
    id bigserial PRIMARY KEY,
    endpoint_id text NOT NULL,
    tenant_id text NOT NULL,
    webhook_id text NOT NULL,
    dedupe_key text NOT NULL,
    event_types text[] NOT NULL,
    body bytea NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    -- pending: waiting for next_attempt_time (also the lease of an attempt in flight); delivered; failed (tries
    -- exhausted, or the endpoint answered 410 Gone). A disabled endpoint's deliveries stay pending, unclaimed, until
    -- it is enabled again.
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    -- A test event: sent even while the endpoint is disabled.
    ignore_disabled boolean NOT NULL DEFAULT false,
    create_time timestamptz NOT NULL DEFAULT now(),
    finish_time timestamptz,
    UNIQUE (endpoint_id, dedupe_key)
);
CREATE INDEX deliveries_due ON webhooks.deliveries (next_attempt_time) WHERE state = 'pending';
CREATE INDEX deliveries_by_endpoint ON webhooks.deliveries (endpoint_id, state);

-- The delivery log: every HTTP attempt.
CREATE TABLE webhooks.attempts (
    id bigserial PRIMARY KEY,
    endpoint_id text NOT NULL,
    delivery_id bigint NOT NULL,
    webhook_id text NOT NULL,
    attempt integer NOT NULL,
    attempt_time timestamptz NOT NULL,
    status_code integer NOT NULL DEFAULT 0,
    latency_ms bigint NOT NULL DEFAULT 0,
    response_excerpt text NOT NULL DEFAULT '',
    error text NOT NULL DEFAULT '',
    success boolean NOT NULL,
    event_types text[] NOT NULL,
    next_attempt_time timestamptz
);
CREATE INDEX attempts_newest_first ON webhooks.attempts (endpoint_id, id DESC);
