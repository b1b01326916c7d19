"""The price book, ``ledger.price_books``: the platform's default prices (the row of ``DEFAULT_PRICE_BOOK``) and
each tenant's overrides, reading the prices in effect for a tenant, and quoting a hold. The arithmetic of pricing a
hold is :mod:`services.ledger.pricing`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
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


async def set_price_overrides(db: Database, tenant_id: str, overrides: PriceOverrides,
                              fields: Collection[str] | None = None) -> PriceBook:
    """:meth:`Ledger.set_price_overrides <services.ledger.ledger.Ledger.set_price_overrides>`."""
    require_id("tenant_id", tenant_id)
    if tenant_id == DEFAULT_PRICE_BOOK:
        raise InvalidLedgerArgument("tenant_id", "use set_default_prices for the platform defaults")
    written = [name for name in _PRICE_FIELDS if fields is None or name in fields]
    values = tuple(getattr(overrides, name) for name in written)
    for name, value in zip(written, values, strict=True):
        if value is not None:
            require_price(name, value)
    if written:
        async with db.pool.connection() as conn, conn.transaction():
            # Only the prices written change; a row left with no override at all is removed (the defaults apply).
            await conn.execute(
                f"""INSERT INTO ledger.price_books AS p (tenant_id, {', '.join(written)})
                    VALUES (%s, {', '.join(['%s'] * len(written))})
                    ON CONFLICT (tenant_id) DO UPDATE SET
                        {', '.join(f'{name} = excluded.{name}' for name in written)}, updated_at = now()""",
                (tenant_id, *values),
            )
            await conn.execute(
                f"""DELETE FROM ledger.price_books
                    WHERE tenant_id = %s AND {' AND '.join(f'{name} IS NULL' for name in _PRICE_FIELDS)}""",
                (tenant_id,),
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
