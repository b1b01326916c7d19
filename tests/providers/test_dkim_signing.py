"""The adapters whose providers take our MIME sign it with the email's DKIM keys, as the last thing done to it; a
receiver (dkimpy, the reference implementation) verifies what the relay or the simulator received. Providers that
take JSON fields do not get our signature."""

from __future__ import annotations

import base64
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from dev.simulator import RunningSimulator
from libs.providers.base import BaseAdapter
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.providers.dkim import MAX_SIGNATURE_BYTES, Algorithm, DkimKey, generate_key
from libs.providers.errors import MessageTooLarge
from libs.providers.mime import mime_size
from libs.providers.model import Address, Attachment, OutboundEmail, Outcome
from libs.providers.registry import create_adapter
from tests.providers.dkim_checks import received, relay_at, signature_tags

SIGNING_DOMAIN = "shop.example"
"""The tenant's verified domain: ``d=``, a parent of the ``From`` domain (DMARC relaxed alignment)."""
FROM = Address("news@mail.shop.example", "Shop News")


@functools.cache
def _key(algorithm: Algorithm, selector: str) -> tuple[DkimKey, str]:
    pem, record = generate_key(algorithm)
    return DkimKey(SIGNING_DOMAIN, selector, pem), record


def rsa() -> DkimKey:
    return _key("rsa-sha256", "esp-rsa")[0]


def ed25519() -> DkimKey:
    return _key("ed25519-sha256", "esp-ed")[0]


def _records() -> dict[bytes, bytes]:
    return {f"{key.selector}._domainkey.{key.domain}.".encode(): record.encode()
            for key, record in (_key("rsa-sha256", "esp-rsa"), _key("ed25519-sha256", "esp-ed"))}


def dns(name: bytes, timeout: int = 5) -> bytes | None:
    """The test's DKIM records, as dkimpy's ``dnsfunc``."""
    return _records().get(name)


def verifies(raw: bytes) -> list[bool]:
    """Whether each DKIM signature of ``raw`` verifies, in order."""
    verifier = dkimpy.DKIM(raw)
    return [bool(verifier.verify(idx=i, dnsfunc=dns)) for i in range(len(signature_tags(raw)))]


def email(*keys: DkimKey, **fields: Any) -> OutboundEmail:
    values: dict[str, Any] = {
        "message_id": str(uuid.uuid4()), "tenant_id": "acme", "message_class": "transactional", "sender": FROM,
        "to": (Address("bob@example.org", "Bob"),), "subject": "Your order   shipped",
        "text": "Hello Bob,\n\nyour order   shipped.\t \n", "html": "<p>Hello <b>Bob</b>,</p>\n<p>it shipped.</p>",
        "headers": {"List-Unsubscribe": "<https://esp.example/u/1>"}, "tags": ("orders",),
        "metadata": {"order": "A17"}, "dkim_keys": keys,
    }
    values.update(fields)
    return OutboundEmail(**values)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A real SMTP relay storing what it receives byte for byte: its endpoint and maildir."""
    async with relay_at(tmp_path / "mail") as endpoint:
        yield endpoint, tmp_path / "mail"


@pytest.fixture
async def adapters(sim: RunningSimulator) -> AsyncIterator[Callable[..., BaseAdapter]]:
    """Factory: an adapter for a simulator personality (config overrides as keywords); all closed afterwards."""
    made: list[BaseAdapter] = []

    def make(personality: str, **overrides: Any) -> BaseAdapter:
        adapter = create_adapter(sim.provider_config(personality, **overrides))
        assert isinstance(adapter, BaseAdapter)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


async def simulator_raw(sim: RunningSimulator, personality: str) -> list[bytes]:
    """The raw MIME of every message the simulator took for ``personality`` that kept it (signed ones)."""
    return [base64.b64decode(m["raw_mime"]) for m in await sim.client.delivered_messages(personality)
            if m["raw_mime"] is not None]


def test_only_the_providers_that_take_our_mime_are_signed_by_us() -> None:
    assert {t for t, caps in DEFAULT_CAPABILITIES.items() if caps.signs_raw_mime} == {"smtp", "ses", "mailgun"}


async def test_an_smtp_relay_receives_a_message_whose_signature_verifies(
        adapters: Callable[..., BaseAdapter], relay: tuple[str, Path]) -> None:
    endpoint, maildir = relay
    adapter = adapters("smtp-1", endpoint=endpoint, credentials={}, options={"tls": "none"})

    result = await adapter.send(email(rsa()))

    assert result.outcome is Outcome.ACCEPTED and result.dkim_algorithms == ("rsa-sha256",)
    raw = received(maildir)
    assert verifies(raw) == [True]
    (tags,) = signature_tags(raw)
    assert (tags["d"], tags["s"], tags["a"]) == (SIGNING_DOMAIN, "esp-rsa", "rsa-sha256")
    assert tags["h"].startswith("from:from:") and "list-unsubscribe" in tags["h"]


async def test_an_email_with_attachments_is_signed_over_its_streamed_parts(
        adapters: Callable[..., BaseAdapter], relay: tuple[str, Path]) -> None:
    endpoint, maildir = relay
    adapter = adapters("smtp-1", endpoint=endpoint, credentials={}, options={"tls": "none"})
    files = (Attachment.from_bytes("invoice.pdf", "application/pdf", bytes(range(256)) * 3000),
             Attachment.from_bytes("logo.png", "image/png", b"\x89PNG" * 500, content_id="logo"))

    result = await adapter.send(email(rsa(), attachments=files))

    assert result.accepted
    assert verifies(received(maildir)) == [True]


async def test_rsa_and_ed25519_keys_both_sign_and_both_verify(
        adapters: Callable[..., BaseAdapter], relay: tuple[str, Path]) -> None:
    endpoint, maildir = relay
    adapter = adapters("smtp-1", endpoint=endpoint, credentials={}, options={"tls": "none"})

    result = await adapter.send(email(rsa(), ed25519()))

    assert result.dkim_algorithms == ("rsa-sha256", "ed25519-sha256")
    raw = received(maildir)
    assert [t["a"] for t in signature_tags(raw)] == ["rsa-sha256", "ed25519-sha256"]
    assert verifies(raw) == [True, True]


async def test_a_key_that_does_not_load_leaves_the_email_unsigned_but_sent(
        adapters: Callable[..., BaseAdapter], relay: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    endpoint, maildir = relay
    adapter = adapters("smtp-1", endpoint=endpoint, credentials={}, options={"tls": "none"})
    broken = DkimKey(SIGNING_DOMAIN, "broken", b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")

    with caplog.at_level(logging.WARNING, logger="libs.providers.base"):
        result = await adapter.send(email(broken))

    assert result.accepted and result.dkim_algorithms == ()
    assert signature_tags(received(maildir)) == []
    assert "DKIM key broken of shop.example did not sign" in caplog.text


async def test_one_broken_key_of_two_leaves_the_other_signing(
        adapters: Callable[..., BaseAdapter], relay: tuple[str, Path]) -> None:
    endpoint, maildir = relay
    adapter = adapters("smtp-1", endpoint=endpoint, credentials={}, options={"tls": "none"})
    broken = DkimKey(SIGNING_DOMAIN, "broken", b"garbage")

    result = await adapter.send(email(broken, ed25519()))

    assert result.accepted and result.dkim_algorithms == ("ed25519-sha256",)
    assert verifies(received(maildir)) == [True]


async def test_ses_raw_content_is_signed_without_the_headers_ses_rewrites(
        sim: RunningSimulator, adapters: Callable[..., BaseAdapter]) -> None:
    result = await adapters("ses-1").send(email(rsa()))

    assert result.accepted and result.dkim_algorithms == ("rsa-sha256",)
    (raw,) = await simulator_raw(sim, "ses-1")
    assert verifies(raw) == [True]
    signed = signature_tags(raw)[0]["h"].split(":")
    assert "message-id" not in signed and "date" not in signed and "from" in signed


async def test_mailgun_takes_a_signed_email_at_its_mime_endpoint(
        sim: RunningSimulator, adapters: Callable[..., BaseAdapter]) -> None:
    outbound = email(rsa(), cc=(Address("carol@example.org"),), bcc=(Address("dave@example.org"),))

    result = await adapters("mailgun-us").send(outbound)

    assert result.accepted and result.dkim_algorithms == ("rsa-sha256",)
    (request,) = await sim.client.requests("mailgun-us")
    assert request["path"].endswith("/messages.mime")
    (message,) = request["messages"]
    assert verifies(base64.b64decode(message["raw_mime"])) == [True]
    assert message["recipients"] == ["bob@example.org", "carol@example.org", "dave@example.org"]
    assert "dave@example.org" not in base64.b64decode(message["raw_mime"]).decode()  # bcc stays off the headers
    assert (message["esp_message_id"], message["metadata"]["order"], message["tags"]) == (
        outbound.message_id, "A17", ["orders"])


async def test_mailgun_sends_each_personalised_email_of_a_campaign_signed_on_its_own(
        sim: RunningSimulator, adapters: Callable[..., BaseAdapter]) -> None:
    campaign = [email(rsa(), message_class="bulk", to=(Address(f"r{i}@example.org"),), subject="Hi {{ name }}",
                      recipient_variables={f"r{i}@example.org": {"name": f"R{i}"}}) for i in range(3)]
    adapter = adapters("mailgun-us")

    assert adapter.plan_batches(campaign) == [[0], [1], [2]]
    results = await adapter.send_batch(campaign)

    assert all(r.accepted for r in results)
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages("mailgun-us")}
    for i in range(3):
        message = delivered[f"r{i}@example.org"]
        assert message["subject"] == f"Hi R{i}"
        assert verifies(base64.b64decode(message["raw_mime"])) == [True]


async def test_mailgun_without_keys_keeps_its_fields_endpoint_and_its_batches(
        sim: RunningSimulator, adapters: Callable[..., BaseAdapter]) -> None:
    campaign = [email(message_class="bulk", to=(Address(f"r{i}@example.org"),)) for i in range(3)]
    adapter = adapters("mailgun-us")

    assert adapter.plan_batches(campaign) == [[0, 1, 2]]
    result = await adapter.send(campaign[0])

    assert result.accepted and result.dkim_algorithms == ()
    (request,) = await sim.client.requests("mailgun-us")
    assert request["path"].endswith("/messages")


@pytest.mark.parametrize("personality", ["sendgrid-1", "postmark-1"])
async def test_providers_taking_json_fields_send_the_email_unsigned_by_us(
        sim: RunningSimulator, adapters: Callable[..., BaseAdapter], personality: str) -> None:
    result = await adapters(personality).send(email(rsa()))

    assert result.accepted and result.dkim_algorithms == ()
    (message,) = await sim.client.delivered_messages(personality)
    assert message["raw_mime"] is None


def test_an_email_to_be_signed_must_leave_room_for_its_signatures_under_the_size_cap(
        adapters: Callable[..., BaseAdapter]) -> None:
    unsigned = email()
    size = mime_size(unsigned)
    adapter = adapters("ses-1", options={"max_message_bytes": str(size + MAX_SIGNATURE_BYTES)})

    assert adapter.precheck(unsigned, size) is None
    assert adapter.precheck(replace(unsigned, dkim_keys=(rsa(),)), size) is None
    problem = adapter.precheck(replace(unsigned, dkim_keys=(rsa(), ed25519())), size)
    assert isinstance(problem, MessageTooLarge) and problem.limit == size - MAX_SIGNATURE_BYTES
