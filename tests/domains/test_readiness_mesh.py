"""The issue's test, through the real mesh: an email whose ``From`` domain is ready at only one provider goes to that
provider even when another is cheaper, and ``RouteEmail``'s explanation says why.

Every service runs as a process (``dev/mesh.py``); the tenant adds and verifies its domain through the edge
against NSD on loopback; the providers are personalities of the provider simulator, which holds the domain pending
at SES (the cheap one) and verifies it at once at Postmark (the dear one).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from esp.v1 import (
    common_pb2,
    domains_pb2,
    domains_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
)

from dev.dns_server import AuthoritativeDns
from dev.simulator import RunningSimulator, run_simulator
from tests.conftest import S3Server, running_dns
from tests.domains.conftest import published
from tests.e2e.conftest import RunningMesh, build_mesh_config, smtp_sink, start_mesh
from tests.progress import wait_for_progress_async

__all__ = ["smtp_sink"]  # the e2e SMTP sink fixture, which start_mesh's seeded provider points at

ZONE = "readiness-shop.com"
"""A name addresses may use (ingest refuses the special-use .test in an address); served only by the NSD here."""
SENDER = f"news@{ZONE}"
STALL_S = 30.0


@pytest.fixture(scope="module")
def shop_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    yield from running_dns(tmp_path_factory, [ZONE])


@pytest.fixture(scope="module")
async def providers_sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(seed=42) as sim:
        yield sim


@pytest.fixture(scope="module")
def readiness_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                   smtp_sink: tuple[int, Path], shop_dns: AuthoritativeDns, providers_sim: RunningSimulator,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """Every service but the REST gateway, asking NSD about domains and the providers every 0.2 s; no provider
    but the ones the test adds."""
    smtp_port, maildir = smtp_sink
    config = build_mesh_config(new_database(), redis_url, nats_url, s3_server, f"{run_id}rdm",
                               tmp_path_factory.mktemp("readiness-mesh-logs"))
    config.services = tuple(s for s in config.services if s != "gateway")
    config.extra_env.update({"ESP_DNS_RESOLVER": f"127.0.0.1:{shop_dns.port}", "ESP_DOMAIN_READINESS_POLL_S": "0.2",
                             "ESP_LOG_LEVEL": "WARNING"})
    running = start_mesh(config, maildir, smtp_port)
    try:
        with grpc.insecure_channel(running.endpoint) as channel:  # the seeded relay would send for any domain
            providers_pb2_grpc.ProviderServiceStub(channel).DeleteProvider(
                providers_pb2.DeleteProviderRequest(name="providers/sink"), metadata=running.admin(), timeout=10)
    except BaseException:
        running.mesh.stop()
        raise
    yield running
    running.stop()


async def _add_provider(channel: grpc.aio.Channel, mesh: RunningMesh, sim: RunningSimulator, personality: str,
                        price: int) -> str:
    config = sim.provider_config(personality)
    provider_id = f"{personality}-{secrets.token_hex(3)}"
    await providers_pb2_grpc.ProviderServiceStub(channel).CreateProvider(providers_pb2.CreateProviderRequest(
        provider_id=provider_id, provider=providers_pb2.Provider(
            type=config.type, endpoint=config.endpoint, region=config.region, credentials=dict(config.credentials),
            options={**config.options, "timeout_s": "5"}, price_per_email_micros=price)),
        metadata=mesh.admin(), timeout=10)
    return provider_id


async def test_an_email_ready_at_one_provider_only_goes_there_though_another_is_cheaper(
        readiness_mesh: RunningMesh, providers_sim: RunningSimulator, shop_dns: AuthoritativeDns) -> None:
    mesh, sim = readiness_mesh, providers_sim
    await sim.client.hold_domain("ses-1", ZONE, "pending")
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        domains = domains_pb2_grpc.DomainServiceStub(channel)
        added = await domains.CreateDomain(domains_pb2.CreateDomainRequest(domain=domains_pb2.Domain(domain=ZONE)),
                                           metadata=mesh.auth(), timeout=10)
        shop_dns.publish(ZONE, published(added))
        verified = await domains.VerifyDomain(domains_pb2.VerifyDomainRequest(name=f"domains/{ZONE}"),
                                              metadata=mesh.auth(), timeout=10)
        assert verified.state == domains_pb2.DOMAIN_STATE_VERIFIED
        cheap = await _add_provider(channel, mesh, sim, "ses-1", price=50)
        dear = await _add_provider(channel, mesh, sim, "postmark-1", price=500)
        providers = providers_pb2_grpc.ProviderServiceStub(channel)

        async def route() -> providers_pb2.RouteEmailResponse:
            return await providers.RouteEmail(providers_pb2.RouteEmailRequest(
                tenant=f"tenants/{mesh.tenant}", from_address=SENDER,
                message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, message_bytes=2_000, recipient_count=1),
                metadata=mesh.admin(), timeout=10)

        decision = await wait_for_progress_async(
            route, lambda r: [s.provider for s in r.ranked] == [f"providers/{dear}"]
            and any(s.provider == f"providers/{cheap}" and "pending" in s.excluded_reason for s in r.excluded),
            what="the dear provider ready, the cheap one pending", stall_s=STALL_S)
        why = {s.provider: s.excluded_reason for s in decision.excluded}[f"providers/{cheap}"]
        assert why.startswith(f"not ready for {ZONE}: pending (VerifiedForSendingStatus false, DKIM PENDING")

        reply = await messages_pb2_grpc.MessageServiceStub(channel).SendEmail(messages_pb2.SendEmailRequest(
            message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, subject="Your order", text_body="Shipped.",
            to=[common_pb2.EmailAddress(email="rcpt@example.net")],
            **{"from": common_pb2.EmailAddress(email=SENDER)}), metadata=mesh.auth(), timeout=10)
        message_id = reply.message.id

    async def taken() -> dict[str, int]:
        return {name: sum(m["esp_message_id"] == message_id for m in await sim.client.delivered_messages(name))
                for name in ("ses-1", "postmark-1")}

    seen = await wait_for_progress_async(taken, lambda t: sum(t.values()) > 0, what=f"{message_id} delivered",
                                         stall_s=STALL_S)
    assert seen == {"ses-1": 0, "postmark-1": 1}
