"""The price book, ``ledger.price_books``: the platform's default prices (the row of ``DEFAULT_PRICE_BOOK``) and
each tenant's overrides, reading the prices in effect for a tenant, and quoting a hold. The arithmetic of pricing a
hold is :mod:`services.ledger.pricing`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection

from services.ledger.database import Database
from services.ledger.errors import InvalidAmount, InvalidLedgerArgument
from services.ledger.models import DEFAULT_PRICE_BOOK, MessageClass, PriceBook, PriceOverrides
from services.ledger.pricing import hold_amount, unit_price
from services.ledger.validation import (
    MAX_ATTACHMENT_BYTES,
    MAX_EMAILS_PER_HOLD,
    parse_message_class,
    require_id,
    require_positive,
    require_price,
)

_PRICE_FIELDS = ("otp_per_email", "transactional_per_email", "bulk_per_email", "per_attachment_mb")


async def get_price_book(db: Database, tenant_id: str) -> PriceBook:
    """:meth:`Ledger.get_price_book <services.ledger.ledger.Ledger.get_price_book>`."""
    require_id("tenant_id", tenant_id)
    async with db.pool.connection() as conn:
        return (await price_books(conn, [tenant_id]))[0][tenant_id]


async def set_default_prices(db: Database, book: PriceBook) -> PriceBook:
    """:meth:`Ledger.set_default_prices <services.ledger.ledger.Ledger.set_default_prices>`."""
    for name in _PRICE_FIELDS:
        require_price(name, getattr(book, name))
    async with db.pool.connection() as conn:
        await conn.execute(
            """UPDATE ledger.price_books SET otp_per_email = %s, transactional_per_email = %s,
                   bulk_per_email = %s, per_attachment_mb = %s, updated_at = now()
               WHERE tenant_id = %s""",
            (
                book.otp_per_email,
                book.transactional_per_email,
                book.bulk_per_email,
                book.per_attachment_mb,
                DEFAULT_PRICE_BOOK,
            ),
        )
    return await get_price_book(db, DEFAULT_PRICE_BOOK)


async def set_price_overrides(db: Database, tenant_id: str, overrides: PriceOverrides) -> PriceBook:
    """:meth:`Ledger.set_price_overrides <services.ledger.ledger.Ledger.set_price_overrides>`."""
    require_id("tenant_id", tenant_id)
    if tenant_id == DEFAULT_PRICE_BOOK:
        raise InvalidLedgerArgument("tenant_id", "use set_default_prices for the platform defaults")
    values = (
        overrides.otp_per_email,
        overrides.transactional_per_email,
        overrides.bulk_per_email,
        overrides.per_attachment_mb,
    )
    for name, value in zip(_PRICE_FIELDS, values, strict=True):
        if value is not None:
            require_price(name, value)
    async with db.pool.connection() as conn:
        if all(value is None for value in values):
            await conn.execute("DELETE FROM ledger.price_books WHERE tenant_id = %s", (tenant_id,))
        else:
            await conn.execute(
                """INSERT INTO ledger.price_books AS p
                       (tenant_id, otp_per_email, transactional_per_email, bulk_per_email, per_attachment_mb)
                   VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (tenant_id) DO UPDATE SET
                       otp_per_email = excluded.otp_per_email,
                       transactional_per_email = excluded.transactional_per_email,
                       bulk_per_email = excluded.bulk_per_email,
                       per_attachment_mb = excluded.per_attachment_mb,
                       updated_at = now()""",
                (tenant_id, *values),
            )
    return await get_price_book(db, tenant_id)


async def quote(
    db: Database, tenant_id: str, message_class: MessageClass | str, emails: int, attachment_bytes: int
) -> int:
    """:meth:`Ledger.quote <services.ledger.ledger.Ledger.quote>`."""
    require_positive("emails", emails, MAX_EMAILS_PER_HOLD)
    if not 0 <= attachment_bytes <= MAX_ATTACHMENT_BYTES:
        raise InvalidAmount("attachment_bytes", attachment_bytes, f"must be in [0, {MAX_ATTACHMENT_BYTES}]")
    book = await get_price_book(db, tenant_id)
    return hold_amount(unit_price(book, parse_message_class(message_class)), emails, attachment_bytes)


async def price_books(conn: AsyncConnection, tenants: Sequence[str]) -> tuple[dict[str, PriceBook], datetime]:
    """The effective price book of each tenant, and the transaction's ``now()`` (when its holds are made)."""
    return await fetch_price_books(await query_price_books(conn, tenants))


async def query_price_books(conn: AsyncConnection, tenants: Sequence[str]) -> psycopg.AsyncCursor[Any]:
    """Send the query of :func:`price_books` (in pipeline mode it goes out before its result is awaited)."""
    return await conn.execute(
        """SELECT t.tenant_id,
                  COALESCE(o.otp_per_email, d.otp_per_email),
                  COALESCE(o.transactional_per_email, d.transactional_per_email),
                  COALESCE(o.bulk_per_email, d.bulk_per_email),
                  COALESCE(o.per_attachment_mb, d.per_attachment_mb),
                  now()
           FROM unnest(%b::text[]) AS t(tenant_id)
           JOIN ledger.price_books AS d ON d.tenant_id = '-'
           LEFT JOIN ledger.price_books AS o ON o.tenant_id = t.tenant_id""",
        (list(tenants),),
    )


async def fetch_price_books(cursor: psycopg.AsyncCursor[Any]) -> tuple[dict[str, PriceBook], datetime]:
    """The result of a :func:`query_price_books`: each tenant's book, and the transaction's ``now()``."""
    rows = await cursor.fetchall()
    return {row[0]: PriceBook(*row[:5]) for row in rows}, rows[0][5]
