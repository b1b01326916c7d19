"""Fixtures for the sending-domain tests: a real router (``build_app`` served on loopback, real Postgres and NATS)
asking a real authoritative DNS server (NSD) whose zones the tests write, and a mesh's public edge (services as
processes) whose router asks that server too."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from esp.v1 import domains_pb2, domains_pb2_grpc

from dev import mesh as m
from dev import seed
from dev.dns_server import AuthoritativeDns, Record
from dev.migrate import SERVICES_WITH_SCHEMAS
from libs.common.auth import Principal
from libs.common.db import migrate_services
from libs.common.secret_box import generate_key_setting
from services.router.config import RouterSettings
from services.router.server import build_app
from tests.conftest import S3Server, running_dns
from tests.serving import served

ZONES = ["acme.test", "recheck.test", "rotate.test", "auto.test", "taken.test", "secret.test", "down.test",
         "mail.test", "sender.example", "cli.example"]
"""One zone per behaviour, so tests never see each other's records. Sending tests use ``.example``: ingest refuses
addresses under ``.test`` (a special-use name, RFC 6761) as malformed."""
RECHECK_INTERVAL_S = 0.3
"""The router's re-check interval in these tests: a verified domain is looked at again this soon."""


@dataclass
class Router:
    """A running router and how to call it as a tenant."""

    address: str
    stub: domains_pb2_grpc.DomainServiceStub
    dsn: str
    nats_url: str
    settings: RouterSettings

    def as_tenant(self, tenant_id: str) -> tuple[tuple[str, str], ...]:
        """Call metadata of ``tenant_id``'s admin (what the edge forwards)."""
        return Principal(tenant_id=tenant_id, scopes=frozenset({"admin", "read", "send"})).as_metadata()


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    yield from running_dns(tmp_path_factory, ZONES)


@pytest.fixture(scope="module")
async def router(new_database: Callable[[], str], nats_url: str, redis_url: str, run_id: str,
                 dns_server: AuthoritativeDns) -> AsyncIterator[Router]:
    dsn = new_database()
    await migrate_services(dsn, ["router"])
    settings = RouterSettings(postgres_dsn=dsn, nats_url=nats_url, redis_url=redis_url,
                              namespace=f"{run_id}dom{secrets.token_hex(2)}", secrets_keys=generate_key_setting("t"),
                              dns_resolver=f"127.0.0.1:{dns_server.port}", spf_include="spf.platform.test",
                              domain_check_interval_s=RECHECK_INTERVAL_S,
                              pending_domain_check_interval_s=RECHECK_INTERVAL_S, domain_check_poll_s=0.1)
    async with served(await build_app(settings)) as (address, _):
        async with grpc.aio.insecure_channel(address) as channel:
            yield Router(address, domains_pb2_grpc.DomainServiceStub(channel), dsn, nats_url, settings)


def published(domain: domains_pb2.Domain, *, skip: Callable[[domains_pb2.DomainRecord], bool] = lambda r: False,
              override: Callable[[domains_pb2.DomainRecord], str | None] = lambda r: None) -> list[Record]:
    """The zone records of ``domain``'s records to publish (its zone is the domain itself), less ``skip``ped ones,
    with ``override``'s values where it gives one."""
    zone = domain.domain
    records = []
    for r in domain.records:
        if skip(r):
            continue
        name = "@" if r.name == zone else r.name.removesuffix(f".{zone}")
        records.append(Record(name, "TXT", override(r) or r.value))
    return records


async def create(router: Router, tenant: str, domain: str, *, ed25519: bool = False) -> domains_pb2.Domain:
    """Add ``domain`` for ``tenant``."""
    return await router.stub.CreateDomain(
        domains_pb2.CreateDomainRequest(domain=domains_pb2.Domain(domain=domain, ed25519=ed25519)),
        metadata=router.as_tenant(tenant))


async def verify(router: Router, tenant: str, domain: str) -> domains_pb2.Domain:
    """Check ``domain`` now."""
    return await router.stub.VerifyDomain(domains_pb2.VerifyDomainRequest(name=f"domains/{domain}"),
                                          metadata=router.as_tenant(tenant))


async def get(router: Router, tenant: str, domain: str) -> domains_pb2.Domain:
    return await router.stub.GetDomain(domains_pb2.GetDomainRequest(name=f"domains/{domain}"),
                                       metadata=router.as_tenant(tenant))


def new_tenant() -> str:
    return f"t{secrets.token_hex(4)}"


@dataclass
class Edge:
    """A mesh's public edge and a tenant's API key."""

    config: m.MeshConfig
    api_key: str

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    def key_of_new_tenant(self) -> str:
        """An API key of a fresh tenant (no domains yet)."""
        tenant = new_tenant()
        with self.channel() as channel:
            seed.ensure_tenant(channel, self.config.admin_token, tenant)
            return seed.create_api_key(channel, self.config.admin_token, tenant)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.config.ports['ingest']}")


@pytest.fixture(scope="session")
def edge(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
         dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    namespace = f"{run_id}vs{secrets.token_hex(2)}"
    config = m.MeshConfig(
        postgres_dsn=new_database(), redis_url=redis_url, nats_url=nats_url, s3_endpoint=s3_server.endpoint,
        namespace=namespace, admin_token=secrets.token_hex(16), ports={n: m.free_port() for n in m.GRPC_PORTS},
        gateway_port=m.free_port(), webhook_port=m.free_port(), log_dir=Path(tmp_path_factory.mktemp("mesh-logs")),
        services=("ledger", "router", "reports", "campaigns", "ingest", "gateway"),
        extra_env={"ESP_S3_BUCKET": f"{namespace}-attachments", "ESP_SHUTDOWN_GRACE_S": "3",
                   "ESP_DNS_RESOLVER": f"127.0.0.1:{dns_server.port}"})
    asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
    mesh = m.Mesh(config)
    try:
        mesh.start()
        with grpc.insecure_channel(f"127.0.0.1:{config.ports['ingest']}") as channel:
            seed.ensure_tenant(channel, config.admin_token, "sender-co")
            api_key = seed.create_api_key(channel, config.admin_token, "sender-co")
            seed.top_up(channel, config.admin_token, "sender-co", 1_000_000, "sender-co-initial")
            seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                id="sink", type="smtp", endpoint=f"127.0.0.1:{m.free_port()}", options={"tls": "none"}))
        yield Edge(config, api_key)
    finally:
        mesh.stop()
        asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))
