"""A tenant's balance: top-ups, the low-balance threshold, reading it, and the balance rows every operation that
moves credits locks and updates.

``ledger.balances`` keeps each tenant's available/held/spent, updated under the row's lock in the transaction that
moves the credits, with ``CHECK (available >= 0)`` as the last line of defence. Outcome commits add to
``ledger.commit_totals`` instead (see :mod:`services.ledger.outcomes`); the ``ledger.tenant_balances`` view combines
the two. Every transaction locks balance rows in tenant order, so they never deadlock on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection

from services.ledger.database import Database
from services.ledger.errors import IdempotencyMismatch, InvalidAmount
from services.ledger.journal import NewEntry, insert_entries
from services.ledger.models import Balance, EntryKind
from services.ledger.notifications import insert_notifications, low_balance
from services.ledger.validation import MAX_TOP_UP, require_id, require_positive


@dataclass
class LockedBalance:
    """A balance row as read in a batch's transaction, and the changes the batch makes to it."""

    available: int
    held_delta: int = 0
    spent_delta: int = 0
    available_delta: int = 0

    @property
    def changed(self) -> bool:
        """Whether the row needs writing back."""
        return bool(self.available_delta or self.held_delta or self.spent_delta)


async def top_up(db: Database, tenant_id: str, amount: int, request_id: str) -> Balance:
    """:meth:`Ledger.top_up <services.ledger.ledger.Ledger.top_up>`."""
    require_id("tenant_id", tenant_id)
    require_id("request_id", request_id)
    require_positive("amount", amount, MAX_TOP_UP)

    async def work(conn: AsyncConnection) -> Balance:
        await conn.execute(
            "INSERT INTO ledger.balances (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING",
            (tenant_id,),
        )
        balance, armed = await lock_balance(conn, tenant_id)
        cur = await conn.execute(
            "SELECT amount FROM ledger.entries WHERE tenant_id = %s AND request_id = %s AND kind = 'top_up'",
            (tenant_id, request_id),
        )
        previous = await cur.fetchone()
        if previous is not None:
            if previous[0] != amount:
                raise IdempotencyMismatch(
                    "request_id", request_id, f"top-up of {previous[0]} before, of {amount} now"
                )
            return balance
        available = balance.available + amount
        threshold = balance.low_balance_threshold
        rearm = armed or threshold is None or available >= threshold
        await insert_entries(conn, [NewEntry(tenant_id, EntryKind.TOP_UP, amount, None, request_id, available)])
        await conn.execute(
            "UPDATE ledger.balances SET available = %s, low_balance_armed = %s, updated_at = now() "
            "WHERE tenant_id = %s",
            (available, rearm, tenant_id),
        )
        return Balance(tenant_id, available, balance.held, balance.spent, threshold)

    return await db.transaction(work)


async def get_balance(db: Database, tenant_id: str) -> Balance:
    """:meth:`Ledger.get_balance <services.ledger.ledger.Ledger.get_balance>`."""
    require_id("tenant_id", tenant_id)
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT available, held, spent, low_balance_threshold FROM ledger.tenant_balances WHERE tenant_id = %s",
            (tenant_id,),
        )
        row = await cur.fetchone()
    if row is None:
        return Balance(tenant_id, 0, 0, 0)
    return Balance(tenant_id, row[0], row[1], row[2], row[3])


async def set_low_balance_threshold(db: Database, tenant_id: str, threshold: int | None) -> Balance:
    """:meth:`Ledger.set_low_balance_threshold <services.ledger.ledger.Ledger.set_low_balance_threshold>`."""
    require_id("tenant_id", tenant_id)
    if threshold is not None and threshold < 0:
        raise InvalidAmount("threshold", threshold, "must not be negative")

    async def work(conn: AsyncConnection) -> Balance:
        await conn.execute(
            "INSERT INTO ledger.balances (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING",
            (tenant_id,),
        )
        balance, armed = await lock_balance(conn, tenant_id)
        if threshold == balance.low_balance_threshold:
            return balance
        armed = True
        if threshold is not None and balance.available < threshold:
            armed = False
            await insert_notifications(conn, [low_balance(tenant_id, threshold, balance.available)])
        await conn.execute(
            "UPDATE ledger.balances SET low_balance_threshold = %s, low_balance_armed = %s, "
            "updated_at = now() WHERE tenant_id = %s",
            (threshold, armed, tenant_id),
        )
        return Balance(tenant_id, balance.available, balance.held, balance.spent, threshold)

    return await db.transaction(work)


async def lock_balance(conn: AsyncConnection, tenant_id: str) -> tuple[Balance, bool]:
    """Lock the tenant's balance row (which must exist) and read it with its commit total; returns the balance and
    whether the low-balance notification is armed."""
    cur = await conn.execute(
        """SELECT b.available, b.held - COALESCE(c.committed, 0), b.spent + COALESCE(c.committed, 0),
                  b.low_balance_threshold, b.low_balance_armed
           FROM ledger.balances b LEFT JOIN ledger.commit_totals c USING (tenant_id)
           WHERE b.tenant_id = %s FOR UPDATE OF b""",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise AssertionError(f"balance row of {tenant_id} vanished")
    return Balance(tenant_id, row[0], row[1], row[2], row[3]), bool(row[4])


async def query_balances(conn: AsyncConnection, tenants: Sequence[str], *, lock: bool) -> psycopg.AsyncCursor[Any]:
    """Read the balance rows of ``tenants``; with ``lock``, lock them in tenant order (every transaction locks
    balance rows in that order, so they never deadlock on them)."""
    query = "SELECT tenant_id, available FROM ledger.balances WHERE tenant_id = ANY(%b)"
    if lock:
        query += " ORDER BY tenant_id FOR UPDATE"
    return await conn.execute(query, (sorted(tenants),))


async def fetch_balances(cursor: psycopg.AsyncCursor[Any]) -> dict[str, LockedBalance]:
    """The rows of a :func:`query_balances`, by tenant."""
    return {row[0]: LockedBalance(row[1]) for row in await cursor.fetchall()}


async def lock_balances(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, LockedBalance]:
    """Lock and read the balance rows of ``tenants``."""
    return await fetch_balances(await query_balances(conn, tenants, lock=True))


async def update_balances(conn: AsyncConnection, balances: dict[str, LockedBalance]) -> None:
    """Apply each changed balance's deltas (the rows are locked by the caller)."""
    changed = [(tenant, b) for tenant, b in balances.items() if b.changed]
    if not changed:
        return
    await conn.execute(
        """UPDATE ledger.balances AS b
           SET available = b.available + d.available_delta, held = b.held + d.held_delta,
               spent = b.spent + d.spent_delta, updated_at = now()
           FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[])
                AS d(tenant_id, available_delta, held_delta, spent_delta)
           WHERE b.tenant_id = d.tenant_id""",
        (
            [tenant for tenant, _ in changed],
            [b.available_delta for _, b in changed],
            [b.held_delta for _, b in changed],
            [b.spent_delta for _, b in changed],
        ),
    )
