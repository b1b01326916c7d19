-- Committed holds (sent -> spent) are counted on a row of their own per tenant, not on ledger.balances.
--
-- A campaign settles thousands of holds a second, and each settlement batch used to lock the tenant's balance row
-- until its commit was flushed; every reserve of that tenant — the credit hold every accept waits for, an OTP's
-- among them — waited behind it. A commit moves credits between held and spent only, which no reserve reads, so
-- outcome commits now add to ledger.commit_totals instead and never touch the row reserves lock. Releases,
-- expiries and commits made through the API still move `available` on ledger.balances, as before.
--
-- A tenant's held is balances.held - commit_totals.committed, its spent balances.spent + commit_totals.committed:
-- ledger.tenant_balances is that view, and the only place to read held and spent from.
CREATE TABLE ledger.commit_totals (
    tenant_id text PRIMARY KEY,
    committed bigint NOT NULL DEFAULT 0 CHECK (committed >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

CREATE VIEW ledger.tenant_balances AS
SELECT b.tenant_id,
       b.available,
       b.held - COALESCE(c.committed, 0) AS held,
       b.spent + COALESCE(c.committed, 0) AS spent,
       b.low_balance_threshold,
       b.low_balance_armed
FROM ledger.balances b
LEFT JOIN ledger.commit_totals c USING (tenant_id);
