"""Endpoint URLs and connection addresses under the production rule (no internal destinations)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from libs.common.db import migrate_services
from libs.common.errors import InvalidArgument
from libs.common.secret_box import SecretBox, generate_key_setting
from services.webhooks.destinations import DestinationPolicy, RefusedDestination, refused_address
from services.webhooks.endpoints import EndpointSpec, EndpointStore
from services.webhooks.transport import WebhookTransport

PRODUCTION = DestinationPolicy(allow_internal=False)


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "metadata"), ("169.254.10.1", "link-local"),
    ("fe80::1", "link-local"), ("100.64.0.1", "private"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "private"),
    ("224.0.0.1", "public"),
])
def test_internal_addresses_are_refused_with_the_rule_they_break(address: str, why: str) -> None:
    assert why in refused_address(address)


def test_a_public_address_is_allowed() -> None:
    assert refused_address("93.184.216.34") == ""


@pytest.mark.parametrize(("url", "rule"), [
    ("http://example.com/hook", "https"), ("ftp://example.com/", "https"),
    ("https://user:pw@example.com/", "credentials"),
    ("https://example.com:99999/", "parsed"), ("not a url", "https"),
])
def test_urls_breaking_a_rule_are_refused_naming_it(url: str, rule: str) -> None:
    with pytest.raises(RefusedDestination, match=rule):
        PRODUCTION.check_url(url)


@pytest.mark.parametrize("url", ["https://127.0.0.1/hook", "https://localhost/hook", "https://[::1]:8443/",
                                 "https://169.254.169.254/latest/meta-data"])
async def test_hosts_resolving_inside_are_refused(url: str) -> None:
    with pytest.raises(RefusedDestination, match="resolves to"):
        await PRODUCTION.check(url)


async def test_the_transport_refuses_to_connect_to_an_internal_address() -> None:
    transport = WebhookTransport(PRODUCTION, timeout_s=2, max_connections=2)
    try:
        result = await transport.post("https://localhost:1/hook", [], b"{}")
    finally:
        await transport.close()
    assert result.refused and result.status_code == 0 and "loopback" in result.error


async def test_creating_an_endpoint_to_an_internal_url_is_invalid_and_stores_nothing(
        new_database: Callable[[], str]) -> None:
    from psycopg_pool import AsyncConnectionPool

    dsn = new_database()
    await migrate_services(dsn, ["webhooks"])
    async with AsyncConnectionPool(dsn, open=False) as pool:
        store = EndpointStore(pool, SecretBox.from_setting(generate_key_setting()), PRODUCTION)
        with pytest.raises(InvalidArgument) as raised:
            await store.create("acme", EndpointSpec(url="https://10.0.0.5/hook"))
        assert "private" in str(raised.value)
        with pytest.raises(InvalidArgument, match="https"):
            await store.create("acme", EndpointSpec(url="http://example.com/hook"))
        assert await store.list("acme", 10) == []


async def test_an_endpoints_secret_is_stored_sealed(new_database: Callable[[], str]) -> None:
    from psycopg_pool import AsyncConnectionPool

    dsn = new_database()
    await migrate_services(dsn, ["webhooks"])
    async with AsyncConnectionPool(dsn, open=False) as pool:
        store = EndpointStore(pool, SecretBox.from_setting(generate_key_setting()), DestinationPolicy(True))
        created = await store.create("acme", EndpointSpec(url="http://127.0.0.1:9/hook"))
        async with pool.connection() as conn:
            rows = await (await conn.execute("SELECT sealed FROM webhooks.endpoint_secrets")).fetchall()
    secret = created.signing_secret.encode()
    assert rows and all(secret not in bytes(r[0]) and secret.removeprefix(b"whsec_") not in bytes(r[0])
                        for r in rows)
