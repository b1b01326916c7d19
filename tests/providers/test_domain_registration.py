"""Registering a tenant's sending domain at each provider type with a domain API, against the simulator.

The simulator parses what each registrar sends as the provider would (SES SigV4 and JSON, Mailgun form fields with
basic auth, SendGrid JSON with a bearer key, Postmark JSON with the account token) and answers in the provider's
wire format; a domain verifies at once unless the simulator's control holds it pending or failed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from dev.simulator import RunningSimulator
from libs.common.sending_domains import ReadinessState
from libs.providers.capabilities import DEFAULT_CAPABILITIES, registers_domains
from libs.providers.domain_registration import DomainRegistrar, RegistrationUnavailable, create_registrar
from libs.providers.errors import AdapterConfigError

REGISTERING = {"ses": "ses-1", "mailgun": "mailgun-us", "sendgrid": "sendgrid-1", "postmark": "postmark-1"}


@pytest.fixture(params=sorted(REGISTERING))
async def registrar(request: pytest.FixtureRequest,
                    sim: RunningSimulator) -> AsyncIterator[tuple[str, DomainRegistrar]]:
    personality = REGISTERING[str(request.param)]
    made = create_registrar(sim.provider_config(personality))
    yield personality, made
    await made.aclose()


def fresh_domain() -> str:
    return f"t{uuid.uuid4().hex[:10]}.example.org"


def test_only_the_types_with_a_domain_api_register_domains() -> None:
    assert {t for t in DEFAULT_CAPABILITIES if registers_domains(t)} == set(REGISTERING)


async def test_a_registered_domain_verified_by_the_provider_is_ready(
        sim: RunningSimulator, registrar: tuple[str, DomainRegistrar]) -> None:
    personality, made = registrar
    domain = fresh_domain()

    status = await made.register(domain)

    assert status.state is ReadinessState.READY
    assert status.records, "the provider's DNS records come back"
    assert [d["name"] for d in await sim.client.domains(personality)] == [domain]


async def test_a_pending_domain_becomes_ready_once_the_provider_verifies_it(
        sim: RunningSimulator, registrar: tuple[str, DomainRegistrar]) -> None:
    personality, made = registrar
    domain = fresh_domain()
    await sim.client.hold_domain(personality, domain, "pending")

    registered = await made.register(domain)
    still = await made.status(domain)
    await sim.client.release_domain(personality, domain)
    verified = await made.status(domain)

    assert (registered.state, still.state, verified.state) == (
        ReadinessState.PENDING, ReadinessState.PENDING, ReadinessState.READY)
    assert any(r.valid is not True for r in registered.records)
    assert registered.detail


async def test_registering_a_domain_the_provider_has_already_answers_its_status(
        sim: RunningSimulator, registrar: tuple[str, DomainRegistrar]) -> None:
    personality, made = registrar
    domain = fresh_domain()
    await made.register(domain)

    again = await made.register(domain)

    assert again.state is ReadinessState.READY
    assert len(await sim.client.domains(personality)) == 1


async def test_a_status_read_of_a_domain_the_provider_forgot_registers_it_again(
        sim: RunningSimulator, registrar: tuple[str, DomainRegistrar]) -> None:
    personality, made = registrar
    domain = fresh_domain()

    status = await made.status(domain)

    assert status.state is ReadinessState.READY
    assert [d["name"] for d in await sim.client.domains(personality)] == [domain]


@pytest.mark.parametrize("provider_type", ["mailgun", "sendgrid", "postmark"])
async def test_a_refused_registration_is_failed_with_the_providers_words(
        sim: RunningSimulator, provider_type: str) -> None:
    personality = REGISTERING[provider_type]
    domain = fresh_domain()
    await sim.client.hold_domain(personality, domain, "failed", "domain is on a block list")
    made = create_registrar(sim.provider_config(personality))
    try:
        status = await made.register(domain)
    finally:
        await made.aclose()

    assert status.state is ReadinessState.FAILED
    assert "domain is on a block list" in status.detail


async def test_an_ses_identity_whose_verification_failed_is_failed_with_its_error_type(
        sim: RunningSimulator) -> None:
    domain = fresh_domain()
    await sim.client.hold_domain("ses-1", domain, "failed", "TYPE_NOT_FOUND")
    made = create_registrar(sim.provider_config("ses-1"))
    try:
        created = await made.register(domain)
        read = await made.status(domain)
    finally:
        await made.aclose()

    assert created.state is ReadinessState.FAILED
    assert read.state is ReadinessState.FAILED
    assert "TYPE_NOT_FOUND" in read.detail
    assert all(r.name.endswith(f"._domainkey.{domain}") and r.value.endswith(".dkim.amazonses.com")
               for r in read.records)
    assert len(read.records) == 3


async def test_a_mailgun_domain_disabled_after_registration_is_failed_with_its_reason(sim: RunningSimulator) -> None:
    domain = fresh_domain()
    made = create_registrar(sim.provider_config("mailgun-us"))
    try:
        await made.register(domain)
        await sim.client.hold_domain("mailgun-us", domain, "failed", "abuse report")
        status = await made.status(domain)
    finally:
        await made.aclose()

    assert status.state is ReadinessState.FAILED
    assert "disabled" in status.detail and "abuse report" in status.detail


async def test_the_simulator_records_each_registration_in_the_providers_wire_format(sim: RunningSimulator) -> None:
    domain = fresh_domain()
    for personality in REGISTERING.values():
        made = create_registrar(sim.provider_config(personality))
        try:
            await made.register(domain)
        finally:
            await made.aclose()

    calls = {(r["personality"], r["method"], r["path"], r["request_headers"].get("authorization-scheme", ""))
             for r in await sim.client.requests() if r["result"] == "domain"}
    assert ("ses-1", "POST", "/v2/email/identities", "AWS4-HMAC-SHA256") in calls
    assert ("mailgun-us", "POST", "/v3/domains", "Basic") in calls
    assert ("sendgrid-1", "POST", "/v3/whitelabel/domains", "Bearer") in calls
    assert ("postmark-1", "POST", "/domains", "") in calls


async def test_postmark_domains_take_the_account_token_not_the_server_token(sim: RunningSimulator) -> None:
    config = sim.provider_config("postmark-1")
    wrong = dict(config.credentials, account_token=config.credentials["server_token"])
    made = create_registrar(sim.provider_config("postmark-1", credentials=wrong))
    try:
        with pytest.raises(RegistrationUnavailable, match="401"):
            await made.register(fresh_domain())
    finally:
        await made.aclose()


def test_a_postmark_provider_without_an_account_token_cannot_register(sim: RunningSimulator) -> None:
    config = sim.provider_config("postmark-1")
    with pytest.raises(AdapterConfigError, match="account_token"):
        create_registrar(sim.provider_config("postmark-1", credentials={"server_token": config.credentials[
            "server_token"]}))


async def test_a_provider_down_is_unavailable_not_a_verdict_on_the_domain(
        sim: RunningSimulator, registrar: tuple[str, DomainRegistrar]) -> None:
    personality, made = registrar
    await sim.client.set_knobs(personality, outage=True)

    with pytest.raises(RegistrationUnavailable):
        await made.register(fresh_domain())


def test_a_relay_registers_no_domains(sim: RunningSimulator) -> None:
    with pytest.raises(AdapterConfigError, match="registers no domains"):
        create_registrar(sim.provider_config("smtp-1"))
