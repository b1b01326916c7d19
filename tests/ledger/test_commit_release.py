"""Commit and release: a hold resolves once; a partial commit returns the unused part."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from services.ledger.errors import HoldAlreadyResolved, HoldNotFound, IdempotencyMismatch, InvalidAmount
from services.ledger.ledger import Ledger
from services.ledger.models import Balance, EntryKind, HoldState, MessageClass
from tests.ledger.books import check_books


@pytest.fixture
async def funded(ledger: Ledger) -> Ledger:
    """A ledger where tenant acme has 100 credits and a 10-credit hold ``m1`` (2 OTP emails)."""
    await ledger.top_up("acme", 100, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP, emails=2)
    return ledger


async def test_commit_spends_the_whole_hold(funded: Ledger, pool: AsyncConnectionPool) -> None:
    hold = await funded.commit("m1")

    assert (hold.state, hold.committed_amount, hold.returned_amount) == (HoldState.COMMITTED, 10, 0)
    assert hold.resolved_at is not None
    assert await funded.get_balance("acme") == Balance("acme", available=90, held=0, spent=10)
    await check_books(pool)


async def test_partial_commit_returns_the_unused_part(funded: Ledger, pool: AsyncConnectionPool) -> None:
    hold = await funded.commit("m1", amount=4, request_id="c1")

    assert (hold.committed_amount, hold.returned_amount) == (4, 6)
    assert await funded.get_balance("acme") == Balance("acme", available=96, held=0, spent=4)
    entries, _ = await funded.list_transactions("acme")
    assert [(e.kind, e.amount) for e in entries[:2]] == [(EntryKind.COMMIT_REFUND, 6), (EntryKind.COMMIT, 4)]
    await check_books(pool)


async def test_commit_of_zero_returns_everything(funded: Ledger) -> None:
    hold = await funded.commit("m1", amount=0)

    assert (hold.state, hold.committed_amount) == (HoldState.COMMITTED, 0)
    assert await funded.get_balance("acme") == Balance("acme", available=100, held=0, spent=0)


async def test_commit_of_more_than_the_hold_is_refused(funded: Ledger) -> None:
    with pytest.raises(InvalidAmount):
        await funded.commit("m1", amount=11)
    with pytest.raises(InvalidAmount):
        await funded.commit("m1", amount=-1)

    assert (await funded.get_hold("m1")).state is HoldState.HELD


async def test_repeating_a_commit_returns_the_first_result(funded: Ledger, pool: AsyncConnectionPool) -> None:
    first = await funded.commit("m1", amount=7, request_id="c1")

    assert await funded.commit("m1", amount=7, request_id="c1") == first
    assert await funded.commit("m1", amount=7) == first
    assert await funded.get_balance("acme") == Balance("acme", available=93, held=0, spent=7)
    await check_books(pool)


async def test_the_same_commit_request_id_with_another_amount_is_an_idempotency_mismatch(funded: Ledger) -> None:
    await funded.commit("m1", amount=7, request_id="c1")

    with pytest.raises(IdempotencyMismatch):
        await funded.commit("m1", amount=8, request_id="c1")


async def test_a_second_commit_with_another_request_id_is_refused(funded: Ledger) -> None:
    await funded.commit("m1", request_id="c1")

    with pytest.raises(HoldAlreadyResolved) as refused:
        await funded.commit("m1", request_id="c2")

    assert refused.value.metadata == {"hold_id": "m1", "state": "committed"}
    assert (await funded.get_balance("acme")).spent == 10


async def test_release_returns_the_hold_to_available(funded: Ledger, pool: AsyncConnectionPool) -> None:
    hold = await funded.release("m1", reason="cancelled")

    assert (hold.state, hold.resolution_reason, hold.returned_amount) == (HoldState.RELEASED, "cancelled", 10)
    assert await funded.get_balance("acme") == Balance("acme", available=100, held=0, spent=0)
    await check_books(pool)


async def test_releasing_twice_returns_the_released_hold(funded: Ledger) -> None:
    first = await funded.release("m1")

    assert await funded.release("m1") == first
    assert (await funded.get_balance("acme")).available == 100


async def test_a_committed_hold_cannot_be_released(funded: Ledger) -> None:
    await funded.commit("m1")

    with pytest.raises(HoldAlreadyResolved):
        await funded.release("m1")

    assert await funded.get_balance("acme") == Balance("acme", available=90, held=0, spent=10)


async def test_a_released_hold_cannot_be_committed(funded: Ledger) -> None:
    await funded.release("m1")

    with pytest.raises(HoldAlreadyResolved):
        await funded.commit("m1")

    assert await funded.get_balance("acme") == Balance("acme", available=100, held=0, spent=0)


async def test_resolving_an_unknown_hold_is_hold_not_found(ledger: Ledger) -> None:
    with pytest.raises(HoldNotFound) as missing:
        await ledger.commit("nope")
    with pytest.raises(HoldNotFound):
        await ledger.release("nope")

    assert missing.value.reason == "HOLD_NOT_FOUND"
