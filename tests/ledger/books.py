"""Checks of the books straight from the tables, independent of the Ledger class."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class TenantBooks:
    """One tenant's accounts as the journal derives them and as the balance row keeps them."""

    derived: dict[str, int]
    kept: dict[str, int]


async def check_books(pool: AsyncConnectionPool) -> dict[str, TenantBooks]:
    """Assert every invariant the tables must keep, whatever happened before; return each tenant's books.

    - each journal row is a positive transfer between two different accounts (balanced: it sums to zero);
    - all accounts of all tenants sum to zero;
    - the kept balances equal the balances derived from the journal, and none is negative;
    - held equals the sum of the tenant's unresolved holds;
    - each hold was reserved once and resolved at most once: credits into ``held`` equal its amount, credits out
      of ``held`` equal its amount if it is resolved and zero if not, and what went to ``spent`` is its
      committed amount.
    """
    async with pool.connection() as conn:
        derived = await _derived_balances(conn)
        cur = await conn.execute("SELECT tenant_id, available, held, spent FROM ledger.tenant_balances")
        kept = {row[0]: {"available": row[1], "held": row[2], "spent": row[3]} for row in await cur.fetchall()}

        cur = await conn.execute(
            "SELECT count(*) FROM ledger.entries WHERE amount <= 0 OR debit_account = credit_account"
        )
        unbalanced = await cur.fetchone()
        assert unbalanced == (0,), "an unbalanced journal row exists"
        assert sum(sum(accounts.values()) for accounts in derived.values()) == 0, "the books do not sum to zero"

        books: dict[str, TenantBooks] = {}
        for tenant in set(derived) | set(kept):
            accounts = derived.get(tenant, {})
            row = kept.get(tenant, {"available": 0, "held": 0, "spent": 0})
            for name in ("available", "held", "spent"):
                assert accounts.get(name, 0) == row[name], f"{tenant} {name}: journal {accounts} vs kept {row}"
                assert row[name] >= 0, f"{tenant} {name} is negative: {row}"
            assert accounts.get("issued", 0) == -(row["available"] + row["held"] + row["spent"])
            books[tenant] = TenantBooks(derived=accounts, kept=row)

        cur = await conn.execute(
            """SELECT b.tenant_id, b.held, COALESCE(h.held, 0) FROM ledger.tenant_balances b
               LEFT JOIN (SELECT tenant_id, sum(amount) AS held FROM ledger.holds WHERE state = 'held'
                          GROUP BY tenant_id) h USING (tenant_id)
               WHERE b.held <> COALESCE(h.held, 0)"""
        )
        assert await cur.fetchall() == [], "held balance differs from the sum of unresolved holds"

        cur = await conn.execute(
            """SELECT h.hold_id, h.state, h.amount, h.committed_amount,
                      COALESCE(sum(e.amount) FILTER (WHERE e.credit_account = 'held'), 0) AS into_held,
                      COALESCE(sum(e.amount) FILTER (WHERE e.debit_account = 'held'), 0) AS out_of_held,
                      COALESCE(sum(e.amount) FILTER (WHERE e.credit_account = 'spent'), 0) AS into_spent,
                      count(e.entry_id) FILTER (WHERE e.kind = 'reserve') AS reserves
               FROM ledger.holds h LEFT JOIN ledger.entries e ON e.hold_id = h.hold_id
               GROUP BY h.hold_id"""
        )
        for hold_id, state, amount, committed, into_held, out_of_held, into_spent, reserves in await cur.fetchall():
            assert into_held == amount and reserves == (1 if amount else 0), f"hold {hold_id} reserved wrongly"
            assert out_of_held == (0 if state == "held" else amount), f"hold {hold_id} resolved wrongly ({state})"
            assert into_spent == (committed or 0), f"hold {hold_id} spent {into_spent}, committed {committed}"
    return books


async def _derived_balances(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    cur = await conn.execute(
        """SELECT tenant_id, account, sum(delta)::bigint FROM (
               SELECT tenant_id, credit_account AS account, amount AS delta FROM ledger.entries
               UNION ALL
               SELECT tenant_id, debit_account, -amount FROM ledger.entries) moves
           GROUP BY tenant_id, account"""
    )
    derived: dict[str, dict[str, int]] = {}
    for tenant, account, total in await cur.fetchall():
        derived.setdefault(tenant, {})[account] = total
    return derived
