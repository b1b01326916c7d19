"""The journal: append-only, listed newest first in pages with opaque tokens (AIP-158)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from services.ledger.errors import InvalidLedgerArgument, InvalidPageToken
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.models import Account, EntryKind, MessageClass


async def test_entries_record_each_movement_with_the_balance_after_it(ledger: Ledger) -> None:
    await ledger.top_up("acme", 20, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP)
    await ledger.commit("m1", amount=2)

    entries, next_token = await ledger.list_transactions("acme")

    assert [(e.kind, e.debit_account, e.credit_account, e.amount, e.available_after) for e in entries] == [
        (EntryKind.COMMIT_REFUND, Account.HELD, Account.AVAILABLE, 3, 18),
        (EntryKind.COMMIT, Account.HELD, Account.SPENT, 2, 15),
        (EntryKind.RESERVE, Account.AVAILABLE, Account.HELD, 5, 15),
        (EntryKind.TOP_UP, Account.ISSUED, Account.AVAILABLE, 20, 20),
    ]
    assert entries[-1].request_id == "t1"
    assert next_token == ""


async def test_pages_list_every_entry_once_newest_first(ledger: Ledger) -> None:
    await ledger.top_up("acme", 1000, "t1")
    await ledger.top_up("other", 1000, "t1")
    for i in range(11):
        await ledger.reserve("acme", f"m{i}", MessageClass.BULK)
        await ledger.reserve("other", f"o{i}", MessageClass.BULK)

    seen: list[int] = []
    token = ""
    for _ in range(10):  # 12 entries at 5 a page: 3 pages
        page, token = await ledger.list_transactions("acme", page_size=5, page_token=token)
        assert len(page) <= 5
        seen += [e.entry_id for e in page]
        if not token:
            break

    assert len(seen) == 12
    assert seen == sorted(seen, reverse=True)
    assert token == ""


async def test_a_page_token_of_another_tenant_is_refused(ledger: Ledger) -> None:
    for i in range(3):
        await ledger.top_up("acme", 10, f"t{i}")
    _, token = await ledger.list_transactions("acme", page_size=1)

    with pytest.raises(InvalidPageToken):
        await ledger.list_transactions("other", page_size=1, page_token=token)
    with pytest.raises(InvalidPageToken):
        await ledger.list_transactions("acme", page_token="not-a-token")


async def test_page_size_is_defaulted_and_capped(pool: AsyncConnectionPool) -> None:
    ledger = Ledger(pool, LedgerOptions(default_page_size=2, max_page_size=3))
    try:
        for i in range(5):
            await ledger.top_up("acme", 10, f"t{i}")

        assert len((await ledger.list_transactions("acme"))[0]) == 2
        assert len((await ledger.list_transactions("acme", page_size=100))[0]) == 3
        with pytest.raises(InvalidLedgerArgument):
            await ledger.list_transactions("acme", page_size=-1)
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    "statement",
    ["UPDATE ledger.entries SET amount = amount + 1", "DELETE FROM ledger.entries", "TRUNCATE ledger.entries"],
)
async def test_the_journal_is_append_only(ledger: Ledger, pool: AsyncConnectionPool, statement: str) -> None:
    await ledger.top_up("acme", 10, "t1")

    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.RestrictViolation):
            await conn.execute(statement)


async def test_the_database_refuses_an_overdrawn_balance(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 10, "t1")

    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute("UPDATE ledger.balances SET available = available - 11 WHERE tenant_id = 'acme'")
