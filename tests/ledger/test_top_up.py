"""Top-ups: positive amounts only, idempotent per tenant and request id."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool

from services.ledger.errors import IdempotencyMismatch, InvalidAmount, InvalidLedgerArgument
from services.ledger.ledger import Ledger
from services.ledger.models import Balance
from tests.ledger.books import check_books


async def test_top_up_adds_to_available(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 30, "t1")

    assert await ledger.top_up("acme", 12, "t2") == Balance("acme", available=42, held=0, spent=0)
    books = await check_books(pool)
    assert books["acme"].derived["issued"] == -42


async def test_repeating_a_top_up_adds_once(ledger: Ledger) -> None:
    results = await asyncio.gather(*(ledger.top_up("acme", 30, "t1") for _ in range(5)))

    assert set(results) == {Balance("acme", available=30, held=0, spent=0)}
    assert (await ledger.get_balance("acme")).available == 30


async def test_one_request_id_may_top_up_two_tenants(ledger: Ledger) -> None:
    await ledger.top_up("acme", 30, "t1")
    await ledger.top_up("beta", 20, "t1")

    assert (await ledger.get_balance("beta")).available == 20


async def test_reusing_a_top_up_request_id_with_another_amount_is_an_idempotency_mismatch(ledger: Ledger) -> None:
    await ledger.top_up("acme", 30, "t1")

    with pytest.raises(IdempotencyMismatch) as refused:
        await ledger.top_up("acme", 31, "t1")

    assert refused.value.metadata["key"] == "t1"
    assert (await ledger.get_balance("acme")).available == 30


@pytest.mark.parametrize("amount", [0, -5])
async def test_top_up_refuses_zero_and_negative_amounts(ledger: Ledger, amount: int) -> None:
    with pytest.raises(InvalidAmount) as refused:
        await ledger.top_up("acme", amount, "t1")

    assert refused.value.field_violations[0].field == "amount"
    assert (await ledger.get_balance("acme")).available == 0


async def test_top_up_requires_a_request_id(ledger: Ledger) -> None:
    with pytest.raises(InvalidLedgerArgument):
        await ledger.top_up("acme", 5, "")


async def test_an_unknown_tenant_has_a_zero_balance(ledger: Ledger) -> None:
    assert await ledger.get_balance("nobody") == Balance("nobody", 0, 0, 0)
