CREATE SCHEMA IF NOT EXISTS router;

CREATE TABLE router.providers (
    id text PRIMARY KEY,
    type text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    endpoint text NOT NULL DEFAULT '',
    region text NOT NULL DEFAULT '',
    price_per_email_micros bigint NOT NULL DEFAULT 0 CHECK (price_per_email_micros >= 0),
    price_per_mb_micros bigint NOT NULL DEFAULT 0 CHECK (price_per_mb_micros >= 0),
    max_message_bytes bigint NOT NULL DEFAULT 0 CHECK (max_message_bytes >= 0),
    batch_size integer NOT NULL DEFAULT 0 CHECK (batch_size >= 0),
    rate_limit_per_second double precision NOT NULL DEFAULT 0 CHECK (rate_limit_per_second >= 0),
    daily_quota bigint NOT NULL DEFAULT 0 CHECK (daily_quota >= 0),
    monthly_quota bigint NOT NULL DEFAULT 0 CHECK (monthly_quota >= 0),
    allowed_classes text[] NOT NULL DEFAULT '{}',
    weight double precision NOT NULL DEFAULT 1 CHECK (weight > 0),
    disabled boolean NOT NULL DEFAULT false,
    options jsonb NOT NULL DEFAULT '{}',
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Secrets apart from the rest so that no query that lists providers can return them by accident.
CREATE TABLE router.provider_credentials (
    provider_id text PRIMARY KEY REFERENCES router.providers (id) ON DELETE CASCADE,
    credentials jsonb NOT NULL DEFAULT '{}'
);
