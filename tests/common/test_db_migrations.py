"""Per-service migrations apply in order, once, even with several migrators at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from libs.common.db import create_pool, load_migrations, migrate


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


async def test_migrations_apply_in_order_and_only_once(new_database: Callable[[], str], tmp_path: Path):
    dsn = new_database()
    folder = _write(tmp_path / "m", {"002_add.sql": "ALTER TABLE demo.t ADD COLUMN b int;",
                                     "001_init.sql": "CREATE SCHEMA demo; CREATE TABLE demo.t (a int);"})
    migrations = load_migrations("demo", folder)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        first = await migrate(conn, migrations)
        second = await migrate(conn, migrations)
        cur = await conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 't' "
                                 "ORDER BY ordinal_position")
        columns = [r[0] for r in await cur.fetchall()]
    assert [m.version for m in first] == [1, 2]
    assert second == []
    assert columns == ["a", "b"]


async def test_concurrent_migrators_apply_each_file_once(new_database: Callable[[], str], tmp_path: Path):
    dsn = new_database()
    migrations = load_migrations("demo", _write(tmp_path / "m", {"001_init.sql": "CREATE TABLE t (a int);"}))

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            return len(await migrate(conn, migrations))

    assert sorted(await asyncio.gather(*(run() for _ in range(4)))) == [0, 0, 0, 1]


def test_a_badly_named_migration_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"NNN_name\.sql"):
        load_migrations("demo", _write(tmp_path / "m", {"init.sql": "SELECT 1;"}))


async def test_service_connections_run_without_jit(new_database: Callable[[], str]):
    pool = await create_pool(new_database(), min_size=1, max_size=1, name="jit-test")
    try:
        async with pool.connection() as conn:
            row = await (await conn.execute("SHOW jit")).fetchone()
    finally:
        await pool.close()
    assert row == ("off",)
