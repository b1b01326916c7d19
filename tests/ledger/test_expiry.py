"""Expiry: a hold nobody resolved returns its credits after its TTL; sweepers in several replicas share work."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.common.db import create_pool
from services.ledger.errors import HoldAlreadyResolved
from services.ledger.ledger import Ledger
from services.ledger.models import Balance, HoldState, MessageClass, ReserveRequest
from tests.ledger.books import check_books


async def test_an_expired_hold_returns_its_credits(ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 10, "t1")
    hold = await ledger.reserve("acme", "m1", MessageClass.OTP, ttl_s=60)

    expired = await ledger.expire_holds(now=hold.expires_at)

    assert expired == 1
    assert (await ledger.get_hold("m1")).state is HoldState.EXPIRED
    assert await ledger.get_balance("acme") == Balance("acme", available=10, held=0, spent=0)
    await check_books(pool)


async def test_a_hold_is_not_expired_before_its_deadline(ledger: Ledger) -> None:
    await ledger.top_up("acme", 10, "t1")
    hold = await ledger.reserve("acme", "m1", MessageClass.OTP, ttl_s=60)

    assert await ledger.expire_holds() == 0
    assert await ledger.expire_holds(now=hold.expires_at - timedelta(seconds=1)) == 0
    assert (await ledger.get_hold("m1")).state is HoldState.HELD


async def test_an_expired_hold_cannot_be_committed(ledger: Ledger) -> None:
    await ledger.top_up("acme", 10, "t1")
    hold = await ledger.reserve("acme", "m1", MessageClass.OTP, ttl_s=60)
    await ledger.expire_holds(now=hold.expires_at)

    with pytest.raises(HoldAlreadyResolved) as refused:
        await ledger.commit("m1")

    assert refused.value.state == "expired"
    assert await ledger.get_balance("acme") == Balance("acme", available=10, held=0, spent=0)


async def test_the_sweeper_expires_at_most_limit_holds_per_step(ledger: Ledger) -> None:
    await ledger.top_up("acme", 100, "t1")
    holds = await ledger.reserve_many([ReserveRequest("acme", f"m{i}", MessageClass.BULK, ttl_s=5) for i in range(7)])
    deadline = max(h.expires_at for h in holds)  # type: ignore[union-attr]

    assert [await ledger.expire_holds(now=deadline, limit=3) for _ in range(4)] == [3, 3, 1, 0]


async def test_two_concurrent_sweepers_expire_each_hold_exactly_once(
    ledger: Ledger, pool: AsyncConnectionPool, ledger_dsn: str
) -> None:
    tenants = [f"tenant{i}" for i in range(5)]
    for tenant in tenants:
        await ledger.top_up(tenant, 1000, "t1")
    holds = await ledger.reserve_many(
        [ReserveRequest(tenants[i % 5], f"m{i}", MessageClass.BULK, emails=1 + i % 3, ttl_s=5) for i in range(400)]
    )
    deadline = max(h.expires_at for h in holds)  # type: ignore[union-attr]
    other_pool = await create_pool(ledger_dsn, min_size=1, max_size=2)
    other = Ledger(other_pool)

    async def sweep(replica: Ledger) -> int:
        total = 0
        for _ in range(100):  # bounded: 400 holds at 25 a step need at most 16 steps per sweeper
            expired = await replica.expire_holds(now=deadline, limit=25)
            if expired == 0:
                return total
            total += expired
        raise AssertionError("sweeper did not finish")

    try:
        counts = await asyncio.gather(sweep(ledger), sweep(other))
    finally:
        await other.close()
        await other_pool.close()

    assert sum(counts) == 400
    for tenant in tenants:
        assert await ledger.get_balance(tenant) == Balance(tenant, available=1000, held=0, spent=0)
    await check_books(pool)


async def test_run_expiry_sweeper_stops_when_asked(ledger: Ledger) -> None:
    await ledger.top_up("acme", 10, "t1")
    await ledger.reserve("acme", "m1", MessageClass.OTP, ttl_s=0.001)
    stop = asyncio.Event()
    sweeper = asyncio.create_task(ledger.run_expiry_sweeper(stop, interval_s=0.01))

    for _ in range(500):  # bounded wait for the background sweeper to pick up the due hold
        if (await ledger.get_hold("m1")).state is HoldState.EXPIRED:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(sweeper, timeout=5)

    assert (await ledger.get_hold("m1")).state is HoldState.EXPIRED


async def test_stale_planner_statistics_are_refreshed_where_the_server_does_not_autovacuum(
        ledger: Ledger, pool: AsyncConnectionPool) -> None:
    await ledger.top_up("acme", 10_000, "t1")
    await asyncio.gather(*(ledger.reserve("acme", f"m{i}", MessageClass.BULK) for i in range(300)))
    async with pool.connection() as conn:
        setting = await (await conn.execute("SELECT current_setting('autovacuum')")).fetchone()
    if setting is not None and setting[0] == "on":
        assert await ledger.refresh_planner_statistics() == []  # autovacuum's job there
        return

    analyzed: list[str] = []
    for _ in range(60):  # the server publishes its table counters within a second or so of each commit
        analyzed += await ledger.refresh_planner_statistics()
        if "holds" in analyzed:
            break
        await asyncio.sleep(0.25)

    assert "holds" in analyzed
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'ledger.holds'::regclass")
        row = await cur.fetchone()
    assert row is not None and row[0] >= 300
