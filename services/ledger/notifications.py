"""The notification outbox, ``ledger.notifications``: rows written in the transaction that caused them (a low
balance crossed, a send that could not be billed), handed to the publisher
(:mod:`services.ledger.notification_publisher`) and marked once published."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from services.ledger.database import Database
from services.ledger.errors import InvalidAmount
from services.ledger.models import Notification, NotificationKind


@dataclass(frozen=True)
class NewNotification:
    """An outbox row to insert."""

    tenant_id: str
    kind: NotificationKind
    payload: dict[str, Any]


async def insert_notifications(conn: AsyncConnection, notifications: Sequence[NewNotification]) -> None:
    """Write ``notifications`` to the outbox, in the caller's transaction."""
    if not notifications:
        return
    await conn.execute(
        """INSERT INTO ledger.notifications (tenant_id, kind, payload)
           SELECT * FROM unnest(%b::text[], %b::text[], %s::jsonb[])""",
        (
            [n.tenant_id for n in notifications],
            [str(n.kind) for n in notifications],
            [Jsonb(n.payload) for n in notifications],
        ),
    )


def low_balance(tenant_id: str, threshold: int, available: int) -> NewNotification:
    """The notification that the tenant's available credits fell below its threshold."""
    return NewNotification(
        tenant_id,
        NotificationKind.LOW_BALANCE_CROSSED,
        {"tenant_id": tenant_id, "threshold": threshold, "available": available},
    )


async def notify_low_balance_crossings(conn: AsyncConnection, tenants: Sequence[str]) -> None:
    """Write a notification for each armed tenant whose available credits are now below its threshold, and
    disarm it (a top-up above the threshold re-arms it), so each crossing notifies once. Needs no result, so it
    pipelines with the writes before it."""
    if not tenants:
        return
    await conn.execute(
        """WITH crossed AS (
               UPDATE ledger.balances SET low_balance_armed = false
               WHERE tenant_id = ANY(%b) AND low_balance_armed AND available < low_balance_threshold
               RETURNING tenant_id, low_balance_threshold, available)
           INSERT INTO ledger.notifications (tenant_id, kind, payload)
           SELECT tenant_id, %b,
                  jsonb_build_object('tenant_id', tenant_id, 'threshold', low_balance_threshold,
                                     'available', available)
           FROM crossed""",
        (list(tenants), NotificationKind.LOW_BALANCE_CROSSED.value),
    )


async def pending_notifications(db: Database, limit: int) -> list[Notification]:
    """:meth:`Ledger.pending_notifications <services.ledger.ledger.Ledger.pending_notifications>`."""
    if limit < 1:
        raise InvalidAmount("limit", limit, "must be positive")
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            """SELECT notification_id, tenant_id, kind, payload, created_at FROM ledger.notifications
               WHERE published_at IS NULL ORDER BY notification_id LIMIT %s""",
            (limit,),
        )
        rows = await cur.fetchall()
    return [Notification(row[0], row[1], NotificationKind(row[2]), row[3], row[4]) for row in rows]


async def mark_notifications_published(db: Database, notification_ids: Iterable[int]) -> None:
    """:meth:`Ledger.mark_notifications_published <services.ledger.ledger.Ledger.mark_notifications_published>`."""
    ids = list(notification_ids)
    if not ids:
        return
    async with db.pool.connection() as conn:
        await conn.execute(
            "UPDATE ledger.notifications SET published_at = now() "
            "WHERE notification_id = ANY(%b) AND published_at IS NULL",
            (ids,),
        )
