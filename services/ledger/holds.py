"""Resolving holds: a held hold ends committed (spent, the unused part back to available), released or expired
(its credits back to available), once. Reading a hold, the commit and release calls, the expiry sweeper's step, and
the resolution they share: the hold rows, their journal entries and the balance changes in one transaction.

Resolutions lock the hold rows first, then the balance rows (in tenant order); the sweeper takes due holds with
``SKIP LOCKED`` so replicas share the work. Outcome events resolve holds in a batch of their own
(:mod:`services.ledger.outcomes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from services.ledger.balances import lock_balances, update_balances
from services.ledger.database import Database
from services.ledger.errors import HoldAlreadyResolved, HoldNotFound, IdempotencyMismatch, InvalidAmount
from services.ledger.journal import NewEntry, insert_entries
from services.ledger.models import EntryKind, Hold, HoldState, MessageClass, Price
from services.ledger.validation import require_id

HOLD_COLUMNS = (
    "hold_id, tenant_id, message_class, emails, attachment_bytes, price_per_email, price_per_attachment_mb, "
    "amount, state, committed_amount, created_at, expires_at, resolved_at, resolution_request_id, "
    "resolution_reason"
)
"""The columns of ``ledger.holds`` that :func:`hold_from_row` reads, in its order."""


@dataclass(frozen=True)
class _Resolution:
    """A held hold to move to a final state."""

    hold: Hold
    state: HoldState
    committed_amount: int | None = None
    request_id: str | None = None
    reason: str | None = None


async def get_hold(db: Database, hold_id: str) -> Hold:
    """:meth:`Ledger.get_hold <services.ledger.ledger.Ledger.get_hold>`."""
    require_id("hold_id", hold_id)
    async with db.pool.connection() as conn:
        cur = await conn.execute(f"SELECT {HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = %s", (hold_id,))
        row = await cur.fetchone()
    if row is None:
        raise HoldNotFound(hold_id)
    return hold_from_row(row)


async def commit(db: Database, hold_id: str, amount: int | None, request_id: str | None) -> Hold:
    """:meth:`Ledger.commit <services.ledger.ledger.Ledger.commit>`."""
    require_id("hold_id", hold_id)
    if request_id is not None:
        require_id("request_id", request_id)
    if amount is not None and amount < 0:
        raise InvalidAmount("amount", amount, "must not be negative")

    async def work(conn: AsyncConnection) -> Hold:
        hold = await _lock_hold(conn, hold_id)
        spend = hold.amount if amount is None else amount
        if hold.state is HoldState.HELD:
            if spend > hold.amount:
                raise InvalidAmount("amount", spend, f"must not exceed the hold's {hold.amount} credits")
            resolved = await _resolve(conn, [_Resolution(hold, HoldState.COMMITTED, spend, request_id)])
            return resolved[0]
        if hold.state is HoldState.COMMITTED:
            same_key = request_id is None or request_id == hold.resolution_request_id
            if same_key and spend == hold.committed_amount:
                return hold
            if request_id is not None and request_id == hold.resolution_request_id:
                raise IdempotencyMismatch(
                    "request_id", request_id, f"committed {hold.committed_amount} before, {spend} now"
                )
        raise HoldAlreadyResolved(hold_id, hold.state)

    return await db.transaction(work)


async def release(db: Database, hold_id: str, reason: str) -> Hold:
    """:meth:`Ledger.release <services.ledger.ledger.Ledger.release>`."""
    require_id("hold_id", hold_id)

    async def work(conn: AsyncConnection) -> Hold:
        hold = await _lock_hold(conn, hold_id)
        if hold.state is HoldState.HELD:
            resolved = await _resolve(conn, [_Resolution(hold, HoldState.RELEASED, reason=reason or None)])
            return resolved[0]
        if hold.state is HoldState.COMMITTED:
            raise HoldAlreadyResolved(hold_id, hold.state)
        return hold

    return await db.transaction(work)


async def expire_holds(db: Database, now: datetime | None, limit: int) -> int:
    """:meth:`Ledger.expire_holds <services.ledger.ledger.Ledger.expire_holds>`."""
    if limit < 1:
        raise InvalidAmount("limit", limit, "must be positive")

    async def work(conn: AsyncConnection) -> int:
        cur = await conn.execute(
            f"""SELECT {HOLD_COLUMNS} FROM ledger.holds
                WHERE state = 'held' AND expires_at <= COALESCE(%s::timestamptz, now())
                ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED""",
            (now, limit),
        )
        due = [hold_from_row(row) for row in await cur.fetchall()]
        if due:
            await _resolve(conn, [_Resolution(hold, HoldState.EXPIRED, reason="expired") for hold in due])
        return len(due)

    return await db.transaction(work)


def hold_from_row(row: Sequence[Any]) -> Hold:
    """The hold of a row of ``HOLD_COLUMNS``."""
    return Hold(
        hold_id=row[0],
        tenant_id=row[1],
        message_class=MessageClass(row[2]),
        emails=row[3],
        attachment_bytes=row[4],
        price=Price(per_email=row[5], per_attachment_mb=row[6]),
        amount=row[7],
        state=HoldState(row[8]),
        committed_amount=row[9],
        created_at=row[10],
        expires_at=row[11],
        resolved_at=row[12],
        resolution_request_id=row[13],
        resolution_reason=row[14],
    )


async def _lock_hold(conn: AsyncConnection, hold_id: str) -> Hold:
    cur = await conn.execute(f"SELECT {HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = %s FOR UPDATE", (hold_id,))
    row = await cur.fetchone()
    if row is None:
        raise HoldNotFound(hold_id)
    return hold_from_row(row)


async def _resolve(conn: AsyncConnection, resolutions: Sequence[_Resolution]) -> list[Hold]:
    """Move locked, held holds to their final state: journal entries, balance changes and the hold rows, in
    the caller's transaction. Returns the resolved holds in order."""
    balances = await lock_balances(conn, sorted({r.hold.tenant_id for r in resolutions}))
    entries: list[NewEntry] = []
    for resolution in resolutions:
        hold = resolution.hold
        balance = balances.get(hold.tenant_id)
        if balance is None:
            if hold.amount:
                raise AssertionError(f"hold {hold.hold_id} holds credits of a tenant without a balance")
            continue
        committed = resolution.committed_amount or 0
        returned = hold.amount - committed
        balance.held_delta -= hold.amount
        balance.spent_delta += committed
        balance.available_delta += returned
        if committed:
            entries.append(
                NewEntry(
                    hold.tenant_id, EntryKind.COMMIT, committed, hold.hold_id, resolution.request_id, balance.available
                )
            )
        if returned:
            balance.available += returned
            kind = {
                HoldState.COMMITTED: EntryKind.COMMIT_REFUND,
                HoldState.RELEASED: EntryKind.RELEASE,
                HoldState.EXPIRED: EntryKind.EXPIRE,
            }[resolution.state]
            entries.append(
                NewEntry(hold.tenant_id, kind, returned, hold.hold_id, resolution.request_id, balance.available)
            )
    cur = await conn.execute(
        """UPDATE ledger.holds AS h
           SET state = r.state, committed_amount = r.committed_amount, resolution_request_id = r.request_id,
               resolution_reason = r.reason, resolved_at = now()
           FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[])
                AS r(hold_id, state, committed_amount, request_id, reason)
           WHERE h.hold_id = r.hold_id AND h.state = 'held'
           RETURNING h.hold_id, h.resolved_at""",
        (
            [r.hold.hold_id for r in resolutions],
            [str(r.state) for r in resolutions],
            [r.committed_amount for r in resolutions],
            [r.request_id for r in resolutions],
            [r.reason for r in resolutions],
        ),
    )
    resolved_at = {row[0]: row[1] for row in await cur.fetchall()}
    if len(resolved_at) != len(resolutions):
        # The caller locked these holds as held; anything else means a bug, and the transaction must not commit.
        raise AssertionError("a hold to resolve was not held any more")
    await insert_entries(conn, entries)
    await update_balances(conn, balances)
    return [
        replace(
            r.hold,
            state=r.state,
            committed_amount=r.committed_amount if r.state is HoldState.COMMITTED else None,
            resolved_at=resolved_at[r.hold.hold_id],
            resolution_request_id=r.request_id,
            resolution_reason=r.reason,
        )
        for r in resolutions
    ]
