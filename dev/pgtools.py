"""Creating and dropping throw-away Postgres databases, for tests, benchmarks and ``make run``."""

from __future__ import annotations

import re
import secrets

import psycopg
from psycopg import sql

_SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def with_database(dsn: str, dbname: str) -> str:
    """The same server DSN pointed at another database."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def unique_database_name(prefix: str = "esp_test") -> str:
    """A database name no other run uses."""
    return f"{prefix}_{secrets.token_hex(6)}"


def create_database(admin_dsn: str, dbname: str) -> str:
    """Create ``dbname`` on the server of ``admin_dsn``; return its DSN."""
    if not _SAFE_NAME.match(dbname):
        raise ValueError(f"unsafe database name {dbname!r}")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return with_database(admin_dsn, dbname)


def drop_database(admin_dsn: str, dbname: str) -> None:
    """Drop ``dbname``, disconnecting whoever still uses it."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
