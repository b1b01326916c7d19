CREATE SCHEMA IF NOT EXISTS ingest;

CREATE TABLE ingest.tenants (
    id text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    otp_rate_per_second double precision NOT NULL DEFAULT 0,
    transactional_rate_per_second double precision NOT NULL DEFAULT 0,
    bulk_rate_per_second double precision NOT NULL DEFAULT 0,
    daily_quota bigint NOT NULL DEFAULT 0,
    large_attachment_policy text NOT NULL DEFAULT 'link' CHECK (large_attachment_policy IN ('link', 'reject')),
    allowed_headers text[] NOT NULL DEFAULT '{}',
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Only a hash of each key's secret is kept; the secret is shown once at creation.
CREATE TABLE ingest.api_keys (
    id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES ingest.tenants (id),
    display_name text NOT NULL DEFAULT '',
    secret_sha256 bytea NOT NULL,
    scopes text[] NOT NULL,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);
CREATE INDEX api_keys_tenant ON ingest.api_keys (tenant_id, created_at);

CREATE TABLE ingest.messages (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    request_id text,
    -- sha256 of the request as received: the same request_id with another request is refused.
    request_sha256 bytea NOT NULL,
    message_class text NOT NULL,
    -- The SendTask protobuf: the whole email as queued.
    task bytea NOT NULL,
    credits bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- AIP-155 idempotency: the source of truth; Redis is only a fast path.
CREATE UNIQUE INDEX messages_tenant_request ON ingest.messages (tenant_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX messages_created ON ingest.messages (created_at);

-- Transactional outbox: written with the message, deleted once JetStream acknowledged the publish.
CREATE TABLE ingest.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ingest.attachments (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    request_id text,
    filename text NOT NULL,
    content_type text NOT NULL,
    size_bytes bigint NOT NULL,
    sha256 text NOT NULL,
    s3_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);
CREATE UNIQUE INDEX attachments_tenant_request ON ingest.attachments (tenant_id, request_id) WHERE request_id IS NOT NULL;
