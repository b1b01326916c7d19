"""The journal: every movement of credits is one row of ``ledger.entries`` (append-only, each row balancing by
construction: ``amount`` leaves one account of a tenant and enters another). Writing entries, and reading a
tenant's entries a page at a time."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from services.ledger.database import Database
from services.ledger.errors import InvalidLedgerArgument, InvalidPageToken
from services.ledger.models import ENTRY_ACCOUNTS, Account, EntryKind, Transaction
from services.ledger.validation import require_id

_ENTRY_COLUMNS = (
    "entry_id, tenant_id, kind, debit_account, credit_account, amount, hold_id, request_id, available_after, created_at"
)


@dataclass(frozen=True)
class NewEntry:
    """A journal row to insert; its accounts follow from ``kind`` (``ENTRY_ACCOUNTS``)."""

    tenant_id: str
    kind: EntryKind
    amount: int
    hold_id: str | None
    request_id: str | None
    available_after: int


async def insert_entries(conn: AsyncConnection, entries: Sequence[NewEntry]) -> None:
    """Append ``entries`` to the journal, in the caller's transaction."""
    if not entries:
        return
    await conn.execute(
        """INSERT INTO ledger.entries (tenant_id, kind, debit_account, credit_account, amount, hold_id, request_id,
                                       available_after)
           SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[],
                                %b::text[], %b::bigint[])""",
        (
            [e.tenant_id for e in entries],
            [str(e.kind) for e in entries],
            [str(ENTRY_ACCOUNTS[e.kind][0]) for e in entries],
            [str(ENTRY_ACCOUNTS[e.kind][1]) for e in entries],
            [e.amount for e in entries],
            [e.hold_id for e in entries],
            [e.request_id for e in entries],
            [e.available_after for e in entries],
        ),
    )


async def list_transactions(
    db: Database, tenant_id: str, page_size: int, page_token: str, *, default_page_size: int,
    max_page_size: int,
) -> tuple[list[Transaction], str]:
    """:meth:`Ledger.list_transactions <services.ledger.ledger.Ledger.list_transactions>`, with the page sizes of
    the ledger's options."""
    require_id("tenant_id", tenant_id)
    if page_size < 0:
        raise InvalidLedgerArgument("page_size", f"must not be negative (got {page_size})")
    size = min(page_size or default_page_size, max_page_size)
    before = _decode_page_token(page_token, tenant_id) if page_token else None
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            f"""SELECT {_ENTRY_COLUMNS} FROM ledger.entries
                WHERE tenant_id = %s AND (%s::bigint IS NULL OR entry_id < %s::bigint)
                ORDER BY entry_id DESC LIMIT %s""",
            (tenant_id, before, before, size + 1),
        )
        rows = await cur.fetchall()
    page = [_transaction_from_row(row) for row in rows[:size]]
    next_token = _encode_page_token(tenant_id, page[-1].entry_id) if len(rows) > size else ""
    return page, next_token


def _transaction_from_row(row: Sequence[Any]) -> Transaction:
    return Transaction(
        entry_id=row[0],
        tenant_id=row[1],
        kind=EntryKind(row[2]),
        debit_account=Account(row[3]),
        credit_account=Account(row[4]),
        amount=row[5],
        hold_id=row[6],
        request_id=row[7],
        available_after=row[8],
        created_at=row[9],
    )


def _encode_page_token(tenant_id: str, last_entry_id: int) -> str:
    raw = json.dumps({"t": tenant_id, "before": last_entry_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, tenant_id: str) -> int:
    """The entry id a page token continues before; the token must come from a listing of the same tenant."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        before = data["before"]
        token_tenant = data["t"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidPageToken() from None
    if token_tenant != tenant_id or not isinstance(before, int) or isinstance(before, bool):
        raise InvalidPageToken()
    return before
