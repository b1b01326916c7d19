"""Per-provider readiness of tenant domains: a real router (``build_app`` on loopback, real Postgres and NATS)
registers each verified domain at the providers of the provider simulator and reports what they say, to routing
(``RouteEmail``) and to the domain's view (``GetDomain``). Domains verify against NSD on loopback."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from esp.v1 import common_pb2, domains_pb2, domains_pb2_grpc, providers_pb2, providers_pb2_grpc
from google.protobuf import field_mask_pb2

from dev.dns_server import AuthoritativeDns
from dev.simulator import RunningSimulator, run_simulator
from libs.common.auth import PLATFORM_ADMIN, Principal
from libs.common.db import create_pool, migrate_services
from libs.common.secret_box import generate_key_setting
from services.router.config import RouterSettings
from services.router.server import build_app
from tests.conftest import running_dns
from tests.domains.conftest import create, new_tenant, published, verify
from tests.progress import wait_for_progress_async
from tests.serving import served

ZONES = ["one.test", "pending.test", "refused.test", "deleted.test", "removed.test", "twice.test", "down.test",
         "stopped.test", "records.test",
         "token.test"]
STALL_S = 20.0
ADMIN = Principal(tenant_id="", scopes=frozenset({PLATFORM_ADMIN})).as_metadata()


@dataclass
class ReadinessRouter:
    """A router with the simulator's providers to register at."""

    domains: domains_pb2_grpc.DomainServiceStub
    providers: providers_pb2_grpc.ProviderServiceStub
    sim: RunningSimulator
    dns: AuthoritativeDns
    dsn: str
    settings: RouterSettings

    @property
    def stub(self) -> domains_pb2_grpc.DomainServiceStub:
        """What ``tests.domains.conftest``'s helpers call."""
        return self.domains

    def as_tenant(self, tenant_id: str) -> tuple[tuple[str, str], ...]:
        return Principal(tenant_id=tenant_id, scopes=frozenset({"admin", "read", "send"})).as_metadata()

    async def add_provider(self, personality: str, price: int, **credentials: str) -> str:
        """A provider reaching ``personality`` (credentials as the simulator's, ``credentials`` overriding)."""
        config = self.sim.provider_config(personality)
        provider_id = f"{personality}-{secrets.token_hex(3)}"
        await self.providers.CreateProvider(providers_pb2.CreateProviderRequest(
            provider_id=provider_id, provider=providers_pb2.Provider(
                type=config.type, endpoint=config.endpoint, region=config.region,
                credentials={**config.credentials, **credentials}, options=dict(config.options),
                price_per_email_micros=price)), metadata=ADMIN)
        return provider_id

    async def remove_provider(self, provider_id: str) -> None:
        await self.providers.DeleteProvider(providers_pb2.DeleteProviderRequest(name=f"providers/{provider_id}"),
                                            metadata=ADMIN)

    async def verified(self, tenant: str, zone: str) -> None:
        """``zone`` added for ``tenant``, its records published and verified."""
        domain = await create(self, tenant, zone)  # type: ignore[arg-type]
        self.dns.publish(zone, published(domain))
        assert (await verify(self, tenant, zone)).state == domains_pb2.DOMAIN_STATE_VERIFIED  # type: ignore[arg-type]

    async def readiness(self, tenant: str, zone: str) -> dict[str, tuple[str, str]]:
        """What the domain's view says per provider id: (state, detail)."""
        domain = await self.domains.GetDomain(domains_pb2.GetDomainRequest(name=f"domains/{zone}"),
                                              metadata=self.as_tenant(tenant))
        return {r.provider.removeprefix("providers/"): (r.state, r.detail) for r in domain.provider_readiness}

    async def wait_readiness(self, tenant: str, zone: str, done: Callable[[dict[str, tuple[str, str]]], bool],
                             what: str) -> dict[str, tuple[str, str]]:
        return await wait_for_progress_async(lambda: self.readiness(tenant, zone), done, what=what,
                                             stall_s=STALL_S)

    async def route(self, tenant: str, sender: str) -> providers_pb2.RouteEmailResponse:
        return await self.providers.RouteEmail(providers_pb2.RouteEmailRequest(
            tenant=f"tenants/{tenant}", from_address=sender, message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
            message_bytes=2_000, recipient_count=1), metadata=ADMIN)


@pytest.fixture(scope="module")
def readiness_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    yield from running_dns(tmp_path_factory, ZONES)


@pytest.fixture(scope="module")
async def ready_router(new_database: Callable[[], str], nats_url: str, redis_url: str, run_id: str,
                       readiness_dns: AuthoritativeDns) -> AsyncIterator[ReadinessRouter]:
    dsn = new_database()
    await migrate_services(dsn, ["router"])
    settings = RouterSettings(postgres_dsn=dsn, nats_url=nats_url, redis_url=redis_url,
                              namespace=f"{run_id}rdy{secrets.token_hex(2)}", secrets_keys=generate_key_setting("t"),
                              dns_resolver=f"127.0.0.1:{readiness_dns.port}", spf_include="spf.platform.test",
                              domain_check_poll_s=0.1, domain_readiness_poll_s=0.2,
                              domain_readiness_recheck_s=0.3)
    async with run_simulator(seed=23) as sim, served(await build_app(settings)) as (address, _):
        async with grpc.aio.insecure_channel(address) as channel:
            yield ReadinessRouter(domains_pb2_grpc.DomainServiceStub(channel),
                                  providers_pb2_grpc.ProviderServiceStub(channel), sim, readiness_dns, dsn,
                                  settings)


def _states(seen: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {provider: state for provider, (state, _) in seen.items()}


async def test_a_domain_ready_at_one_provider_only_routes_there_though_another_is_cheaper(
        ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    await r.sim.client.hold_domain("ses-1", "one.test", "pending")
    cheap = await r.add_provider("ses-1", price=50)
    dear = await r.add_provider("postmark-1", price=500)
    try:
        await r.verified(tenant, "one.test")
        await r.wait_readiness(tenant, "one.test", lambda s: _states(s) == {cheap: "pending", dear: "ready"},
                               "ready at the dear provider, pending at the cheap one")

        route = await r.route(tenant, "news@one.test")

        assert [s.provider for s in route.ranked] == [f"providers/{dear}"]
        why = {s.provider: s.excluded_reason for s in route.excluded}[f"providers/{cheap}"]
        assert why.startswith("not ready for one.test: pending (VerifiedForSendingStatus false, DKIM PENDING")
    finally:
        await r.remove_provider(cheap)
        await r.remove_provider(dear)


async def test_a_pending_domain_becomes_ready_once_the_provider_verifies_it(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    await r.sim.client.hold_domain("mailgun-us", "pending.test", "pending")
    provider = await r.add_provider("mailgun-us", price=50)
    try:
        await r.verified(tenant, "pending.test")
        pending = await r.wait_readiness(tenant, "pending.test", lambda s: _states(s) == {provider: "pending"},
                                         "pending at Mailgun")
        assert "state unverified" in pending[provider][1]

        await r.sim.client.release_domain("mailgun-us", "pending.test")

        await r.wait_readiness(tenant, "pending.test", lambda s: _states(s) == {provider: "ready"}, "ready at Mailgun")
        assert [s.provider for s in (await r.route(tenant, "a@pending.test")).ranked] == [f"providers/{provider}"]
    finally:
        await r.remove_provider(provider)


async def test_a_ready_domain_the_provider_stops_sending_for_leaves_routing(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    provider = await r.add_provider("ses-1", price=50)
    try:
        await r.verified(tenant, "stopped.test")
        await r.wait_readiness(tenant, "stopped.test", lambda s: _states(s) == {provider: "ready"}, "ready at SES")

        await r.sim.client.hold_domain("ses-1", "stopped.test", "failed", "HOST_NOT_FOUND")

        seen = await r.wait_readiness(tenant, "stopped.test", lambda s: _states(s) == {provider: "failed"},
                                      "failed at SES once asked again")
        assert "HOST_NOT_FOUND" in seen[provider][1]
        assert (await r.route(tenant, "a@stopped.test")).ranked == []
    finally:
        await r.remove_provider(provider)


async def test_the_domains_view_shows_the_dns_records_each_provider_wants(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    await r.sim.client.hold_domain("ses-1", "records.test", "pending")
    ses = await r.add_provider("ses-1", price=50)
    sendgrid = await r.add_provider("sendgrid-1", price=60)
    try:
        await r.verified(tenant, "records.test")
        await r.wait_readiness(tenant, "records.test", lambda s: _states(s) == {ses: "pending", sendgrid: "ready"},
                               "answered by both providers")

        domain = await r.domains.GetDomain(domains_pb2.GetDomainRequest(name="domains/records.test"),
                                           metadata=r.as_tenant(tenant))

        wanted = {x.provider.removeprefix("providers/"): [(d.type, d.name, d.value) for d in x.records]
                  for x in domain.provider_readiness}
        assert len(wanted[ses]) == 3
        assert all(t == "CNAME" and n.endswith("._domainkey.records.test") and v.endswith(".dkim.amazonses.com")
                   for t, n, v in wanted[ses])
        assert {n for _, n, _ in wanted[sendgrid]} >= {"s1._domainkey.records.test", "s2._domainkey.records.test"}
    finally:
        await r.remove_provider(ses)
        await r.remove_provider(sendgrid)


async def test_a_provider_given_the_credentials_it_lacked_registers_the_domain(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    server_token = r.sim.provider_config("postmark-1").credentials["server_token"]
    provider = await r.add_provider("postmark-1", price=100, account_token="")
    try:
        await r.verified(tenant, "token.test")
        seen = await r.wait_readiness(tenant, "token.test", lambda s: _states(s) == {provider: "failed"},
                                      "failed: no account token")
        assert "account_token" in seen[provider][1]

        await r.providers.UpdateProvider(providers_pb2.UpdateProviderRequest(
            provider=providers_pb2.Provider(name=f"providers/{provider}", credentials={
                "server_token": server_token, "account_token": "postmark-1-account"}),
            update_mask=field_mask_pb2.FieldMask(paths=["credentials"])), metadata=ADMIN)

        await r.wait_readiness(tenant, "token.test", lambda s: _states(s) == {provider: "ready"},
                               "ready with the account token")
    finally:
        await r.remove_provider(provider)


async def test_a_refused_registration_is_failed_with_the_providers_words(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    await r.sim.client.hold_domain("sendgrid-1", "refused.test", "failed", "domain is on a block list")
    provider = await r.add_provider("sendgrid-1", price=50)
    try:
        await r.verified(tenant, "refused.test")

        seen = await r.wait_readiness(tenant, "refused.test", lambda s: _states(s) == {provider: "failed"},
                                      "failed at SendGrid")

        assert "domain is on a block list" in seen[provider][1]
        route = await r.route(tenant, "a@refused.test")
        assert "domain is on a block list" in {s.provider: s.excluded_reason for s in route.excluded}[
            f"providers/{provider}"]
    finally:
        await r.remove_provider(provider)


async def test_a_deleted_provider_takes_its_readiness_entries_with_it(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    kept = await r.add_provider("postmark-1", price=100)
    deleted = await r.add_provider("ses-1", price=50)
    try:
        await r.verified(tenant, "deleted.test")
        await r.wait_readiness(tenant, "deleted.test", lambda s: _states(s) == {kept: "ready", deleted: "ready"},
                               "ready at both providers")

        await r.remove_provider(deleted)

        await r.wait_readiness(tenant, "deleted.test", lambda s: _states(s) == {kept: "ready"},
                               "the deleted provider's entry gone")
        pool = await create_pool(r.dsn, min_size=1, max_size=1, name="test")
        try:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT provider_id FROM router.domain_registrations WHERE domain = %s",
                                         ("deleted.test",))
                assert [row[0] for row in await cur.fetchall()] == [kept]
        finally:
            await pool.close()
    finally:
        await r.remove_provider(kept)


async def test_a_removed_domain_takes_its_readiness_entries_with_it(ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    provider = await r.add_provider("postmark-1", price=100)
    try:
        await r.verified(tenant, "removed.test")
        await r.wait_readiness(tenant, "removed.test", lambda s: _states(s) == {provider: "ready"}, "ready")

        await r.domains.DeleteDomain(domains_pb2.DeleteDomainRequest(name="domains/removed.test"),
                                     metadata=r.as_tenant(tenant))

        async def rows() -> int:
            pool = await create_pool(r.dsn, min_size=1, max_size=1, name="test")
            try:
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT count(*) FROM router.domain_registrations WHERE domain = %s",
                                             ("removed.test",))
                    found = await cur.fetchone()
                    return int(found[0]) if found else 0
            finally:
                await pool.close()

        await wait_for_progress_async(rows, lambda n: n == 0, what="the removed domain's registrations gone",
                                      stall_s=STALL_S)
        await r.verified(tenant, "removed.test")  # added again: registered again, the provider says it has it
        await r.wait_readiness(tenant, "removed.test", lambda s: _states(s) == {provider: "ready"}, "ready again")
    finally:
        await r.remove_provider(provider)


async def test_a_provider_that_cannot_be_asked_is_retried_and_routes_nothing_meanwhile(
        ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    await r.sim.client.set_knobs("mailgun-eu", outage=True)
    provider = await r.add_provider("mailgun-eu", price=50)
    try:
        await r.verified(tenant, "down.test")
        route = await r.route(tenant, "a@down.test")
        assert {s.provider: s.excluded_reason for s in route.excluded}[f"providers/{provider}"] == (
            "not ready for down.test: not registered at the provider yet")

        await r.sim.client.set_knobs("mailgun-eu", outage=False)

        await r.wait_readiness(tenant, "down.test", lambda s: _states(s) == {provider: "ready"},
                               "ready once Mailgun answers")
    finally:
        await r.sim.client.set_knobs("mailgun-eu", outage=False)
        await r.remove_provider(provider)


async def test_route_email_refuses_a_from_address_without_a_tenant(ready_router: ReadinessRouter) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ready_router.providers.RouteEmail(providers_pb2.RouteEmailRequest(
            from_address="a@one.test", message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL), metadata=ADMIN)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant" in (raised.value.details() or "")


async def test_route_email_refuses_a_from_address_that_is_no_address(ready_router: ReadinessRouter) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ready_router.providers.RouteEmail(providers_pb2.RouteEmailRequest(
            tenant="tenants/t1", from_address="one.test", message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL),
            metadata=ADMIN)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from_address" in (raised.value.details() or "")


async def test_two_router_replicas_share_the_registrations_and_report_the_same(
        ready_router: ReadinessRouter) -> None:
    r, tenant = ready_router, new_tenant()
    personalities = ("ses-1", "mailgun-us", "sendgrid-1", "postmark-1")
    async with served(await build_app(r.settings)) as (address, _), grpc.aio.insecure_channel(address) as channel:
        providers = [await r.add_provider(p, price=100) for p in personalities]
        try:
            await r.verified(tenant, "twice.test")
            await r.wait_readiness(tenant, "twice.test", lambda s: _states(s) == dict.fromkeys(providers, "ready"),
                                   "ready at all four providers")

            other = domains_pb2_grpc.DomainServiceStub(channel)

            async def seen_by_the_other() -> dict[str, str]:
                domain = await other.GetDomain(domains_pb2.GetDomainRequest(name="domains/twice.test"),
                                               metadata=r.as_tenant(tenant))
                return {x.provider.removeprefix("providers/"): x.state for x in domain.provider_readiness}

            await wait_for_progress_async(seen_by_the_other, lambda s: s == dict.fromkeys(providers, "ready"),
                                          what="the other replica's view", stall_s=STALL_S)
        finally:
            for provider in providers:
                await r.remove_provider(provider)
