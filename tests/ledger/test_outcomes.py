"""Outcome events: sent commits, failed releases, and a redelivered event changes nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.common.db import create_pool
from services.ledger.errors import IdempotencyMismatch, InvalidLedgerArgument
from services.ledger.ledger import Ledger
from services.ledger.models import (
    Balance,
    FinalOutcome,
    HoldState,
    MessageClass,
    NotificationKind,
    OutcomeEvent,
    OutcomeResult,
)
from tests.ledger.books import check_books


@pytest.fixture
async def funded(ledger: Ledger) -> Ledger:
    """Tenant acme with 100 credits and a 5-credit hold ``m1``."""
    await ledger.top_up("acme", 100, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP)
    return ledger


async def test_the_same_sent_event_delivered_three_times_commits_once(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    results = [await funded.apply_outcome("e1", "m1", "sent") for _ in range(3)]

    assert [(r.result, r.duplicate) for r in results] == [
        (OutcomeResult.COMMITTED, False),
        (OutcomeResult.COMMITTED, True),
        (OutcomeResult.COMMITTED, True),
    ]
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)
    await check_books(pool)


async def test_a_failed_event_releases_the_hold(funded: Ledger) -> None:
    applied = await funded.apply_outcome("e1", "m1", FinalOutcome.FAILED)

    assert applied.result is OutcomeResult.RELEASED
    assert (await funded.get_hold("m1")).state is HoldState.RELEASED
    assert await funded.get_balance("acme") == Balance("acme", available=100, held=0, spent=0)


async def test_one_batch_holding_an_event_three_times_commits_once(funded: Ledger, pool: AsyncConnectionPool) -> None:
    results = await funded.apply_outcomes([OutcomeEvent("e1", "m1", FinalOutcome.SENT)] * 3)

    assert [r.duplicate for r in results] == [False, True, True]  # type: ignore[union-attr]
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)
    await check_books(pool)


async def test_duplicates_delivered_to_two_replicas_at_once_commit_once(funded: Ledger, ledger_dsn: str) -> None:
    other_pool = await create_pool(ledger_dsn, min_size=1, max_size=2)
    other = Ledger(other_pool)
    try:
        results = await asyncio.gather(
            *(replica.apply_outcome("e1", "m1", "sent") for replica in (funded, other, funded, other))
        )
    finally:
        await other.close()
        await other_pool.close()

    assert sorted(r.duplicate for r in results) == [False, True, True, True]
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)


async def test_a_second_event_for_a_resolved_hold_changes_nothing(funded: Ledger) -> None:
    await funded.apply_outcome("e1", "m1", "sent")

    later = await funded.apply_outcome("e2", "m1", "failed")

    assert (later.result, later.duplicate) == (OutcomeResult.HOLD_ALREADY_RESOLVED, False)
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)


async def test_a_late_sent_for_an_expired_hold_charges_nothing_and_is_reported(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    hold = await funded.get_hold("m1")
    await funded.expire_holds(now=hold.expires_at + timedelta(seconds=1))

    late = await funded.apply_outcome("e1", "m1", "sent")

    assert late.result is OutcomeResult.HOLD_EXPIRED
    assert await funded.get_balance("acme") == Balance("acme", available=100, held=0, spent=0)
    [notification] = await funded.pending_notifications()
    assert notification.kind is NotificationKind.UNBILLED_SEND
    assert notification.payload["hold_id"] == "m1"
    await check_books(pool)


async def test_an_event_for_an_unknown_hold_is_recorded_without_effect(funded: Ledger) -> None:
    applied = await funded.apply_outcome("e1", "campaign-message-7", "sent")
    again = await funded.apply_outcome("e1", "campaign-message-7", "sent")

    assert (applied.result, again.duplicate) == (OutcomeResult.HOLD_NOT_FOUND, True)
    assert (await funded.get_balance("acme")).held == 5


async def test_reusing_an_event_id_for_another_outcome_is_an_idempotency_mismatch(funded: Ledger) -> None:
    await funded.apply_outcome("e1", "m1", "sent")

    with pytest.raises(IdempotencyMismatch):
        await funded.apply_outcome("e1", "m1", "failed")


async def test_a_malformed_event_fails_alone(funded: Ledger) -> None:
    await funded.reserve("acme", "m2", MessageClass.OTP)

    bad, good = await funded.apply_outcomes(
        [OutcomeEvent("", "m1", FinalOutcome.SENT), OutcomeEvent("e2", "m2", "sent")]  # type: ignore[arg-type]
    )

    assert isinstance(bad, InvalidLedgerArgument)
    assert good.result is OutcomeResult.COMMITTED  # type: ignore[union-attr]


async def test_one_batch_of_mixed_outcomes_journals_each_step_with_the_balance_after_it(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    for hold_id in ("m2", "m3", "m4"):
        await funded.reserve("acme", hold_id, MessageClass.OTP)  # 5 credits each: available 80, held 20

    results = await funded.apply_outcomes(
        [
            OutcomeEvent("e1", "m1", FinalOutcome.FAILED),
            OutcomeEvent("e2", "m2", FinalOutcome.SENT),
            OutcomeEvent("e3", "m3", FinalOutcome.FAILED),
            OutcomeEvent("e4", "m3", FinalOutcome.SENT),  # the hold was released by e3 just before, in this batch
            OutcomeEvent("e5", "m4", FinalOutcome.SENT),
        ]
    )

    assert [r.result for r in results] == [  # type: ignore[union-attr]
        OutcomeResult.RELEASED,
        OutcomeResult.COMMITTED,
        OutcomeResult.RELEASED,
        OutcomeResult.HOLD_ALREADY_RESOLVED,
        OutcomeResult.COMMITTED,
    ]
    assert await funded.get_balance("acme") == Balance("acme", available=90, held=0, spent=10)
    entries, _ = await funded.list_transactions("acme")
    assert [(str(e.kind), e.hold_id, e.available_after) for e in reversed(entries[:4])] == [
        ("release", "m1", 85),
        ("commit", "m2", 85),
        ("release", "m3", 90),
        ("commit", "m4", 90),
    ]
    [unbilled] = await funded.pending_notifications()
    assert (unbilled.kind, unbilled.payload["hold_id"]) == (NotificationKind.UNBILLED_SEND, "m3")
    await check_books(pool)


async def test_a_sent_outcome_settles_while_a_reserve_holds_the_balance_row(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    # A campaign's settlement must never queue behind (nor hold up) the reserves of the same tenant: commits count
    # on the tenant's commit total, not on the balance row every reserve locks.
    async with pool.connection() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM ledger.balances WHERE tenant_id = 'acme' FOR UPDATE")
        applied = await asyncio.wait_for(funded.apply_outcome("e1", "m1", "sent"), 5)
    assert applied.result is OutcomeResult.COMMITTED
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)
    await check_books(pool)


async def test_a_reserve_goes_through_while_a_settlement_holds_the_commit_total(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    await funded.apply_outcome("e1", "m1", "sent")  # the tenant now has a commit total row
    async with pool.connection() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM ledger.commit_totals WHERE tenant_id = 'acme' FOR UPDATE")
        hold = await asyncio.wait_for(funded.reserve("acme", "m2", MessageClass.OTP), 5)
    assert hold.state is HoldState.HELD
    assert await funded.get_balance("acme") == Balance("acme", available=90, held=5, spent=5)
    await check_books(pool)


async def test_a_failed_outcome_still_returns_the_credits_to_available(funded: Ledger, pool: AsyncConnectionPool):
    await funded.reserve("acme", "m2", MessageClass.OTP)
    await funded.apply_outcomes(
        [OutcomeEvent("e1", "m1", FinalOutcome.SENT), OutcomeEvent("e2", "m2", FinalOutcome.FAILED)]
    )
    assert await funded.get_balance("acme") == Balance("acme", available=95, held=0, spent=5)
    await check_books(pool)


async def test_applied_events_past_the_retention_are_forgotten_and_a_late_duplicate_still_charges_once(
    funded: Ledger, pool: AsyncConnectionPool
) -> None:
    await funded.reserve("acme", "m2", MessageClass.OTP)
    await funded.apply_outcomes(
        [OutcomeEvent("e1", "m1", FinalOutcome.SENT), OutcomeEvent("e2", "m2", FinalOutcome.SENT)]
    )
    async with pool.connection() as conn:
        await conn.execute("UPDATE ledger.processed_events SET processed_at = now() - interval '9 days' "
                           "WHERE event_id = 'e1'")

    assert await funded.prune_processed_events(older_than_s=8 * 86_400) == 1
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id FROM ledger.processed_events ORDER BY event_id")
        assert [row[0] for row in await cur.fetchall()] == ["e2"]

    late = await funded.apply_outcome("e1", "m1", "sent")
    assert late.result is OutcomeResult.HOLD_ALREADY_RESOLVED
    assert await funded.get_balance("acme") == Balance("acme", available=90, held=0, spent=10)
    await check_books(pool)


async def test_the_sweeper_forgets_applied_events_past_the_retention(funded: Ledger, pool: AsyncConnectionPool):
    await funded.apply_outcome("e1", "m1", "sent")
    async with pool.connection() as conn:
        await conn.execute("UPDATE ledger.processed_events SET processed_at = now() - interval '2 hours'")
    stop = asyncio.Event()
    sweeper = asyncio.create_task(funded.run_expiry_sweeper(stop, interval_s=0.05,
                                                            processed_event_retention_s=3600))
    try:
        for _ in range(100):
            async with pool.connection() as conn:
                remaining = await (await conn.execute("SELECT count(*) FROM ledger.processed_events")).fetchone()
            if remaining == (0,):
                break
            await asyncio.sleep(0.05)
        assert remaining == (0,)
    finally:
        stop.set()
        await sweeper
