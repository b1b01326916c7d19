"""Reserves for a tenant whose balance row the ledger has seen go out in one round trip, priced by the server; they
must answer and book exactly what the reading path would, and hand anything unusual back to it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from services.ledger.errors import IdempotencyMismatch, InsufficientCredits
from services.ledger.ledger import Ledger
from services.ledger.models import Balance, Hold, HoldState, MessageClass, PriceOverrides, ReserveRequest
from services.ledger.pricing import hold_amount, unit_price
from services.ledger.reserves import ONE_ROUND_TRIP_MAX_BATCH
from tests.ledger.books import check_books

MIB = 1024 * 1024


@pytest.fixture
def reading_path(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many batches went the reading way (each entry: the batch's size)."""
    calls: list[int] = []
    reserves = ledger._reserves
    original = reserves._reserve_in_transaction

    async def counted(conn: Any, requests: Any, *, locked: bool) -> Any:
        calls.append(len(requests))
        return await original(conn, requests, locked=locked)

    monkeypatch.setattr(reserves, "_reserve_in_transaction", counted)
    return calls


async def _known_tenant(ledger: Ledger, tenant_id: str, credits: int) -> None:
    """A tenant with credits whose balance row this ledger has read once (its first reserve takes the reading path)."""
    await ledger.top_up(tenant_id, credits, "start")
    await ledger.reserve(tenant_id, f"{tenant_id}-first", MessageClass.BULK)


async def test_a_known_tenants_reserves_skip_the_reading_path_and_keep_the_books(
        ledger: Ledger, pool: AsyncConnectionPool, reading_path: list[int]) -> None:
    await _known_tenant(ledger, "acme", 1_000)
    reading_path.clear()

    holds = await asyncio.gather(*(ledger.reserve("acme", f"m{i}", MessageClass.TRANSACTIONAL) for i in range(20)))

    assert reading_path == []
    assert {(h.amount, h.state, h.price.per_email) for h in holds} == {(3, HoldState.HELD, 3)}
    assert [await ledger.get_hold(h.hold_id) for h in holds] == list(holds)  # what is stored is what was answered
    assert await ledger.get_balance("acme") == Balance("acme", available=1_000 - 1 - 60, held=61, spent=0)
    await check_books(pool)


@pytest.mark.parametrize("attachment_bytes", [0, 1, MIB, MIB + 1, 150 * MIB])
async def test_the_server_prices_a_hold_as_the_price_book_says(
        ledger: Ledger, reading_path: list[int], attachment_bytes: int) -> None:
    await _known_tenant(ledger, "acme", 10**9)
    book = await ledger.set_price_overrides("acme", PriceOverrides(otp_per_email=9, per_attachment_mb=4))
    reading_path.clear()

    hold = await ledger.reserve("acme", "m1", MessageClass.OTP, emails=3, attachment_bytes=attachment_bytes)

    assert reading_path == []
    price = unit_price(book, MessageClass.OTP)
    assert (hold.price, hold.amount) == (price, hold_amount(price, 3, attachment_bytes))


async def test_a_retried_hold_id_is_answered_with_the_first_hold(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await _known_tenant(ledger, "acme", 100)
    first = await ledger.reserve("acme", "m1", MessageClass.TRANSACTIONAL)

    again = await ledger.reserve("acme", "m1", MessageClass.TRANSACTIONAL)
    with pytest.raises(IdempotencyMismatch):
        await ledger.reserve("acme", "m1", MessageClass.BULK)

    assert again == first
    assert (await ledger.get_balance("acme")).held == 1 + 3
    await check_books(pool)


async def test_a_batch_that_does_not_fit_refuses_only_the_holds_beyond_the_credits(
        ledger: Ledger, pool: AsyncConnectionPool, reading_path: list[int]) -> None:
    await _known_tenant(ledger, "acme", 11)  # 10 left after the first bulk hold
    reading_path.clear()

    results = await ledger.reserve_many(
        [ReserveRequest("acme", f"m{i}", MessageClass.TRANSACTIONAL, ttl_s=60.0) for i in range(5)])

    assert [type(r) for r in results] == [Hold, Hold, Hold, InsufficientCredits, InsufficientCredits]
    assert reading_path == [5]  # tried in one round trip, rolled back, decided against the locked rows
    assert await ledger.get_balance("acme") == Balance("acme", available=1, held=10, spent=0)
    await check_books(pool)


async def test_a_tenant_the_ledger_has_not_seen_takes_the_reading_path(
        ledger: Ledger, pool: AsyncConnectionPool, reading_path: list[int]) -> None:
    await ledger.top_up("acme", 10, "start")

    refused = await ledger.reserve_many([ReserveRequest("nobody", "m0", MessageClass.BULK, ttl_s=60.0)])
    held = await ledger.reserve("acme", "m1", MessageClass.BULK)

    assert isinstance(refused[0], InsufficientCredits)  # no balance row: nothing to hold from
    assert held.amount == 1
    assert reading_path == [1, 1, 1]  # nobody's: optimistic, then against the locked rows; then acme's
    await check_books(pool)


async def test_a_batch_larger_than_the_one_round_trip_limit_takes_the_reading_path(
        ledger: Ledger, pool: AsyncConnectionPool, reading_path: list[int]) -> None:
    await _known_tenant(ledger, "acme", 10**6)
    reading_path.clear()
    size = ONE_ROUND_TRIP_MAX_BATCH + 1

    holds = await ledger.reserve_many(
        [ReserveRequest("acme", f"m{i}", MessageClass.BULK, ttl_s=60.0) for i in range(size)])

    assert reading_path == [size]
    assert all(isinstance(h, Hold) for h in holds)
    await check_books(pool)
