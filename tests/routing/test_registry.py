"""The provider registry: Postgres is the truth, a JetStream KV bucket broadcasts every change to each replica."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats
import pytest
from nats.js import JetStreamContext

from libs.common.db import create_pool, migrate_services
from libs.common.errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from libs.routing.catalog import ProviderCatalog, ProviderSpec, bucket_name, open_bucket
from services.router.registry import ProviderRegistry

SECRET = {"server_token": "very-secret-token"}


def postmark(provider_id: str, **fields: object) -> ProviderSpec:
    values: dict[str, object] = {"type": "postmark", "endpoint": "http://127.0.0.1:9/p/x", "credentials": SECRET,
                                 "price_per_email_micros": 100}
    values.update(fields)
    return ProviderSpec(provider_id, **values)  # type: ignore[arg-type]


@dataclass
class Replicas:
    """Two catalogs watching the bucket, as two router or sender replicas would."""

    first: ProviderCatalog
    second: ProviderCatalog

    async def wait_until(self, check: Callable[[ProviderCatalog], bool], timeout_s: float = 2.0) -> None:
        """Both replicas satisfy ``check`` within ``timeout_s`` (the registry's promise) or the test fails."""
        for _ in range(int(timeout_s / 0.02)):
            if check(self.first) and check(self.second):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the replicas did not apply the change within {timeout_s}s")


@dataclass
class Setup:
    registry: ProviderRegistry
    replicas: Replicas
    js: JetStreamContext


@pytest.fixture(scope="module")
def router_database(new_database: Callable[[], str]) -> str:
    """One database with the router's schema for the module; each test starts from empty tables."""
    dsn = new_database()
    asyncio.run(migrate_services(dsn, ["router"]))
    return dsn


@pytest.fixture
async def setup(router_database: str, nats_url: str, run_id: str) -> AsyncIterator[Setup]:
    pool = await create_pool(router_database, min_size=1, max_size=3, name="registry-test")
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE router.providers CASCADE")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    namespace = f"{run_id}reg{secrets.token_hex(3)}"
    kv = await open_bucket(js, namespace)
    stop = asyncio.Event()
    catalogs = [ProviderCatalog(await open_bucket(js, namespace)) for _ in range(2)]
    watchers = [asyncio.create_task(c.run(stop)) for c in catalogs]
    for catalog in catalogs:
        await catalog.wait_loaded()
    yield Setup(ProviderRegistry(pool, kv), Replicas(*catalogs), js)
    stop.set()
    await asyncio.gather(*watchers)
    await js.delete_key_value(bucket_name(namespace))
    await nc.close()
    await pool.close()


async def test_a_created_provider_reaches_every_replica_with_its_credentials(setup: Setup):
    await setup.registry.create(postmark("pm-a"))

    await setup.replicas.wait_until(lambda c: "pm-a" in c.providers)
    assert setup.replicas.second.providers["pm-a"].credentials == SECRET


async def test_the_admin_view_never_shows_the_credentials_only_where_they_are_kept(setup: Setup):
    created = await setup.registry.create(postmark("pm-a"))
    listed = await setup.registry.list(10)
    fetched = await setup.registry.get("pm-a")

    for record in (created, fetched, *listed):
        assert record.spec.credentials == {}
        assert record.credentials_ref == "router.provider_credentials/pm-a"


async def test_an_update_reaches_every_replica_with_a_new_version(setup: Setup):
    created = await setup.registry.create(postmark("pm-a"))

    updated = await setup.registry.update("pm-a", {"price_per_email_micros": 42, "rate_limit_per_second": 5.0})

    assert updated.spec.version == created.spec.version + 1
    await setup.replicas.wait_until(lambda c: c.providers.get("pm-a", postmark("x")).price_per_email_micros == 42)
    assert setup.replicas.first.providers["pm-a"].rate_limit_per_second == 5.0


async def test_new_credentials_replace_the_old_ones_everywhere(setup: Setup):
    await setup.registry.create(postmark("pm-a"))

    await setup.registry.update("pm-a", {}, credentials={"server_token": "rotated"})

    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].credentials == {"server_token": "rotated"})


async def test_disabling_a_provider_reaches_every_replica(setup: Setup):
    await setup.registry.create(postmark("pm-a"))

    await setup.registry.update("pm-a", {"disabled": True})

    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].disabled)
    assert [r.spec.id for r in await setup.registry.list(10, show_disabled=False)] == []


async def test_a_deleted_provider_disappears_from_every_replica(setup: Setup):
    await setup.registry.create(postmark("pm-a"))
    await setup.replicas.wait_until(lambda c: "pm-a" in c.providers)

    await setup.registry.delete("pm-a")

    await setup.replicas.wait_until(lambda c: "pm-a" not in c.providers)
    with pytest.raises(NotFound):
        await setup.registry.get("pm-a")


async def test_a_provider_id_is_taken_only_once(setup: Setup):
    await setup.registry.create(postmark("pm-a"))

    with pytest.raises(AlreadyExists):
        await setup.registry.create(postmark("pm-a"))


async def test_a_retried_create_with_its_request_id_returns_the_provider_it_created(setup: Setup):
    first = await setup.registry.create(postmark("pm-a"), request_id="create-1")

    again = await setup.registry.create(postmark("pm-a"), request_id="create-1")

    assert again.spec == first.spec
    assert again.created_at == first.created_at


async def test_a_request_id_reused_for_a_different_create_is_refused(setup: Setup):
    await setup.registry.create(postmark("pm-a"), request_id="create-1")

    with pytest.raises(AlreadyExists) as refused:
        await setup.registry.create(postmark("pm-a", price_per_email_micros=999), request_id="create-1")
    assert refused.value.reason == "REQUEST_ID_REUSED"


async def test_a_create_with_another_request_id_for_a_taken_id_is_refused(setup: Setup):
    await setup.registry.create(postmark("pm-a"), request_id="create-1")

    with pytest.raises(AlreadyExists) as refused:
        await setup.registry.create(postmark("pm-a"), request_id="create-2")
    assert refused.value.reason == "PROVIDER_EXISTS"


async def test_an_update_with_a_stale_etag_is_aborted(setup: Setup):
    created = await setup.registry.create(postmark("pm-a"))
    await setup.registry.update("pm-a", {"weight": 2.0})

    with pytest.raises(Aborted):
        await setup.registry.update("pm-a", {"weight": 3.0}, expected_version=created.spec.version)


async def test_invalid_fields_are_all_reported_at_once(setup: Setup):
    with pytest.raises(InvalidArgument) as raised:
        await setup.registry.create(postmark("Bad_Id", type="carrier-pigeon", price_per_email_micros=-1,
                                             weight=0, allowed_classes=("spam",)))

    fields = {v.field for v in raised.value.field_violations}
    assert fields == {"provider_id", "provider.type", "provider.price_per_email_micros", "provider.weight",
                      "provider.allowed_classes"}


async def test_a_provider_its_adapter_cannot_use_is_refused_at_once(setup: Setup):
    with pytest.raises(InvalidArgument) as raised:
        await setup.registry.create(postmark("pm-a", credentials={}))

    assert "server_token" in raised.value.field_violations[0].description


async def test_repair_rebroadcasts_what_a_lost_broadcast_missed(setup: Setup):
    await setup.registry.create(postmark("pm-a"))
    await setup.replicas.wait_until(lambda c: "pm-a" in c.providers)
    # A change the replicas never heard of (NATS was down), and a leftover key Postgres no longer has.
    await setup.registry.kv.delete("pm-a")
    await setup.registry.kv.put("ghost", postmark("ghost").to_json())
    await setup.replicas.wait_until(lambda c: "ghost" in c.providers and "pm-a" not in c.providers)

    fixed = await setup.registry.repair(setup.replicas.first.providers)

    assert fixed == 2
    await setup.replicas.wait_until(lambda c: "pm-a" in c.providers and "ghost" not in c.providers)
    assert await setup.registry.repair(setup.replicas.first.providers) == 0
