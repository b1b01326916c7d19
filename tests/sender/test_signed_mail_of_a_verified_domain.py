"""Issue 23's DKIM test along the whole path: a tenant adds a domain through the router (``CreateDomain``),
publishes the records it returns in a real DNS server (NSD on loopback), verifies it (``VerifyDomain``: the router
writes the domain and its sealed keys to the sending-domains bucket), and an email from it goes through the real
sender and the SMTP adapter to a real relay, where dkimpy's own verifier, looking the keys up in that DNS server,
verifies every signature."""

from __future__ import annotations

from pathlib import Path

from esp.v1 import domains_pb2

from dev.dns_server import AuthoritativeDns
from libs.common.secret_box import SecretBox
from tests.domains import conftest as domain_fixtures
from tests.domains.conftest import Router, create, published, verify
from tests.progress import wait_for_progress_async
from tests.providers.dkim_checks import received, relay_at, signature_tags, verify_through_dns
from tests.sender.conftest import World, send_task
from tests.sender.dkim_world import add_relay, sending_domains

# The domain tests' router (real Postgres, NATS and DNS) and its NSD, one of each for this module.
router = domain_fixtures.router
dns_server = domain_fixtures.dns_server
DOMAIN = "acme.test"


async def test_mail_from_a_domain_verified_through_the_router_is_signed_and_verifies(
        router: Router, dns_server: AuthoritativeDns, world: World, tmp_path: Path) -> None:
    tenant = "acme"  # the tenant of the world's tasks
    added = await create(router, tenant, DOMAIN, ed25519=True)
    dns_server.publish(DOMAIN, published(added))
    assert (await verify(router, tenant, DOMAIN)).state == domains_pb2.DOMAIN_STATE_VERIFIED
    box = SecretBox.from_setting(router.settings.secrets_keys)
    async with relay_at(tmp_path / "mail") as endpoint, \
            sending_domains(world, router.settings.namespace, box) as domains:
        await add_relay(world, endpoint)

        async def keys_in_view() -> int:
            entry = domains.sender_domain(tenant, DOMAIN)
            return len(entry.active_keys()) if entry is not None else 0

        await wait_for_progress_async(keys_in_view, lambda count: count == 2, what="the domain's two active keys",
                                      stall_s=10)
        task = send_task(subject="Your order   shipped", text="Hello,\n\nyour  order\tshipped.\n")
        getattr(task, "from").email = f"orders@shop.{DOMAIN}"

        verdicts = await world.deliver(task)

    assert verdicts[0].ack
    raw = received(tmp_path / "mail")
    tags = signature_tags(raw)
    assert {(t["d"], t["a"]) for t in tags} == {(DOMAIN, "rsa-sha256"), (DOMAIN, "ed25519-sha256")}
    assert await verify_through_dns(raw, dns_server) == [True, True]
