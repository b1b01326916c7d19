-- The ledger's schema: a double-entry journal of credit movements, the holds those movements belong to, the
-- per-tenant balances kept in step with the journal, the price book, the outcome events already applied and an
-- outbox of notifications for the service to publish.
CREATE SCHEMA IF NOT EXISTS ledger;

-- One row per tenant, updated in the same transaction as the journal rows that move its credits, so
-- "available >= 0" is a constraint the database enforces rather than a hope. fillfactor leaves room on the page
-- for HOT updates: a hot tenant's row is rewritten once per reserve batch.
CREATE TABLE ledger.balances (
    tenant_id text PRIMARY KEY,
    available bigint NOT NULL DEFAULT 0 CHECK (available >= 0),
    held bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    spent bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    low_balance_threshold bigint CHECK (low_balance_threshold >= 0),
    -- False between a low-balance notification and the next top-up that lifts the balance above the threshold.
    low_balance_armed boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- The journal. Every row is one balanced transfer: `amount` leaves `debit_account` and enters `credit_account`
-- of the same tenant, so no row can unbalance the books. The allowed (kind, debit, credit) triples are listed
-- here so that a bug cannot invent a new kind of movement. `issued` is the platform's side: credits it has sold
-- to the tenant (its balance is minus everything the tenant ever bought); `spent` is what the platform earned.
CREATE TABLE ledger.entries (
    entry_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    kind text NOT NULL,
    debit_account text NOT NULL,
    credit_account text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    hold_id text,
    request_id text,
    available_after bigint NOT NULL CHECK (available_after >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT entries_known_movement CHECK ((kind, debit_account, credit_account) IN (
        ('top_up', 'issued', 'available'),
        ('reserve', 'available', 'held'),
        ('commit', 'held', 'spent'),
        ('commit_refund', 'held', 'available'),
        ('release', 'held', 'available'),
        ('expire', 'held', 'available'))),
    CONSTRAINT entries_hold_movements_name_their_hold CHECK ((kind = 'top_up') = (hold_id IS NULL))
);
CREATE INDEX entries_by_tenant ON ledger.entries (tenant_id, entry_id);
-- A top-up's request id is its idempotency key (AIP-155), per tenant.
CREATE UNIQUE INDEX entries_top_up_request ON ledger.entries (tenant_id, request_id) WHERE kind = 'top_up';

-- Append-only: corrections are new entries, never edits.
CREATE FUNCTION ledger.refuse_journal_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.entries is append-only: % refused', TG_OP USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger.entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_journal_change();

-- A hold: credits set aside for one message or one campaign chunk. The price is fixed when the hold is made
-- and recorded here, so a later price change never alters what an accepted message costs.
CREATE TABLE ledger.holds (
    hold_id text PRIMARY KEY,
    tenant_id text NOT NULL,
    message_class text NOT NULL CHECK (message_class IN ('otp', 'transactional', 'bulk')),
    emails bigint NOT NULL CHECK (emails > 0),
    attachment_bytes bigint NOT NULL CHECK (attachment_bytes >= 0),
    price_per_email bigint NOT NULL CHECK (price_per_email >= 0),
    price_per_attachment_mb bigint NOT NULL CHECK (price_per_attachment_mb >= 0),
    amount bigint NOT NULL CHECK (amount >= 0),
    state text NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'committed', 'released', 'expired')),
    committed_amount bigint,
    resolution_request_id text,
    resolution_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    resolved_at timestamptz,
    CONSTRAINT holds_resolved_once_with_a_time CHECK ((state = 'held') = (resolved_at IS NULL)),
    CONSTRAINT holds_commit_amount CHECK (
        (state = 'committed') = (committed_amount IS NOT NULL)
        AND (committed_amount IS NULL OR committed_amount BETWEEN 0 AND amount))
);
-- The sweeper's queue: only unresolved holds, oldest deadline first.
CREATE INDEX holds_held_by_expiry ON ledger.holds (expires_at) WHERE state = 'held';

-- Price book in credit units. tenant_id '-' is the platform default (every price set); a tenant's row overrides
-- the prices it sets and inherits the NULL ones.
CREATE TABLE ledger.price_books (
    tenant_id text PRIMARY KEY,
    otp_per_email bigint CHECK (otp_per_email >= 0),
    transactional_per_email bigint CHECK (transactional_per_email >= 0),
    bulk_per_email bigint CHECK (bulk_per_email >= 0),
    per_attachment_mb bigint CHECK (per_attachment_mb >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_books_default_is_complete CHECK (tenant_id <> '-' OR (
        otp_per_email IS NOT NULL AND transactional_per_email IS NOT NULL
        AND bulk_per_email IS NOT NULL AND per_attachment_mb IS NOT NULL))
);
INSERT INTO ledger.price_books (tenant_id, otp_per_email, transactional_per_email, bulk_per_email, per_attachment_mb)
VALUES ('-', 5, 3, 1, 1);

-- Outcome events already applied (sent -> commit, failed -> release), keyed by the event's id, so a redelivered
-- or duplicated event changes nothing. Rows may be pruned once older than the EVENTS stream's retention.
CREATE TABLE ledger.processed_events (
    event_id text PRIMARY KEY,
    hold_id text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('sent', 'failed')),
    result text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox: written with the change that caused it, published by the service afterwards.
CREATE TABLE ledger.notifications (
    notification_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX notifications_unpublished ON ledger.notifications (notification_id) WHERE published_at IS NULL;
