-- Tenant domains registered at upstream providers (services/router/domain_readiness.py): one row per provider that
-- registers domains (libs/providers/capabilities.py) and verified tenant domain. Postgres remembers what each
-- provider last said; the worker writes it to the sending-domains KV bucket as ready.<provider>.<tenant>.<domain>,
-- which routing reads. A provider deleted or a domain removed takes its rows (and so its entries) with it.
CREATE TABLE router.domain_registrations (
    provider_id text NOT NULL,
    tenant_id text NOT NULL,
    domain text NOT NULL,
    -- What the provider last said: ready, pending or failed (a refused registration is failed, not registered).
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('ready', 'pending', 'failed')),
    detail text NOT NULL DEFAULT '',
    -- The DNS records the provider wants: [{"type", "name", "value", "valid"}].
    records jsonb NOT NULL DEFAULT '[]',
    -- The domain's id at the provider where it has one besides its name (SendGrid, Postmark).
    provider_ref text NOT NULL DEFAULT '',
    -- Whether the provider took the registration: from then on its status is read, not registered again.
    registered boolean NOT NULL DEFAULT false,
    -- When the provider first answered about it: only answered rows become readiness entries.
    answered_at timestamptz,
    -- Calls in a row that failed (the provider unavailable, or its answer failed): the retry backs off with it.
    attempts integer NOT NULL DEFAULT 0,
    -- When a replica asks the provider next (soon while pending, hourly once ready); a replica taking the row moves
    -- it ahead first, so replicas share the work without asking twice.
    next_check_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, tenant_id, domain)
);

CREATE INDEX domain_registrations_due ON router.domain_registrations (next_check_at);
