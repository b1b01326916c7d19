"""The sender signs a tenant's email with the DKIM keys of the verified domain covering its ``From`` (issue 23,
point 3): the tenant's domain entry in the sending-domains bucket, its public keys published in a real DNS server
(NSD on loopback), the email delivered through the real sender to a real SMTP relay, and what the relay stored
verified by dkimpy's own verifier, which looks the keys up in that DNS server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from esp.v1 import messages_pb2
from prometheus_client import REGISTRY

from dev.dns_server import AuthoritativeDns, Record
from libs.common.secret_box import SecretBox, generate_key_setting
from libs.common.sending_domains import (
    DomainState,
    SendingDomain,
    SendingDomains,
    SigningKey,
    bucket_name,
    domain_key,
)
from libs.providers.dkim import generate_key
from tests.conftest import running_dns
from tests.providers.dkim_checks import received, relay_at, signature_tags, verify_through_dns
from tests.sender.conftest import World, send_task
from tests.sender.dkim_world import add_relay, sending_domains

ZONE = "shop.example"
"""The tenant's verified domain, served by the test's DNS server."""
FROM = "news@mail.shop.example"
"""A subdomain of it: ``d=shop.example`` aligns with it under DMARC's relaxed alignment."""
SANDBOX = "sandbox.esp.example"
RSA_PEM, RSA_RECORD = generate_key("rsa-sha256")
ED_PEM, ED_RECORD = generate_key("ed25519-sha256")
OLD_PEM, OLD_RECORD = generate_key("rsa-sha256")
SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    """NSD serving the tenant's zone with its three DKIM public keys (two active, one retired by a rotation)."""
    for server in running_dns(tmp_path_factory, [ZONE]):
        server.publish(ZONE, [Record("esp-rsa._domainkey", "TXT", RSA_RECORD),
                              Record("esp-ed._domainkey", "TXT", ED_RECORD),
                              Record("esp-old._domainkey", "TXT", OLD_RECORD)])
        yield server


@dataclass
class Signing:
    """The world with a sending-domains view, an SMTP relay as its one provider, and the relay's maildir."""

    world: World
    domains: SendingDomains
    box: SecretBox
    maildir: Path

    async def publish(self, entry: SendingDomain, box: SecretBox | None = None) -> None:
        """Write the tenant's domain entry to the bucket (as the router does) and wait for the view to have it."""
        await self.domains.kv.put(domain_key(entry.tenant_id, entry.domain), entry.to_json(box or self.box))
        for _ in range(500):
            if self.domains.domain(entry.tenant_id, entry.domain) is not None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the sending-domains view never saw the entry")

    def received(self) -> bytes:
        """The one message the relay stored."""
        return received(self.maildir)


@pytest.fixture
async def signing(world: World, tmp_path: Path) -> AsyncIterator[Signing]:
    namespace = world.topology.namespace
    box = SecretBox.from_setting(generate_key_setting("k1"))
    async with relay_at(tmp_path / "mail") as endpoint, \
            sending_domains(world, namespace, box, sandbox_domains=[SANDBOX]) as domains:
        await add_relay(world, endpoint)
        yield Signing(world, domains, box, tmp_path / "mail")
    await world.js.delete_key_value(bucket_name(namespace))


def tenant_domain(*keys: SigningKey, state: DomainState = DomainState.VERIFIED) -> SendingDomain:
    return SendingDomain(tenant_id="acme", domain=ZONE, state=state, signing_keys=keys)


def rsa_key(active: bool = True) -> SigningKey:
    return SigningKey("esp-rsa", "rsa-sha256", active, RSA_PEM)


def ed_key() -> SigningKey:
    return SigningKey("esp-ed", "ed25519-sha256", True, ED_PEM)


def signed_count(algorithm: str) -> float:
    return REGISTRY.get_sample_value("esp_sender_dkim_signed_total", {"algorithm": algorithm}) or 0.0


async def test_a_signed_email_delivered_through_smtp_verifies_against_the_domains_dns(
        signing: Signing, dns_server: AuthoritativeDns) -> None:
    await signing.publish(tenant_domain(rsa_key()))
    task = send_task(subject="Your order   shipped", text="Hello,\n\nyour  order\tshipped.\n")
    getattr(task, "from").email = FROM
    task.html_body = "<p>Hello,</p><p>your order shipped.</p>"
    task.headers["List-Unsubscribe"] = "<https://esp.example/u/1>"
    before = signed_count("rsa-sha256")

    verdicts = await signing.world.deliver(task)

    assert verdicts[0].ack and await signing.world.event_types(task) == [SENT]
    raw = signing.received()
    assert await verify_through_dns(raw, dns_server) == [True]
    (tags,) = signature_tags(raw)
    assert (tags["d"], tags["s"], tags["a"]) == (ZONE, "esp-rsa", "rsa-sha256")
    assert FROM.endswith("." + tags["d"])  # aligned with From (relaxed)
    assert {"from", "subject", "to", "list-unsubscribe", "content-type"} <= set(tags["h"].split(":"))
    assert signed_count("rsa-sha256") == before + 1


async def test_with_an_rsa_and_an_ed25519_key_active_both_sign_and_both_verify(
        signing: Signing, dns_server: AuthoritativeDns) -> None:
    await signing.publish(tenant_domain(rsa_key(), ed_key()))
    task = send_task()
    getattr(task, "from").email = FROM

    await signing.world.deliver(task)

    raw = signing.received()
    assert [t["s"] for t in signature_tags(raw)] == ["esp-rsa", "esp-ed"]
    assert await verify_through_dns(raw, dns_server) == [True, True]


async def test_a_key_retired_by_a_rotation_no_longer_signs(signing: Signing, dns_server: AuthoritativeDns) -> None:
    retired = SigningKey("esp-old", "rsa-sha256", False, OLD_PEM)
    await signing.publish(tenant_domain(retired, ed_key()))
    task = send_task()
    getattr(task, "from").email = FROM

    await signing.world.deliver(task)

    raw = signing.received()
    assert [t["s"] for t in signature_tags(raw)] == ["esp-ed"]
    assert await verify_through_dns(raw, dns_server) == [True]


async def test_an_email_from_a_sandbox_domain_is_not_signed_by_us(signing: Signing) -> None:
    await signing.publish(tenant_domain(rsa_key()))
    task = send_task()
    getattr(task, "from").email = f"demo@{SANDBOX}"

    verdicts = await signing.world.deliver(task)

    assert verdicts[0].ack and await signing.world.event_types(task) == [SENT]
    assert signature_tags(signing.received()) == []


async def test_an_email_from_a_domain_not_yet_verified_is_not_signed(signing: Signing) -> None:
    await signing.publish(tenant_domain(rsa_key(), state=DomainState.PENDING))
    task = send_task()
    getattr(task, "from").email = FROM

    await signing.world.deliver(task)

    assert signature_tags(signing.received()) == []


async def test_an_email_whose_key_does_not_open_is_sent_unsigned_with_a_warning(
        signing: Signing, caplog: pytest.LogCaptureFixture) -> None:
    other_box = SecretBox.from_setting(generate_key_setting("elsewhere"))
    before = REGISTRY.get_sample_value("esp_sender_dkim_keys_unusable_total", {"why": "unopened"}) or 0.0
    with caplog.at_level(logging.WARNING):
        await signing.publish(tenant_domain(rsa_key()), box=other_box)  # sealed with a key this sender lacks
        task = send_task()
        getattr(task, "from").email = FROM

        verdicts = await signing.world.deliver(task)

    assert verdicts[0].ack and await signing.world.event_types(task) == [SENT]
    assert signature_tags(signing.received()) == []
    assert "mail goes unsigned" in caplog.text
    assert REGISTRY.get_sample_value("esp_sender_dkim_keys_unusable_total", {"why": "unopened"}) == before + 1
