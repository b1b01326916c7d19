"""The provider registry: Postgres is the truth, a JetStream KV bucket broadcasts every change to each replica; the
providers' secrets are sealed in both (ESP_SECRETS_KEYS) and opened only by the replicas holding the key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields

import nats
import psycopg
import pytest
from esp.v1 import providers_pb2
from google.protobuf import field_mask_pb2
from nats.js import JetStreamContext
from psycopg.types.json import Jsonb

from libs.common.db import create_pool, migrate_services
from libs.common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from libs.common.secret_box import SecretBox, generate_key_setting
from libs.common.settings import SettingsError
from libs.routing.catalog import ProviderCatalog, ProviderSpec, bucket_name, open_bucket
from services.router.config import RouterSettings
from services.router.registry import ProviderRegistry, create_request
from services.router.server import ProviderServicer, build_app

SECRET = {"server_token": "very-secret-token"}
WEBHOOK_SECRETS = {"webhook_user": "hook-user-b7c1", "webhook_password": "hook-password-9f2e"}


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
    keys: str
    """The ESP_SECRETS_KEYS the registry and the replicas share."""
    dsn: str


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
    keys = generate_key_setting("test")
    box = SecretBox.from_setting(keys)
    stop = asyncio.Event()
    catalogs = [ProviderCatalog(await open_bucket(js, namespace), box) for _ in range(2)]
    watchers = [asyncio.create_task(c.run(stop)) for c in catalogs]
    for catalog in catalogs:
        await catalog.wait_loaded()
    yield Setup(ProviderRegistry(pool, kv, box), Replicas(*catalogs), js, keys, router_database)
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


SMTP_PASSWORD = "summer2024"
"""A weak password: one a plain hash of the create request would give away to a dictionary attack."""


def smtp(provider_id: str, password: str = SMTP_PASSWORD) -> ProviderSpec:
    return ProviderSpec(provider_id, type="smtp", endpoint="127.0.0.1:2525",
                        credentials={"username": "relay", "password": password}, webhook_secrets=WEBHOOK_SECRETS)


def _plain_create_request(spec: ProviderSpec) -> bytes:
    """The create request as canonical JSON, built here rather than by the registry: what an offline guesser of the
    password would hash."""
    content: dict[str, object] = {f.name: getattr(spec, f.name) for f in fields(ProviderSpec) if f.compare}
    content.update(allowed_classes=list(spec.allowed_classes), options=dict(spec.options),
                   credentials=dict(spec.credentials), webhook_secrets=dict(spec.webhook_secrets))
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


async def _stored_fingerprint(dsn: str, provider_id: str) -> bytes | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute("SELECT create_fingerprint FROM router.providers WHERE id = %s",
                                        (provider_id,))).fetchone()
    assert row is not None
    return None if row[0] is None else bytes(row[0])


async def test_a_retried_create_with_credentials_returns_the_same_provider(setup: Setup):
    first = await setup.registry.create(smtp("smtp-a"), request_id="create-smtp")

    again = await setup.registry.create(smtp("smtp-a"), request_id="create-smtp")

    assert again.spec == first.spec and again.created_at == first.created_at
    assert [r.spec.id for r in await setup.registry.list(10)] == ["smtp-a"]


async def test_a_retry_with_other_credentials_under_the_same_request_id_is_refused(setup: Setup):
    await setup.registry.create(smtp("smtp-a"), request_id="create-smtp")

    with pytest.raises(AlreadyExists) as refused:
        await setup.registry.create(smtp("smtp-a", password="winter2024"), request_id="create-smtp")
    assert refused.value.reason == "REQUEST_ID_REUSED"


async def test_the_create_fingerprint_is_keyed_not_a_plain_hash_of_the_request(setup: Setup):
    spec = smtp("smtp-a")
    await setup.registry.create(spec, request_id="create-smtp")

    stored = await _stored_fingerprint(setup.dsn, "smtp-a")
    database = await _raw_postgres(setup.dsn)

    assert stored is not None
    assert _plain_create_request(spec) == create_request(spec)  # the bytes a guesser would hash ...
    unkeyed = hashlib.sha256(_plain_create_request(spec)).digest()
    assert unkeyed not in stored and unkeyed.hex() not in database  # ... are not what is kept
    assert SMTP_PASSWORD not in database
    assert stored != SecretBox.from_setting(generate_key_setting("test")).fingerprint(
        create_request(spec), context="router.providers.create/smtp-a")  # it takes our key, not just the key id


async def test_a_retry_across_a_key_rotation_is_recognised_while_the_old_key_is_listed(setup: Setup):
    first = await setup.registry.create(smtp("smtp-a"), request_id="create-smtp")
    rotated_keys = f"{generate_key_setting('next')},{setup.keys}"
    rotated = ProviderRegistry(setup.registry.pool, setup.registry.kv, SecretBox.from_setting(rotated_keys))
    await rotated.seal_stored_secrets()

    again = await rotated.create(smtp("smtp-a"), request_id="create-smtp")

    assert again.created_at == first.created_at
    # With the old key gone the retry cannot be told from another request: refused, never a second provider.
    next_only = ProviderRegistry(setup.registry.pool, setup.registry.kv,
                                 SecretBox.from_setting(rotated_keys.partition(",")[0]))
    with pytest.raises(AlreadyExists) as refused:
        await next_only.create(smtp("smtp-a"), request_id="create-smtp")
    assert refused.value.reason == "REQUEST_ID_REUSED"
    assert [r.spec.id for r in await setup.registry.list(10)] == ["smtp-a"]


async def test_an_unkeyed_fingerprint_an_earlier_version_stored_is_cleared_at_start(setup: Setup):
    spec = smtp("smtp-old")
    await setup.registry.create(spec, request_id="create-old")
    async with await psycopg.AsyncConnection.connect(setup.dsn, autocommit=True) as conn:
        await conn.execute("UPDATE router.providers SET create_fingerprint = %s WHERE id = 'smtp-old'",
                           (hashlib.sha256(_plain_create_request(spec)).digest(),))
    await setup.registry.create(smtp("smtp-new"), request_id="create-new")

    await setup.registry.seal_stored_secrets()

    assert await _stored_fingerprint(setup.dsn, "smtp-old") is None
    assert await _stored_fingerprint(setup.dsn, "smtp-new") is not None  # a keyed one stays
    with pytest.raises(AlreadyExists) as refused:
        await setup.registry.create(spec, request_id="create-old")
    assert refused.value.reason == "REQUEST_ID_REUSED"
    assert (await setup.registry.create(smtp("smtp-new"), request_id="create-new")).spec.id == "smtp-new"


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


# -- secrets sealed at rest ------------------------------------------------------------------------------------------
async def _raw_postgres(dsn: str) -> str:
    """Every router row, every column, as text: what someone reading the database would see."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rows = await (await conn.execute(
            """SELECT row_to_json(p)::text, coalesce(row_to_json(c)::text, ''),
                      coalesce(encode(c.sealed_credentials, 'escape'), ''),
                      coalesce(encode(c.sealed_webhook_secrets, 'escape'), '')
               FROM router.providers p LEFT JOIN router.provider_credentials c ON c.provider_id = p.id""")).fetchall()
    return "\n".join(" ".join(row) for row in rows)


async def _raw_bucket(setup: Setup) -> bytes:
    """Every value of the KV bucket as stored."""
    kv = setup.registry.kv
    values = [(await kv.get(key)).value or b"" for key in await kv.keys()]
    return b"\n".join(values)


def _plain_secrets() -> list[str]:
    return [*SECRET.values(), *WEBHOOK_SECRETS.values()]


async def test_no_secret_is_in_postgres_or_the_bucket_in_plain_text_yet_every_replica_has_them(setup: Setup):
    await setup.registry.create(postmark("pm-a", webhook_secrets=WEBHOOK_SECRETS))
    await setup.registry.update("pm-a", {}, credentials={"server_token": "rotated-token-4a4a"})
    await setup.replicas.wait_until(lambda c: c.providers.get("pm-a", postmark("x")).credentials
                                    == {"server_token": "rotated-token-4a4a"})

    database, bucket = await _raw_postgres(setup.dsn), await _raw_bucket(setup)

    for secret in [*_plain_secrets(), "rotated-token-4a4a"]:
        assert secret not in database
        assert secret.encode() not in bucket
    assert b"sealed_credentials" in bucket and b"sealed_webhook_secrets" in bucket
    assert setup.replicas.first.providers["pm-a"].webhook_secrets == WEBHOOK_SECRETS
    assert "rotated-token" not in repr(setup.replicas.first.providers["pm-a"])


async def test_webhook_secrets_are_set_replaced_and_removed_and_only_their_names_are_shown(setup: Setup):
    created = await setup.registry.create(postmark("pm-a"))
    assert created.webhook_secret_names == ()

    updated = await setup.registry.update("pm-a", {}, webhook_secrets=WEBHOOK_SECRETS)

    assert updated.webhook_secret_names == ("webhook_password", "webhook_user")
    assert updated.spec.webhook_secrets == {} and updated.spec.credentials == {}
    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].webhook_secrets == WEBHOOK_SECRETS)
    assert setup.replicas.second.providers["pm-a"].credentials == SECRET  # untouched by the webhook update

    await setup.registry.update("pm-a", {"weight": 2.0})  # no secrets given: they stay
    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].weight == 2.0)
    assert setup.replicas.first.providers["pm-a"].webhook_secrets == WEBHOOK_SECRETS

    removed = await setup.registry.update("pm-a", {}, webhook_secrets={})

    assert removed.webhook_secret_names == ()
    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].webhook_secrets == {})


async def test_plain_credentials_an_earlier_version_stored_are_sealed_at_start(setup: Setup):
    async with await psycopg.AsyncConnection.connect(setup.dsn, autocommit=True) as conn:
        await conn.execute("""INSERT INTO router.providers (id, type, endpoint) VALUES ('pm-old', 'postmark',
                              'http://127.0.0.1:9/p/x')""")
        await conn.execute("INSERT INTO router.provider_credentials (provider_id, credentials) VALUES (%s, %s)",
                           ("pm-old", Jsonb(SECRET)))

    assert await setup.registry.seal_stored_secrets() == 1
    await setup.registry.resync()

    assert SECRET["server_token"] not in await _raw_postgres(setup.dsn)
    await setup.replicas.wait_until(lambda c: c.providers.get("pm-old", postmark("x")).credentials == SECRET)
    assert SECRET["server_token"].encode() not in await _raw_bucket(setup)
    assert await setup.registry.seal_stored_secrets() == 0  # once is enough


async def test_a_new_key_reseals_what_the_old_one_sealed(setup: Setup):
    await setup.registry.create(postmark("pm-a", webhook_secrets=WEBHOOK_SECRETS))
    rotated_keys = f"{generate_key_setting('next')},{setup.keys}"
    rotated = ProviderRegistry(setup.registry.pool, setup.registry.kv, SecretBox.from_setting(rotated_keys))

    assert await rotated.seal_stored_secrets() == 1
    await rotated.resync()

    async with await psycopg.AsyncConnection.connect(setup.dsn) as conn:
        sealed = await (await conn.execute(
            "SELECT sealed_credentials, sealed_webhook_secrets FROM router.provider_credentials")).fetchone()
    assert sealed is not None
    assert {rotated.secrets.sealed_key_id(bytes(value)) for value in sealed} == {"next"}
    next_only = ProviderRegistry(setup.registry.pool, setup.registry.kv,
                                 SecretBox.from_setting(rotated_keys.partition(",")[0]))
    assert (await next_only._wanted())[0]["pm-a"].webhook_secrets == WEBHOOK_SECRETS


async def test_a_catalog_without_the_key_sees_the_provider_but_not_its_secrets(setup: Setup):
    await setup.registry.create(postmark("pm-a", webhook_secrets=WEBHOOK_SECRETS))
    stop = asyncio.Event()
    keyless = ProviderCatalog(setup.registry.kv)
    watcher = asyncio.create_task(keyless.run(stop))
    try:
        await keyless.wait_loaded()
        spec = keyless.providers["pm-a"]
        assert spec.price_per_email_micros == 100
        assert spec.credentials == {} and spec.webhook_secrets == {} and spec.secrets_unopened
    finally:
        stop.set()
        await watcher


async def test_sealed_credentials_moved_to_another_provider_do_not_open_there(setup: Setup):
    await setup.registry.create(postmark("pm-a"))
    await setup.registry.create(postmark("pm-b", credentials={"server_token": "b-token"}))
    async with await psycopg.AsyncConnection.connect(setup.dsn, autocommit=True) as conn:
        await conn.execute("""UPDATE router.provider_credentials c SET sealed_credentials = a.sealed_credentials
                              FROM router.provider_credentials a
                              WHERE a.provider_id = 'pm-a' AND c.provider_id = 'pm-b'""")

    wanted, unreadable = await setup.registry._wanted()

    assert unreadable == {"pm-b"} and "pm-a" in wanted
    with pytest.raises(FailedPrecondition):
        await setup.registry.update("pm-b", {"weight": 2.0})
    await setup.registry.update("pm-b", {}, credentials={"server_token": "b-token-2"})  # new ones repair it
    assert "pm-b" in (await setup.registry._wanted())[0]


async def test_the_admin_rpcs_take_webhook_secrets_and_never_echo_a_secret(setup: Setup):
    servicer = ProviderServicer(setup.registry, setup.replicas.first, health=None)  # type: ignore[arg-type]
    provider = providers_pb2.Provider(type="postmark", endpoint="http://127.0.0.1:9/p/x", credentials=SECRET,
                                      webhook_secrets=WEBHOOK_SECRETS, price_per_email_micros=100)

    created = await servicer.CreateProvider(
        providers_pb2.CreateProviderRequest(provider_id="pm-rpc", provider=provider), None)
    updated = await servicer.UpdateProvider(providers_pb2.UpdateProviderRequest(
        provider=providers_pb2.Provider(name="providers/pm-rpc", webhook_secrets={"webhook_user": "u2",
                                                                                  "webhook_password": "p2-secret"}),
        update_mask=field_mask_pb2.FieldMask(paths=["webhook_secrets"])), None)
    fetched = await servicer.GetProvider(providers_pb2.GetProviderRequest(name="providers/pm-rpc"), None)
    listed = await servicer.ListProviders(providers_pb2.ListProvidersRequest(), None)

    for answer in (created, updated, fetched, *listed.providers):
        assert not answer.credentials and not answer.webhook_secrets
        assert answer.credentials_ref == "router.provider_credentials/pm-rpc"
        assert list(answer.webhook_secret_names) == ["webhook_password", "webhook_user"]
        for secret in [*_plain_secrets(), "p2-secret"]:
            assert secret.encode() not in answer.SerializeToString()
    await setup.replicas.wait_until(lambda c: c.providers.get("pm-rpc", postmark("x")).webhook_secrets
                                    == {"webhook_user": "u2", "webhook_password": "p2-secret"})
    assert setup.replicas.first.providers["pm-rpc"].price_per_email_micros == 100  # the mask left the rest alone


async def test_the_router_refuses_to_start_without_esp_secrets_keys():
    with pytest.raises(SettingsError, match="ESP_SECRETS_KEYS"):
        await build_app(RouterSettings(secrets_keys=""))
