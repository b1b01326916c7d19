"""API keys: shown once, stored hashed, recognisable, scoped, listable, revocable."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from esp.v1 import tenants_pb2

from libs.common.errors import PermissionDenied, Unauthenticated
from services.ingest.tenants import TenantStore
from tests.ingest.conftest import IngestHarness, refused, send_request


async def test_a_new_key_starts_with_its_recognisable_prefix(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    reply = await harness.tenants.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
        parent=tenant.name, api_key=tenants_pb2.ApiKey(scopes=[tenants_pb2.API_KEY_SCOPE_SEND])),
        metadata=tenant.auth)
    assert reply.api_key.prefix.startswith("esp_live_")
    assert reply.secret.startswith(reply.api_key.prefix + "_")
    assert len(reply.secret) > len(reply.api_key.prefix) + 30


async def test_the_secret_is_shown_once_and_only_its_hash_is_stored(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    reply = await harness.tenants.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
        parent=tenant.name, api_key=tenants_pb2.ApiKey(scopes=[tenants_pb2.API_KEY_SCOPE_SEND])),
        metadata=tenant.auth)
    key_id = reply.api_key.name.rsplit("/", 1)[1]
    secret_part = reply.secret.removeprefix(reply.api_key.prefix + "_")
    listed = await harness.tenants.ListApiKeys(tenants_pb2.ListApiKeysRequest(parent=tenant.name),
                                               metadata=tenant.auth)
    assert reply.secret not in str(listed) and secret_part not in str(listed)
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM ingest.api_keys WHERE id = %s", (key_id,))
        row = await cur.fetchone()
    assert row is not None
    assert not any(isinstance(v, str) and secret_part in v for v in row)
    assert hashlib.sha256(secret_part.encode()).digest() in [bytes(v) for v in row if isinstance(v, bytes | memoryview)]


async def test_keys_are_listed_page_by_page_with_their_scopes(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_READ])
    await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_SEND])
    seen: list[tenants_pb2.ApiKey] = []
    token = ""
    for _ in range(5):
        page = await harness.tenants.ListApiKeys(tenants_pb2.ListApiKeysRequest(
            parent=tenant.name, page_size=2, page_token=token), metadata=tenant.auth)
        seen += page.api_keys
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 3
    assert sorted(tuple(k.scopes) for k in seen) == sorted([
        (tenants_pb2.API_KEY_SCOPE_SEND, tenants_pb2.API_KEY_SCOPE_READ, tenants_pb2.API_KEY_SCOPE_ADMIN),
        (tenants_pb2.API_KEY_SCOPE_READ,), (tenants_pb2.API_KEY_SCOPE_SEND,)])


async def test_a_key_without_the_send_scope_cannot_send(harness: IngestHarness):
    tenant = await harness.new_tenant()
    reader = await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_READ])
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=(("authorization",
                                                                                f"Bearer {reader}"),)))
    assert failed.code == grpc.StatusCode.PERMISSION_DENIED
    assert failed.info.reason == "MISSING_SCOPE"
    assert await harness.message_rows(tenant) == 0


async def test_a_send_key_cannot_create_keys(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    sender = await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_SEND])
    failed = await refused(harness.tenants.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
        parent=tenant.name, api_key=tenants_pb2.ApiKey(scopes=[tenants_pb2.API_KEY_SCOPE_ADMIN])),
        metadata=(("authorization", f"Bearer {sender}"),)))
    assert failed.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_revoked_key_stops_working_at_once_on_the_replica_that_revoked_it(harness: IngestHarness):
    tenant = await harness.new_tenant()
    key = await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_SEND])
    auth = (("authorization", f"Bearer {key}"),)
    await harness.messages.SendEmail(send_request(), metadata=auth)
    key_id = key.split("_")[2]
    revoked = await harness.tenants.RevokeApiKey(tenants_pb2.RevokeApiKeyRequest(
        name=f"{tenant.name}/apiKeys/{key_id}"), metadata=tenant.auth)
    assert revoked.revoked
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=auth))
    assert failed.code == grpc.StatusCode.UNAUTHENTICATED
    assert failed.info.reason == "API_KEY_REVOKED"


async def test_a_revoked_key_stops_working_on_other_replicas_once_their_cache_expires(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    key = await harness.new_key(tenant.id, [tenants_pb2.API_KEY_SCOPE_SEND])
    other_replica = TenantStore(harness.parts.pool, cache_ttl_s=0.5)
    assert (await other_replica.authenticate(key)).tenant_id == tenant.id  # now cached there
    await harness.parts.tenants.revoke_key(tenant.id, key.split("_")[2])
    await asyncio.sleep(other_replica.cache_ttl_s)
    with pytest.raises(Unauthenticated) as caught:
        await other_replica.authenticate(key)
    assert caught.value.reason == "API_KEY_REVOKED"


async def test_using_a_key_records_when_it_was_last_used(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await harness.send(tenant, send_request())
    for _ in range(100):  # written in the background, off the request's path
        listed = await harness.tenants.ListApiKeys(tenants_pb2.ListApiKeysRequest(parent=tenant.name),
                                                   metadata=tenant.auth)
        if listed.api_keys[0].HasField("last_used_time"):
            break
        await asyncio.sleep(0.02)
    assert listed.api_keys[0].HasField("last_used_time")


async def test_a_forged_secret_for_a_real_key_id_is_unauthenticated(harness: IngestHarness):
    tenant = await harness.new_tenant()
    forged = tenant.key[:-4] + ("AAAA" if not tenant.key.endswith("AAAA") else "BBBB")
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=(("authorization",
                                                                                f"Bearer {forged}"),)))
    assert failed.code == grpc.StatusCode.UNAUTHENTICATED
    assert failed.info.reason == "INVALID_API_KEY"


async def test_keys_of_a_disabled_tenant_are_refused(harness: IngestHarness):
    tenant = await harness.new_tenant()
    current = await harness.tenants.GetTenant(tenants_pb2.GetTenantRequest(name=tenant.name), metadata=harness.admin)
    await harness.tenants.UpdateTenant(tenants_pb2.UpdateTenantRequest(tenant=replace_proto(current, disabled=True)),
                                       metadata=harness.admin)
    fresh_replica = TenantStore(harness.parts.pool, cache_ttl_s=0.5)
    with pytest.raises(PermissionDenied) as caught:
        await fresh_replica.authenticate(tenant.key)
    assert caught.value.reason == "TENANT_DISABLED"


def replace_proto(message: tenants_pb2.Tenant, **changes: object) -> tenants_pb2.Tenant:
    copy = tenants_pb2.Tenant()
    copy.CopyFrom(message)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy

