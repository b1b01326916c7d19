-- Campaigns: the campaign (its spec, lifecycle state, expansion cursor and counters), its recipients, the outbox
-- its expansion writes, and the request ids of its transitions (AIP-155).
CREATE SCHEMA IF NOT EXISTS campaigns;

CREATE TABLE campaigns.campaigns (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    request_id text,
    spec jsonb NOT NULL,
    fingerprint bytea NOT NULL,
    state text NOT NULL,
    pause_reason text NOT NULL DEFAULT '',
    send_time timestamptz,
    -- Expansion cursor: rows are numbered from 1 in the order added; every row below next_row is expanded.
    next_row bigint NOT NULL DEFAULT 1,
    last_row bigint NOT NULL DEFAULT 0,
    -- Rate pacing: the next chunk waits until then.
    not_before timestamptz,
    -- After a resume or cancel, the expander puts parked emails back in the send stream until then.
    unpark_until timestamptz,
    recipients bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    invalid bigint NOT NULL DEFAULT 0,
    expanded bigint NOT NULL DEFAULT 0,
    queued bigint NOT NULL DEFAULT 0,
    suppressed bigint NOT NULL DEFAULT 0,
    render_failed bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    ended_at timestamptz
);
CREATE UNIQUE INDEX campaigns_tenant_request ON campaigns.campaigns (tenant_id, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX campaigns_tenant_created ON campaigns.campaigns (tenant_id, created_at DESC, id DESC);
CREATE INDEX campaigns_due ON campaigns.campaigns (send_time) WHERE state = 'scheduled';
CREATE INDEX campaigns_live ON campaigns.campaigns (updated_at) WHERE state IN ('running', 'paused');

CREATE TABLE campaigns.recipients (
    campaign_id text NOT NULL,
    row_number bigint NOT NULL,
    email text NOT NULL,
    name text NOT NULL DEFAULT '',
    variables jsonb,
    PRIMARY KEY (campaign_id, row_number)
);
-- Duplicates within a campaign are dropped on insert; addresses differing only in case are one recipient (as the
-- suppression list sees them).
CREATE UNIQUE INDEX recipients_campaign_email ON campaigns.recipients (campaign_id, lower(email));

CREATE TABLE campaigns.transitions (
    campaign_id text NOT NULL,
    request_id text NOT NULL,
    action text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, request_id)
);

-- Transactional outbox: written with each expanded chunk, deleted once JetStream acknowledged the publish.
CREATE TABLE campaigns.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
