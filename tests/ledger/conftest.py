"""Fixtures of the ledger tests: a fresh, migrated database per test and a Ledger over a small pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.common.db import create_pool, migrate_services
from services.ledger.ledger import Ledger


@pytest.fixture
async def ledger_dsn(new_database: Callable[[], str]) -> str:
    """A brand-new database with the ledger's migrations applied."""
    dsn = new_database()
    await migrate_services(dsn, ["ledger"])
    return dsn


@pytest.fixture
async def pool(ledger_dsn: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await create_pool(ledger_dsn, min_size=1, max_size=6, name="ledger-test")
    yield pool
    await pool.close()


@pytest.fixture
async def ledger(pool: AsyncConnectionPool) -> AsyncIterator[Ledger]:
    ledger = Ledger(pool)
    yield ledger
    await ledger.close()
