"""The sending-domains view: what a tenant may send from, and signing keys that travel sealed."""

from __future__ import annotations

from libs.common.secret_box import SecretBox, generate_key_setting
from libs.common.sending_domains import (
    DomainState,
    ProviderReadiness,
    ReadinessState,
    SendingDomain,
    SendingDomains,
    SigningKey,
    domain_key,
    readiness_key,
)

PEM = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n"


def _view(secrets: SecretBox | None = None, sandbox: tuple[str, ...] = ()) -> SendingDomains:
    return SendingDomains(kv=None, secrets=secrets, sandbox_domains=sandbox)  # type: ignore[arg-type]


def _domain(state: DomainState = DomainState.VERIFIED, domain: str = "example.com") -> SendingDomain:
    return SendingDomain(tenant_id="t-1", domain=domain, state=state,
                         signing_keys=(SigningKey("esp1", "rsa-sha256", True, PEM),))


def test_the_kv_value_holds_the_private_key_sealed_and_a_view_with_the_box_opens_it() -> None:
    box = SecretBox.from_setting(generate_key_setting())
    raw = _domain().to_json(box)
    assert b"PRIVATE KEY" not in raw
    view = _view(box)
    view.apply(domain_key("t-1", "example.com"), raw)
    found = view.sender_domain("t-1", "example.com")
    assert found is not None and found.active_keys()[0].private_key_pem == PEM


def test_a_view_without_the_box_sees_the_domain_but_no_key_that_signs() -> None:
    view = _view()
    view.apply(domain_key("t-1", "example.com"), _domain().to_json(SecretBox.from_setting(generate_key_setting())))
    found = view.sender_domain("t-1", "example.com")
    assert found is not None and found.active_keys() == ()


def test_a_subdomain_is_covered_by_its_verified_parent_and_another_tenant_is_not() -> None:
    view = _view()
    view.apply(domain_key("t-1", "example.com"), _domain().to_json(SecretBox.from_setting(generate_key_setting())))
    assert view.sender_domain("t-1", "news.example.com") is not None
    assert view.sender_domain("t-2", "example.com") is None
    assert view.sender_domain("t-1", "example.org") is None


def test_a_pending_or_failed_domain_covers_nothing() -> None:
    box = SecretBox.from_setting(generate_key_setting())
    view = _view()
    view.apply(domain_key("t-1", "example.com"), _domain(DomainState.PENDING).to_json(box))
    assert view.sender_domain("t-1", "example.com") is None
    view.apply(domain_key("t-1", "example.com"), _domain(DomainState.FAILED).to_json(box))
    assert view.sender_domain("t-1", "example.com") is None


def test_a_deleted_entry_is_gone() -> None:
    view = _view()
    view.apply(domain_key("t-1", "example.com"), _domain().to_json(SecretBox.from_setting(generate_key_setting())))
    view.apply(domain_key("t-1", "example.com"), None)
    assert view.sender_domain("t-1", "example.com") is None


def test_sandbox_domains_cover_their_subdomains_for_every_tenant() -> None:
    view = _view(sandbox=("Sandbox.Example.NET",))
    assert view.is_sandbox("sandbox.example.net") and view.is_sandbox("a.sandbox.example.net")
    assert not view.is_sandbox("example.net")


def test_readiness_entries_are_kept_per_provider_tenant_and_domain() -> None:
    view = _view()
    ready = ProviderReadiness("ses-eu", "t-1", "example.com", ReadinessState.PENDING, "PENDING")
    view.apply(readiness_key("ses-eu", "t-1", "example.com"), ready.to_json())
    assert view.readiness("ses-eu", "t-1", "example.com") == ready
    assert view.readiness("mg", "t-1", "example.com") is None


def test_an_unreadable_entry_is_left_out() -> None:
    view = _view()
    view.apply(domain_key("t-1", "example.com"), b"{not json")
    assert view.domains() == {}
