"""Reserve: holds are priced, never overdraw, and are idempotent on the hold id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.common.db import create_pool
from services.ledger.database import Database
from services.ledger.errors import IdempotencyMismatch, InsufficientCredits, InvalidAmount, InvalidLedgerArgument
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.models import Balance, Hold, HoldState, MessageClass, PriceOverrides, ReserveRequest
from tests.ledger.books import check_books


async def test_reserve_moves_the_price_from_available_to_held(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 100, "t1")

    hold = await ledger.reserve("acme", "m1", MessageClass.TRANSACTIONAL)

    assert (hold.amount, hold.state, hold.price.per_email) == (3, HoldState.HELD, 3)
    assert hold.expires_at > hold.created_at
    assert await ledger.get_balance("acme") == Balance("acme", available=97, held=3, spent=0)
    await check_books(pool)


async def test_hundred_parallel_reserves_against_fifty_credits_exactly_fifty_succeed(
    ledger: Ledger, pool: AsyncConnectionPool
) -> None:
    await ledger.top_up("acme", 50, "t1")

    results = await asyncio.gather(
        *(ledger.reserve("acme", f"m{i}", MessageClass.BULK) for i in range(100)), return_exceptions=True
    )

    assert sum(isinstance(r, Hold) for r in results) == 50
    assert sum(isinstance(r, InsufficientCredits) for r in results) == 50
    assert await ledger.get_balance("acme") == Balance("acme", available=0, held=50, spent=0)
    await check_books(pool)


async def test_two_replicas_reserving_on_one_tenant_never_overdraw(ledger_dsn: str) -> None:
    pools = [await create_pool(ledger_dsn, min_size=1, max_size=4) for _ in range(2)]
    replicas = [Ledger(p) for p in pools]
    try:
        await replicas[0].top_up("acme", 300, "t1")

        results = await asyncio.gather(
            *(replicas[i % 2].reserve("acme", f"m{i}", MessageClass.BULK) for i in range(500)),
            return_exceptions=True,
        )

        assert sum(isinstance(r, Hold) for r in results) == 300
        assert all(isinstance(r, Hold | InsufficientCredits) for r in results)
        assert await replicas[1].get_balance("acme") == Balance("acme", available=0, held=300, spent=0)
        await check_books(pools[0])
    finally:
        for replica in replicas:
            await replica.close()
        for p in pools:
            await p.close()


async def test_two_replicas_making_the_same_holds_at_once_make_each_hold_once(ledger_dsn: str) -> None:
    pools = [await create_pool(ledger_dsn, min_size=1, max_size=4) for _ in range(2)]
    replicas = [Ledger(p) for p in pools]
    try:
        await replicas[0].top_up("acme", 1000, "t1")

        first, second = await asyncio.gather(
            *(
                replica.reserve_many([ReserveRequest("acme", f"m{i}", MessageClass.BULK) for i in range(200)])
                for replica in replicas
            )
        )

        assert first == second
        assert all(isinstance(hold, Hold) for hold in first)
        assert await replicas[1].get_balance("acme") == Balance("acme", available=800, held=200, spent=0)
        await check_books(pools[0])
    finally:
        for replica in replicas:
            await replica.close()
        for p in pools:
            await p.close()


async def test_insufficient_credits_reports_the_shortfall(ledger: Ledger) -> None:
    await ledger.top_up("acme", 4, "t1")

    with pytest.raises(InsufficientCredits) as refused:
        await ledger.reserve("acme", "m1", MessageClass.OTP, emails=2)

    assert refused.value.reason == "INSUFFICIENT_CREDITS"
    assert refused.value.metadata == {"tenant_id": "acme", "required": "10", "available": "4", "shortfall": "6"}
    assert refused.value.shortfall == 6
    assert await ledger.get_balance("acme") == Balance("acme", available=4, held=0, spent=0)


async def test_a_tenant_never_topped_up_cannot_reserve(ledger: Ledger) -> None:
    with pytest.raises(InsufficientCredits) as refused:
        await ledger.reserve("nobody", "m1", MessageClass.BULK)

    assert refused.value.shortfall == 1


async def test_repeating_a_reserve_returns_the_same_hold_and_holds_once(
    ledger: Ledger, pool: AsyncConnectionPool
) -> None:
    await ledger.top_up("acme", 10, "t1")

    first = await ledger.reserve("acme", "m1", MessageClass.OTP)
    again = await ledger.reserve("acme", "m1", MessageClass.OTP)
    concurrent = await asyncio.gather(*(ledger.reserve("acme", "m2", MessageClass.OTP) for _ in range(5)))

    assert again == first
    assert len(set(concurrent)) == 1
    assert await ledger.get_balance("acme") == Balance("acme", available=0, held=10, spent=0)
    await check_books(pool)


async def test_repeating_a_reserve_after_its_hold_was_committed_returns_the_committed_hold(ledger: Ledger) -> None:
    await ledger.top_up("acme", 10, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP)
    committed = await ledger.commit("m1")

    again = await ledger.reserve("acme", "m1", MessageClass.OTP)

    assert again == committed
    assert await ledger.get_balance("acme") == Balance("acme", available=5, held=0, spent=5)


async def test_reusing_a_hold_id_for_a_different_reserve_is_an_idempotency_mismatch(ledger: Ledger) -> None:
    await ledger.top_up("acme", 100, "t1")
    await ledger.top_up("other", 100, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP)

    for tenant, message_class, emails in (("acme", "bulk", 1), ("acme", "otp", 2), ("other", "otp", 1)):
        with pytest.raises(IdempotencyMismatch) as refused:
            await ledger.reserve(tenant, "m1", message_class, emails=emails)
        assert refused.value.reason == "IDEMPOTENCY_MISMATCH"

    assert (await ledger.get_balance("acme")).held == 5
    assert (await ledger.get_balance("other")).held == 0


async def test_reserve_many_gives_each_request_its_own_result(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 6, "t1")
    await ledger.top_up("beta", 100, "t1")

    results = await ledger.reserve_many(
        [
            ReserveRequest("acme", "a1", MessageClass.OTP),
            ReserveRequest("acme", "a2", MessageClass.OTP),  # 5 + 5 > 6
            ReserveRequest("beta", "b1", MessageClass.BULK, emails=0),
            ReserveRequest("beta", "b2", MessageClass.BULK, emails=40),
            ReserveRequest("acme", "a3", MessageClass.BULK),
        ]
    )

    assert [type(r) for r in results] == [Hold, InsufficientCredits, InvalidAmount, Hold, Hold]
    assert await ledger.get_balance("acme") == Balance("acme", available=0, held=6, spent=0)
    assert await ledger.get_balance("beta") == Balance("beta", available=60, held=40, spent=0)
    await check_books(pool)


async def test_reserve_many_with_one_hold_id_twice_holds_once(ledger: Ledger) -> None:
    await ledger.top_up("acme", 100, "t1")

    same, twice, different = await ledger.reserve_many(
        [
            ReserveRequest("acme", "m1", MessageClass.OTP),
            ReserveRequest("acme", "m1", MessageClass.OTP),
            ReserveRequest("acme", "m1", MessageClass.BULK),
        ]
    )

    assert same == twice
    assert isinstance(different, IdempotencyMismatch)
    assert (await ledger.get_balance("acme")).held == 5


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("emails", {"emails": 0}),
        ("emails", {"emails": -3}),
        ("attachment_bytes", {"attachment_bytes": -1}),
    ],
)
async def test_reserve_refuses_negative_or_zero_amounts(ledger: Ledger, field: str, kwargs: dict[str, Any]) -> None:
    await ledger.top_up("acme", 100, "t1")

    with pytest.raises(InvalidAmount) as refused:
        await ledger.reserve("acme", "m1", MessageClass.BULK, **kwargs)

    assert refused.value.reason == "INVALID_AMOUNT"
    assert refused.value.metadata["field"] == field
    assert (await ledger.get_balance("acme")).held == 0


async def test_reserve_refuses_an_unknown_class_empty_ids_and_a_bad_ttl(ledger: Ledger) -> None:
    for tenant_id, hold_id, message_class, ttl_s in (
        ("acme", "m1", "carrier-pigeon", None),
        ("", "m1", "bulk", None),
        ("acme", "", "bulk", None),
        ("acme", "m1", "bulk", 0.0),
    ):
        with pytest.raises(InvalidLedgerArgument):
            await ledger.reserve(tenant_id, hold_id, message_class, ttl_s=ttl_s)


async def test_a_reserve_larger_than_any_balance_is_refused_without_failing_its_batch(ledger: Ledger) -> None:
    await ledger.set_price_overrides("acme", PriceOverrides(bulk_per_email=10**9))
    await ledger.top_up("acme", 100, "t1")

    huge, small = await ledger.reserve_many(
        [
            ReserveRequest("acme", "m1", MessageClass.BULK, emails=10_000_000),  # 10^16 credits
            ReserveRequest("acme", "m2", MessageClass.OTP),
        ]
    )

    assert isinstance(huge, InsufficientCredits) and huge.required == 10**16
    assert isinstance(small, Hold) and small.amount == 5


async def test_reserve_refuses_more_emails_or_bytes_than_a_hold_may_cover(ledger: Ledger) -> None:
    with pytest.raises(InvalidAmount):
        await ledger.reserve("acme", "m1", MessageClass.BULK, emails=10_000_001)
    with pytest.raises(InvalidAmount):
        await ledger.reserve("acme", "m1", MessageClass.BULK, attachment_bytes=2**40 + 1)


async def test_a_reserve_without_synchronous_commit_holds_the_same_and_leaves_the_setting_behind(
    pool: AsyncConnectionPool,
) -> None:
    ledger = Ledger(pool, LedgerOptions(reserve_synchronous_commit=False))
    try:
        await ledger.top_up("acme", 10, "t1")
        hold = await ledger.reserve("acme", "m1", MessageClass.TRANSACTIONAL)
        assert (hold.amount, hold.state) == (3, HoldState.HELD)
        assert await ledger.get_balance("acme") == Balance("acme", available=7, held=3, spent=0)
        await check_books(pool)
        # SET LOCAL: the pooled connections' other transactions still wait for their flush
        for _ in range(pool.max_size):
            async with pool.connection() as conn:
                assert await (await conn.execute("SHOW synchronous_commit")).fetchone() == ("on",)
    finally:
        await ledger.close()


async def test_a_transaction_without_synchronous_commit_runs_with_it_off(pool: AsyncConnectionPool) -> None:
    async def setting(conn: Any) -> str:
        row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
        return str(row[0])

    db = Database(pool)
    assert await db.transaction(setting, pipeline=True, synchronous_commit=False) == "off"
    assert await db.transaction(setting, synchronous_commit=False) == "off"
    assert await db.transaction(setting, pipeline=True) == "on"
