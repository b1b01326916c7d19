"""Routing leaves out a provider not ready for the email's ``From`` domain, and says why."""

from __future__ import annotations

from libs.common.secret_box import SecretBox
from libs.common.sending_domains import (
    DomainState,
    ProviderReadiness,
    ReadinessState,
    SendingDomain,
    SendingDomains,
    domain_key,
    readiness_key,
)
from libs.routing.catalog import ProviderSpec
from libs.routing.readiness import NOT_READY, address_domain
from libs.routing.scoring import EmailFacts, rank

CHEAP_SES = ProviderSpec("ses-cheap", "ses", "http://x", region="us-east-1", price_per_email_micros=50)
DEAR_POSTMARK = ProviderSpec("pm-dear", "postmark", "http://x", price_per_email_micros=500)
RELAY = ProviderSpec("relay", "smtp", "127.0.0.1:25", price_per_email_micros=10)
SECRETS = SecretBox({"k1": bytes(32)}, "k1")


def view(*, ready: dict[str, ReadinessState] | None = None, tenant_domains: tuple[str, ...] = ("acme.test",),
         sandbox: tuple[str, ...] = ()) -> SendingDomains:
    domains = SendingDomains(kv=None, sandbox_domains=sandbox)  # type: ignore[arg-type]
    for name in tenant_domains:
        entry = SendingDomain("t1", name, DomainState.VERIFIED)
        domains.apply(domain_key("t1", name), entry.to_json(SECRETS))
    for provider, state in (ready or {}).items():
        said = ProviderReadiness(provider, "t1", "acme.test", state, "DKIM PENDING" if state != "ready" else "")
        domains.apply(readiness_key(provider, "t1", "acme.test"), said.to_json())
    return domains


def email(sender: str = "news@acme.test", tenant: str = "t1") -> EmailFacts:
    return EmailFacts("transactional", 20_000, tenant_id=tenant, from_domain=address_domain(sender))


def order(decision: object) -> list[str]:
    return [s.provider_id for s in decision.ranked]  # type: ignore[attr-defined]


def reasons(decision: object) -> dict[str, str]:
    return {s.provider_id: s.excluded_reason for s in decision.excluded}  # type: ignore[attr-defined]


def test_a_domain_ready_at_only_the_dearer_provider_goes_there() -> None:
    domains = view(ready={"pm-dear": ReadinessState.READY})

    decision = rank([CHEAP_SES, DEAR_POSTMARK], {}, email(), domains=domains)

    assert order(decision) == ["pm-dear"]
    assert reasons(decision) == {"ses-cheap": f"{NOT_READY} acme.test: not registered at the provider yet"}


def test_a_pending_provider_is_left_out_with_the_providers_words() -> None:
    domains = view(ready={"ses-cheap": ReadinessState.PENDING, "pm-dear": ReadinessState.READY})

    decision = rank([CHEAP_SES, DEAR_POSTMARK], {}, email(), domains=domains)

    assert reasons(decision)["ses-cheap"] == f"{NOT_READY} acme.test: pending (DKIM PENDING)"


def test_a_failed_provider_is_left_out() -> None:
    domains = view(ready={"ses-cheap": ReadinessState.FAILED, "pm-dear": ReadinessState.READY})

    assert order(rank([CHEAP_SES, DEAR_POSTMARK], {}, email(), domains=domains)) == ["pm-dear"]


def test_a_domain_ready_everywhere_ranks_by_cost_as_before() -> None:
    domains = view(ready={"ses-cheap": ReadinessState.READY, "pm-dear": ReadinessState.READY})

    assert order(rank([DEAR_POSTMARK, CHEAP_SES], {}, email(), domains=domains)) == ["ses-cheap", "pm-dear"]


def test_a_subdomain_is_judged_by_the_tenant_domain_it_belongs_to() -> None:
    domains = view(ready={"pm-dear": ReadinessState.READY})

    decision = rank([CHEAP_SES, DEAR_POSTMARK], {}, email("a@news.eu.acme.test"), domains=domains)

    assert order(decision) == ["pm-dear"]
    assert reasons(decision)["ses-cheap"].startswith(f"{NOT_READY} acme.test:")


def test_a_relay_that_registers_no_domains_is_always_ready() -> None:
    domains = view()

    assert order(rank([RELAY, CHEAP_SES], {}, email(), domains=domains)) == ["relay"]


def test_a_sandbox_domain_is_ready_at_every_provider() -> None:
    domains = view(sandbox=("sandbox.esp.test",))

    decision = rank([CHEAP_SES, DEAR_POSTMARK], {}, email("demo@sandbox.esp.test"), domains=domains)

    assert order(decision) == ["ses-cheap", "pm-dear"]


def test_another_tenants_readiness_does_not_count() -> None:
    domains = view(ready={"ses-cheap": ReadinessState.READY})

    decision = rank([CHEAP_SES], {}, email(tenant="t2"), domains=domains)

    assert order(decision) == ["ses-cheap"], "t2 has no such domain: ingest refuses it, routing does not judge"


def test_another_tenant_sending_from_a_domain_of_its_own_needs_its_own_readiness() -> None:
    domains = view(ready={"ses-cheap": ReadinessState.READY})
    domains.apply(domain_key("t2", "acme.test"), SendingDomain("t2", "acme.test", DomainState.VERIFIED).to_json(
        SECRETS))

    decision = rank([CHEAP_SES], {}, email(tenant="t2"), domains=domains)

    assert order(decision) == []
    assert reasons(decision)["ses-cheap"].startswith(NOT_READY)


def test_without_a_domains_view_every_provider_is_ready() -> None:
    assert order(rank([CHEAP_SES, DEAR_POSTMARK], {}, email())) == ["ses-cheap", "pm-dear"]


def test_an_email_no_provider_is_ready_for_waits_like_one_no_provider_carries() -> None:
    from services.sender.outcomes import Unroutable, unroutable

    decision = rank([CHEAP_SES, DEAR_POSTMARK], {}, email(), domains=view())

    assert order(decision) == []
    assert unroutable(decision, frozenset()) is Unroutable.NO_CARRIER
