"""Checks run by ``test_clean_machine`` inside its clean test session (not collected by a normal run: the file name
does not start with ``test_``): the session's Postgres, Redis and NATS are private servers on free ports, and
Postgres and Redis are the dev extra's wheels'."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg
import redis

from dev import binaries, pg_account


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_the_servers_are_private_ones_on_free_ports(admin_dsn: str, redis_url: str, nats_url: str) -> None:
    assert {_port(admin_dsn), _port(redis_url), _port(nats_url)}.isdisjoint({5432, 6379, 4222})


def test_postgres_is_the_wheels(admin_dsn: str) -> None:
    bin_dir = binaries.wheel_postgres_bin_dir()
    assert bin_dir is not None
    wheel_version = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]
    with psycopg.connect(admin_dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    assert row[0].split()[0] == wheel_version


def test_postgres_runs_as_its_account_under_root_else_as_us(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    status = Path(f"/proc/{row[0]}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    account = pg_account.postgres_account()
    assert pwd.getpwuid(uid).pw_name == (account if account is not None else pwd.getpwuid(os.geteuid()).pw_name)


def test_redis_is_the_wheels(redis_url: str) -> None:
    info = redis.Redis.from_url(redis_url).info("server")
    assert info["executable"] == binaries.wheel_redis_server()
