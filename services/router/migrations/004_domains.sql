-- Tenants' sending domains (services/router/domains.py). Postgres is the truth; the router writes each domain to the
-- sending-domains KV bucket after every change (libs/common/sending_domains.py), as it does for providers.
CREATE TABLE router.domains (
    tenant_id text NOT NULL,
    domain text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'verified', 'failed')),
    -- The ownership token the tenant publishes at _esp-verification.<domain>; not a secret (it is in public DNS).
    token text NOT NULL,
    ed25519 boolean NOT NULL DEFAULT false,
    -- What the last DNS check found, per record: [{"name", "purpose", "selector", "state", "seen"}].
    checks jsonb NOT NULL DEFAULT '[]',
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    verified_at timestamptz,
    checked_at timestamptz,
    -- When the periodic re-check (services/router/domain_checks.py) looks at it next; a replica taking it moves this
    -- ahead first, so replicas share the work without checking a domain twice.
    next_check_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, domain)
);

-- One account at a time may send as a domain: a second tenant's verification of a domain another has verified
-- fails on this index (and CreateDomain refuses it up front).
CREATE UNIQUE INDEX domains_verified_by_one_tenant ON router.domains (domain) WHERE state = 'verified';
CREATE INDEX domains_by_next_check ON router.domains (next_check_at);

-- DKIM keys: the private key only sealed (libs/common/secret_box.py, bound to
-- libs.common.sending_domains.signing_key_context), never in plain text.
CREATE TABLE router.domain_keys (
    tenant_id text NOT NULL,
    domain text NOT NULL,
    selector text NOT NULL,
    algorithm text NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    -- active: signs; ahead: a rotation's new key, published first, active once DNS serves it; retired: replaced,
    -- still published until the next rotation.
    status text NOT NULL CHECK (status IN ('active', 'ahead', 'retired')),
    sealed_private_key bytea NOT NULL,
    public_record text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, domain, selector),
    FOREIGN KEY (tenant_id, domain) REFERENCES router.domains (tenant_id, domain) ON DELETE CASCADE
);

-- The router's notifications (domain.verified, domain.verification_failed): written in the transaction of the
-- state change, published after the commit (libs/common/outbox.py).
CREATE TABLE router.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    traceparent text,
    created_at timestamptz NOT NULL DEFAULT now()
);
