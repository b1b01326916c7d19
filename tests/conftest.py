"""Shared fixtures: real Postgres, Redis, NATS JetStream and S3 for every test run.

Servers already listening on the machine are used (CI and dev boxes run Postgres, Redis and NATS); the S3 server
(``rclone serve s3``, as ``make run`` starts it) is started privately. Each run gets its own database, key prefix
and stream names, so runs never collide.
A fixture that cannot reach its server fails the test — it never skips.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from dev import pgtools
from dev.mesh import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY, free_port, start_s3

__all__ = ["free_port"]  # tests import it from here

# Property tests check behaviour, not speed: on a busy shared machine an example can take longer than hypothesis'
# default 200 ms deadline, which would fail a correct test.
settings.register_profile("esp", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("esp")

ADMIN_DSN = os.environ.get("ESP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ESP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("ESP_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture(scope="session")
def run_id() -> str:
    """A short id unique to this test run; prefixes database, Redis keys and JetStream names."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    try:
        with psycopg.connect(ADMIN_DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"Postgres is not reachable at {ADMIN_DSN}: {exc}")
    return ADMIN_DSN


@dataclass
class DatabaseFactory:
    """Creates fresh databases and drops them all at the end of the session."""

    admin_dsn: str
    prefix: str
    created: list[str]

    def __call__(self) -> str:
        name = pgtools.unique_database_name(self.prefix)
        dsn = pgtools.create_database(self.admin_dsn, name)
        self.created.append(name)
        return dsn


@pytest.fixture(scope="session")
def new_database(admin_dsn: str, run_id: str) -> Iterator[Callable[[], str]]:
    """Factory: each call makes a brand-new empty database and returns its DSN."""
    factory = DatabaseFactory(admin_dsn, f"esp_{run_id}", [])
    yield factory
    for name in factory.created:
        pgtools.drop_database(admin_dsn, name)


@pytest.fixture(scope="session")
def database(new_database: Callable[[], str]) -> str:
    """One empty database shared by the whole session (tests that need a clean one use ``new_database``)."""
    return new_database()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str, run_id: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; every key the test writes must start with ``run_id`` and is deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{run_id}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
def nats_url() -> str:
    host, port = NATS_URL.removeprefix("nats://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        pytest.fail(f"NATS is not reachable at {NATS_URL}: {exc}")
    return NATS_URL


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    region: str = "us-east-1"
    # The credentials MeshConfig hands the services by default, so meshes built on this server can sign for it.
    access_key: str = DEV_S3_ACCESS_KEY
    secret_key: str = DEV_S3_SECRET_KEY


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private S3 server (rclone, in a temporary data directory of its own) on a free loopback port, stopped and
    its data removed at the end of the session."""
    port = free_port()
    try:
        proc = start_s3(port, tmp_path_factory.mktemp("s3-logs"))
    except RuntimeError as exc:
        pytest.fail(f"could not start the S3 server: {exc}")
    yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    proc.stop()
