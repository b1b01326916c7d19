"""A sending domain verifies against real DNS (NSD on loopback): per-record results, the periodic re-check that
turns a verified domain failed and notifies its tenant, and DnsUnavailable changing nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import domains_pb2 as D

from dev.dns_server import AuthoritativeDns
from libs.common.db import create_pool
from libs.common.domain_records import DnsUnavailable, resolver_at
from libs.common.jetstream import Topology
from libs.common.secret_box import SecretBox
from libs.common.sending_domains import ProviderReadiness, ReadinessState, open_bucket, readiness_key
from services.router.domains import DomainRegistry
from tests.conftest import free_port
from tests.domains.conftest import Router, create, get, new_tenant, published, verify
from tests.progress import wait_for_progress_async

OWNERSHIP, DKIM = D.DOMAIN_RECORD_PURPOSE_OWNERSHIP, D.DOMAIN_RECORD_PURPOSE_DKIM


def _by_purpose(domain: D.Domain) -> dict[int, D.DomainRecord]:
    return {r.purpose: r for r in domain.records}


async def test_a_new_domain_is_pending_with_the_records_to_publish(router: Router) -> None:
    domain = await create(router, new_tenant(), "acme.test", ed25519=True)

    assert domain.name == "domains/acme.test" and domain.state == D.DOMAIN_STATE_PENDING
    records = {(r.purpose, r.selector): r for r in domain.records}
    assert records[(OWNERSHIP, "")].name == "_esp-verification.acme.test"
    assert records[(OWNERSHIP, "")].value.startswith("esp-verification=")
    assert records[(DKIM, "esp1")].name == "esp1._domainkey.acme.test"
    assert records[(DKIM, "esp1")].algorithm == "rsa-sha256" and "k=rsa" in records[(DKIM, "esp1")].value
    assert records[(DKIM, "esp1e")].algorithm == "ed25519-sha256" and records[(DKIM, "esp1e")].required
    assert records[(D.DOMAIN_RECORD_PURPOSE_SPF, "")].value == "v=spf1 include:spf.platform.test ~all"
    assert not records[(D.DOMAIN_RECORD_PURPOSE_SPF, "")].required
    assert records[(D.DOMAIN_RECORD_PURPOSE_DMARC, "")].name == "_dmarc.acme.test"
    assert all(r.state == D.DOMAIN_RECORD_STATE_UNSPECIFIED for r in domain.records)


async def test_a_domain_verifies_once_its_records_are_published(router: Router,
                                                               dns_server: AuthoritativeDns) -> None:
    tenant = new_tenant()
    domain = await create(router, tenant, "mail.test")
    dns_server.publish("mail.test", published(domain))

    verified = await verify(router, tenant, "mail.test")

    assert verified.state == D.DOMAIN_STATE_VERIFIED
    assert all(r.state == D.DOMAIN_RECORD_STATE_FOUND for r in verified.records)
    assert verified.verify_time.seconds and verified.check_time.seconds


async def test_a_missing_or_wrong_record_is_reported_per_record_and_the_domain_stays_pending(
        router: Router, dns_server: AuthoritativeDns) -> None:
    tenant = new_tenant()
    domain = await create(router, tenant, "acme.test")
    dns_server.publish("acme.test", published(
        domain, skip=lambda r: r.purpose == OWNERSHIP,
        override=lambda r: "v=DKIM1; k=rsa; p=AAAAnotthekey" if r.purpose == DKIM else None))

    checked = await verify(router, tenant, "acme.test")

    assert checked.state == D.DOMAIN_STATE_PENDING
    records = _by_purpose(checked)
    assert records[OWNERSHIP].state == D.DOMAIN_RECORD_STATE_MISSING and not records[OWNERSHIP].seen_values
    assert records[DKIM].state == D.DOMAIN_RECORD_STATE_WRONG
    assert list(records[DKIM].seen_values) == ["v=DKIM1; k=rsa; p=AAAAnotthekey"]
    assert records[D.DOMAIN_RECORD_PURPOSE_SPF].state == D.DOMAIN_RECORD_STATE_FOUND


async def test_a_verified_domain_whose_record_is_removed_fails_at_the_recheck_and_the_tenant_is_told(
        router: Router, dns_server: AuthoritativeDns) -> None:
    tenant = new_tenant()
    nc = await nats.connect(router.nats_url)
    events: list[queue_pb2.AccountEvent] = []

    async def collect(msg: nats.aio.msg.Msg) -> None:
        event = queue_pb2.AccountEvent()
        event.ParseFromString(msg.data)
        events.append(event)

    await nc.subscribe(Topology(router.settings.namespace).account_subject(tenant), cb=collect)
    try:
        domain = await create(router, tenant, "recheck.test")
        dns_server.publish("recheck.test", published(domain))
        assert (await verify(router, tenant, "recheck.test")).state == D.DOMAIN_STATE_VERIFIED

        dns_server.publish("recheck.test", published(domain, skip=lambda r: r.purpose == DKIM))
        failed = await wait_for_progress_async(
            lambda: get(router, tenant, "recheck.test"), lambda d: d.state == D.DOMAIN_STATE_FAILED,
            what="the re-check to fail the domain", stall_s=30, progress=lambda d: d.check_time.ToNanoseconds())
        assert _by_purpose(failed)[DKIM].state == D.DOMAIN_RECORD_STATE_MISSING

        dns_server.publish("recheck.test", published(domain))
        await wait_for_progress_async(
            lambda: get(router, tenant, "recheck.test"), lambda d: d.state == D.DOMAIN_STATE_VERIFIED,
            what="the re-check to verify the domain again", stall_s=30,
            progress=lambda d: d.check_time.ToNanoseconds())
        await wait_for_progress_async(lambda: _events(events), lambda kinds: len(kinds) >= 3,
                                      what="the domain's notifications", stall_s=30)
    finally:
        await nc.close()
    assert [e.kind for e in events] == ["domain_verified", "domain_verification_failed", "domain_verified"]
    assert events[1].attributes["domain"] == "domains/recheck.test"
    assert "esp1._domainkey.recheck.test missing" in events[1].attributes["failing_records"]


async def _events(events: list[queue_pb2.AccountEvent]) -> list[str]:
    return [e.kind for e in events]


async def test_a_pending_domain_verifies_on_its_own_once_published(router: Router,
                                                                  dns_server: AuthoritativeDns) -> None:
    tenant = new_tenant()
    domain = await create(router, tenant, "auto.test")
    dns_server.publish("auto.test", published(domain))
    # The router's own pass (pending domains are checked too) verifies it; nobody calls VerifyDomain.
    await wait_for_progress_async(lambda: get(router, tenant, "auto.test"),
                                  lambda d: d.state == D.DOMAIN_STATE_VERIFIED,
                                  what="the re-check to verify a pending domain", stall_s=30)


async def test_dns_that_does_not_answer_changes_no_state(router: Router, dns_server: AuthoritativeDns) -> None:
    tenant = new_tenant()
    domain = await create(router, tenant, "down.test")
    dns_server.publish("down.test", published(domain))
    assert (await verify(router, tenant, "down.test")).state == D.DOMAIN_STATE_VERIFIED
    nobody = f"127.0.0.1:{free_port()}"  # no DNS server listens there

    async with _registry_asking(router, nobody) as registry:
        with pytest.raises(DnsUnavailable):
            await registry.verify(tenant, "down.test")

    assert (await get(router, tenant, "down.test")).state == D.DOMAIN_STATE_VERIFIED


@asynccontextmanager
async def _registry_asking(router: Router, resolver_address: str) -> AsyncIterator[DomainRegistry]:
    """A second registry on the router's database and bucket whose DNS checks ask ``resolver_address``."""
    pool = await create_pool(router.dsn, min_size=1, max_size=2, name="domains-test")
    nc = await nats.connect(router.nats_url)
    try:
        kv = await open_bucket(nc.jetstream(), router.settings.namespace)
        yield DomainRegistry(pool, kv, SecretBox.from_setting(router.settings.secrets_keys),
                             Topology(router.settings.namespace),
                             resolver=lambda: resolver_at(resolver_address, timeout_s=0.5),
                             spf_include=router.settings.spf_include)
    finally:
        await nc.close()
        await pool.close()


async def test_a_domain_shows_each_providers_readiness_as_the_bucket_holds_it(router: Router) -> None:
    tenant = new_tenant()
    await create(router, tenant, "ready.acme.test")
    nc = await nats.connect(router.nats_url)
    try:
        kv = await open_bucket(nc.jetstream(), router.settings.namespace)
        # What the router's readiness worker writes for each provider it registered the domain with.
        await kv.put(readiness_key("mg-1", tenant, "ready.acme.test"), ProviderReadiness(
            "mg-1", tenant, "ready.acme.test", ReadinessState.PENDING, "unverified").to_json())
        shown = await wait_for_progress_async(lambda: get(router, tenant, "ready.acme.test"),
                                              lambda d: len(d.provider_readiness) == 1,
                                              what="the readiness entry to show", stall_s=30)
    finally:
        await nc.close()
    assert [(p.provider, p.state, p.detail) for p in shown.provider_readiness] == [
        ("providers/mg-1", "pending", "unverified")]
