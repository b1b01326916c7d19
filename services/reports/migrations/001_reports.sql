-- The reports service's schema: message status, event timelines, the provider message-id index used by
-- delivery webhooks, hourly stats rollups, suppression lists and the webhook secrets of provider instances.
CREATE SCHEMA IF NOT EXISTS reports;

-- One row per message: its current state and the summary the ACCEPTED event carried. A row can exist before
-- its ACCEPTED event arrived (events are delivered out of order): such a placeholder has accepted_seen = false
-- and empty summary fields until the ACCEPTED event fills them in.
-- state_rank orders states so that a late event never moves a message backwards (see services/reports/models.py);
-- it is stored because the same state can be reached at different ranks (FAILED by the sender, or REJECTED by
-- the provider after it had taken the message).
CREATE TABLE reports.messages (
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    state text NOT NULL CHECK (state IN
        ('accepted', 'deferred', 'sent', 'delivered', 'bounced', 'failed', 'complained')),
    state_rank smallint NOT NULL,
    state_time timestamptz NOT NULL,
    accepted_seen boolean NOT NULL DEFAULT false,
    message_class text NOT NULL DEFAULT '',
    -- Mailboxes as JSON: {"email": ..., "name": ...} and arrays of them.
    sender jsonb NOT NULL DEFAULT '{}',
    to_addrs jsonb NOT NULL DEFAULT '[]',
    cc_addrs jsonb NOT NULL DEFAULT '[]',
    bcc_addrs jsonb NOT NULL DEFAULT '[]',
    subject text NOT NULL DEFAULT '',
    tags text[] NOT NULL DEFAULT '{}',
    metadata jsonb NOT NULL DEFAULT '{}',
    attachment_ids text[] NOT NULL DEFAULT '{}',
    request_id text NOT NULL DEFAULT '',
    credits bigint NOT NULL DEFAULT 0,
    campaign text NOT NULL DEFAULT '',
    provider text NOT NULL DEFAULT '',
    provider_message_id text NOT NULL DEFAULT '',
    attempts integer NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, message_id)
) WITH (fillfactor = 80);
-- ListMessages pages newest first with a keyset cursor (create_time, message_id).
CREATE INDEX messages_newest_first ON reports.messages (tenant_id, create_time DESC, message_id DESC);
CREATE INDEX messages_by_state ON reports.messages (tenant_id, state, create_time DESC, message_id DESC);
CREATE INDEX messages_by_tag ON reports.messages USING gin (tags);
-- Webhooks that carry our own message id (Mailgun v:esp_message_id, SendGrid custom_args ...) find the tenant here.
CREATE INDEX messages_by_id ON reports.messages (message_id);

-- The timeline: every event once (event_id is the dedupe key of at-least-once delivery).
CREATE TABLE reports.events (
    event_id text PRIMARY KEY,
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    event_type text NOT NULL,
    event_time timestamptz NOT NULL,
    provider text NOT NULL DEFAULT '',
    provider_message_id text NOT NULL DEFAULT '',
    recipient text NOT NULL DEFAULT '',
    reason text NOT NULL DEFAULT '',
    attempt integer NOT NULL DEFAULT 0,
    outcome text NOT NULL DEFAULT '',
    latency_ms bigint NOT NULL DEFAULT 0,
    bounce_type text NOT NULL DEFAULT '',
    url text NOT NULL DEFAULT '',
    attributes jsonb NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_timeline ON reports.events (tenant_id, message_id, event_time, event_id);

-- Provider message id -> our message, written from SENT events, read by the webhook receiver. A batch send
-- shares one provider id between many of our messages (SendGrid's X-Message-Id is per request), so the
-- recipient disambiguates.
CREATE TABLE reports.provider_messages (
    provider text NOT NULL,
    provider_message_id text NOT NULL,
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    recipient text NOT NULL DEFAULT '',
    PRIMARY KEY (provider, provider_message_id, tenant_id, message_id)
);

-- Delivery callbacks that arrived before we knew their message (the SENT or ACCEPTED event was still queued).
-- The consumer applies them as soon as the event that identifies their message is recorded.
CREATE TABLE reports.unmatched_delivery_events (
    event_id text PRIMARY KEY,
    provider text NOT NULL,
    provider_message_id text NOT NULL DEFAULT '',
    message_id text NOT NULL DEFAULT '',
    -- An esp.v1.MessageEvent protobuf (tenant and message still unknown).
    event bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unmatched_by_provider_id ON reports.unmatched_delivery_events (provider, provider_message_id)
    WHERE provider_message_id <> '';
CREATE INDEX unmatched_by_message_id ON reports.unmatched_delivery_events (message_id) WHERE message_id <> '';

-- Hourly rollups, written by the consumer in the same transaction as the events they count. Stats queries read
-- (hours x classes x providers) rows instead of scanning ~600 M events a day. tag = '' is the row of all
-- messages; a message with tags is counted once more under each of its tags (for grouping by tag).
-- latency_buckets is a histogram of ATTEMPTED latencies over fixed log-spaced buckets (services/reports/stats.py)
-- so that rows can be summed and percentiles read from the sum.
CREATE TABLE reports.stats_hourly (
    tenant_id text NOT NULL,
    hour timestamptz NOT NULL,
    message_class text NOT NULL,
    provider text NOT NULL,
    tag text NOT NULL,
    accepted bigint NOT NULL DEFAULT 0,
    sent bigint NOT NULL DEFAULT 0,
    delivered bigint NOT NULL DEFAULT 0,
    bounced bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    complained bigint NOT NULL DEFAULT 0,
    opened bigint NOT NULL DEFAULT 0,
    clicked bigint NOT NULL DEFAULT 0,
    unsubscribed bigint NOT NULL DEFAULT 0,
    latency_buckets bigint[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, hour, message_class, provider, tag)
) WITH (fillfactor = 70);

-- Element-wise sum of two histograms (missing elements count as 0).
CREATE FUNCTION reports.add_buckets(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i), '{}'::bigint[])
    FROM unnest(a, b) WITH ORDINALITY AS pair(x, y, i)
$$;
CREATE AGGREGATE reports.sum_buckets(bigint[]) (
    SFUNC = reports.add_buckets, STYPE = bigint[], INITCOND = '{}', PARALLEL = SAFE
);

-- Addresses a tenant never sends to again. Mirrored in the Redis set {namespace}:supp:{tenant} that ingest
-- checks at accept; Postgres is the truth and the sets are rebuilt from it at start.
CREATE TABLE reports.suppressions (
    tenant_id text NOT NULL,
    email text NOT NULL CHECK (email = lower(email) AND email <> ''),
    reason text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'unsubscribe', 'manual')),
    note text NOT NULL DEFAULT '',
    source_message_id text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, email)
);

-- Webhook secrets per configured provider instance (the name in POST /webhooks/{provider_name}); filled by the
-- platform's provider management (dev seeding for `make run`). Keys of `secrets` are documented per provider type
-- in libs/providers/<type>/webhook.py.
CREATE TABLE reports.provider_webhook_secrets (
    provider_name text PRIMARY KEY,
    provider_type text NOT NULL,
    secrets jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
