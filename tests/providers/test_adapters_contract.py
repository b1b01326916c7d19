"""The shared test set every provider adapter must pass, run against the provider simulator.

Each test runs once per adapter type (``provider_type``). Where providers genuinely differ (which status a quota
error has, whether a Retry-After comes back) the expectation is spelled out per provider next to the test.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dev.simulator import RunningSimulator
from libs.providers.base import BaseAdapter
from libs.providers.errors import MessageTooLarge
from libs.providers.model import Address, Attachment, OutboundEmail, Outcome
from tests.conftest import free_port
from tests.providers.conftest import exploding_attachment

BATCHING_TYPES = {"mailgun", "sendgrid", "postmark"}
#: MIME-carrying providers: the simulator sees our own headers, so Bcc leaks would show.
MIME_TYPES = {"smtp", "ses"}


def chunked_attachment(filename: str, content_type: str, data: bytes, *, chunk: int = 65_537,
                       content_id: str | None = None) -> Attachment:
    """An attachment streamed in odd-sized chunks, as the sender streams from S3."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), chunk):
            yield data[start : start + chunk]

    return Attachment(filename, content_type, len(data), chunks, content_id)


async def only_delivered(sim: RunningSimulator, personality: str) -> dict[str, Any]:
    messages = await sim.client.delivered_messages(personality)
    assert len(messages) == 1, messages
    return messages[0]


async def test_sends_text_and_html_with_our_message_id(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    email = email_factory()

    result = await make_adapter().send(email)

    assert result.outcome is Outcome.ACCEPTED, result
    assert result.provider_message_id
    assert result.elapsed_s is not None
    received = await only_delivered(sim, personality)
    assert received["esp_message_id"] == email.message_id
    assert received["provider_message_id"] == result.provider_message_id
    assert received["text"].strip() == email.text
    assert received["html"].strip() == email.html
    assert received["to"] == ["alice@example.org"]


async def test_streams_several_attachments_byte_for_byte(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    report, note, logo = os.urandom(1_500_001), "Grüße\n.line with a dot\n".encode(), os.urandom(3_000)
    email = email_factory(
        html='<p>Logo: <img src="cid:logo"></p>',
        attachments=(
            chunked_attachment("report.pdf", "application/pdf", report),
            chunked_attachment("Überweisung März.txt", "text/plain", note),
            chunked_attachment("logo.png", "image/png", logo, content_id="logo"),
        ),
    )

    result = await make_adapter().send(email)

    assert result.outcome is Outcome.ACCEPTED, result
    received = await only_delivered(sim, personality)
    got = {(a["sha256"], a["size"], a["inline"]) for a in received["attachments"]}
    assert got == {
        (hashlib.sha256(report).hexdigest(), len(report), False),
        (hashlib.sha256(note).hexdigest(), len(note), False),
        (hashlib.sha256(logo).hexdigest(), len(logo), True),
    }
    assert {a["filename"] for a in received["attachments"] if not a["inline"]} == {"report.pdf", "Überweisung März.txt"}
    assert [a["content_id"] for a in received["attachments"] if a["inline"]] == ["logo"]


async def test_keeps_unicode_subject_and_display_names(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    email = email_factory(
        subject="Grüße aus Köln 🎉 — Ihre Bestellung Nr. 42",
        sender=Address("shop@example.com", "Zoë Ämter, GmbH"),
        to=(Address("juergen@example.org", "Jürgen Groß"),),
    )

    result = await make_adapter().send(email)

    assert result.outcome is Outcome.ACCEPTED, result
    received = await only_delivered(sim, personality)
    assert received["subject"] == email.subject
    assert received["sender_name"] == "Zoë Ämter, GmbH"
    assert received["to_names"] == ["Jürgen Groß"]


async def test_delivers_to_cc_and_bcc_without_revealing_bcc(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    email = email_factory(
        to=(Address("alice@example.org"),), cc=(Address("carol@example.org"),), bcc=(Address("bob@example.org"),)
    )

    result = await make_adapter().send(email)

    assert result.outcome is Outcome.ACCEPTED, result
    received = await only_delivered(sim, personality)
    assert sorted(received["recipients"]) == ["alice@example.org", "bob@example.org", "carol@example.org"]
    assert received["bcc"] == ["bob@example.org"]
    if provider_type in MIME_TYPES:
        assert not any(name.lower() == "bcc" for name in received["headers"])


async def test_batch_gives_one_personalised_result_per_email(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    names = {"ann@example.org": "Ann", "ben@example.org": "Ben", "cat@example.org": "Cat"}
    emails = [
        email_factory(
            message_class="bulk",
            to=(Address(address),),
            subject="Hello {{ name }}",
            text="Hi {{name}}, our sale starts today.",
            html="<p>Hi {{ name }}</p>",
            recipient_variables={address: {"name": name}},
        )
        for address, name in names.items()
    ]

    results = await make_adapter().send_batch(emails)

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3, results
    requests = await sim.client.requests(personality)
    assert len(requests) == (1 if provider_type in BATCHING_TYPES else 3)
    delivered = await sim.client.delivered_messages(personality)
    by_recipient = {m["to"][0]: m for m in delivered}
    assert set(by_recipient) == set(names)
    for email in emails:
        message = by_recipient[email.to[0].email]
        name = names[email.to[0].email]
        assert message["subject"] == f"Hello {name}"
        assert message["text"].strip() == f"Hi {name}, our sale starts today."
        assert message["esp_message_id"] == email.message_id


def header(message: dict[str, Any], name: str) -> str | None:
    """A delivered message's header, by case-insensitive name."""
    return next((value for key, value in message["headers"].items() if key.lower() == name.lower()), None)


def campaign_email(email_factory: Callable[..., OutboundEmail], address: str, **values: str) -> OutboundEmail:
    """One email of a campaign sent unrendered: the same content for everyone, the recipient's own values."""
    return email_factory(
        message_class="bulk",
        to=(Address(address),),
        subject="Hello {{ name }}",
        text="Hi {{name}}, our sale starts today.",
        html="<p>Hi {{ name }}</p>",
        headers={"List-Unsubscribe": "<https://esp.example/u/{{ token }}>",
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        recipient_variables={address: values},
    )


async def test_batch_gives_each_recipient_its_own_header_values(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    tokens = {"ann@example.org": "t-ann", "ben@example.org": "t-ben", "cat@example.org": "t-cat"}
    emails = [campaign_email(email_factory, address, name=address[:3], token=token)
              for address, token in tokens.items()]

    results = await make_adapter().send_batch(emails)

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3, results
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages(personality)}
    for address, token in tokens.items():
        assert header(delivered[address], "List-Unsubscribe") == f"<https://esp.example/u/{token}>"
        assert header(delivered[address], "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert delivered[address]["subject"] == f"Hello {address[:3]}"


async def test_a_single_send_renders_placeholders_in_header_values(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    email = campaign_email(email_factory, "ann@example.org", name="Ann", token="t-ann")

    result = await make_adapter().send(email)

    assert result.outcome is Outcome.ACCEPTED, result
    received = await only_delivered(sim, personality)
    assert header(received, "List-Unsubscribe") == "<https://esp.example/u/t-ann>"
    assert (received["subject"], received["text"].strip()) == ("Hello Ann", "Hi Ann, our sale starts today.")


async def test_a_placeholder_without_a_value_reads_as_written(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    emails = [campaign_email(email_factory, "ann@example.org", name="Ann", token="t-ann"),
              campaign_email(email_factory, "ben@example.org", token="t-ben")]

    results = await make_adapter().send_batch(emails)

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 2, results
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages(personality)}
    assert delivered["ann@example.org"]["subject"] == "Hello Ann"
    assert delivered["ben@example.org"]["subject"] == "Hello {{ name }}"
    assert delivered["ben@example.org"]["html"].strip() == "<p>Hi {{ name }}</p>"


#: What a server error (error_rate = 1) looks like per provider: HTTP 500, SMTP 450.
SERVER_ERROR_STATUS = {"mailgun": 500, "sendgrid": 500, "ses": 500, "postmark": 500, "smtp": 450}


async def test_server_error_is_retryable(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    await sim.client.set_knobs(personality, error_rate=1.0)

    result = await make_adapter().send(email_factory())

    assert result.outcome is Outcome.RETRYABLE, result
    assert result.status_code == SERVER_ERROR_STATUS[provider_type]


#: Providers that send Retry-After with their throttling answer (SES and SMTP relays do not).
SENDS_RETRY_AFTER = {"mailgun", "sendgrid", "postmark"}


async def test_throttling_is_throttled_with_the_providers_retry_after(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    await sim.client.set_knobs(personality, throttle_rps=0, retry_after_s=7)

    result = await make_adapter().send(email_factory())

    assert result.outcome is Outcome.THROTTLED, result
    assert result.retry_after_s == (7 if provider_type in SENDS_RETRY_AFTER else None)
    assert await sim.client.delivered_messages(personality) == []


async def test_invalid_recipient_is_permanent(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    result = await make_adapter().send(email_factory(to=(Address("bob@localhost-without-dot"),)))

    assert result.outcome is Outcome.PERMANENT, result
    assert not result.provider_fault
    assert await sim.client.delivered_messages(personality) == []


#: Credentials that the simulator refuses, per adapter type.
WRONG_CREDENTIALS = {
    "mailgun": {"api_key": "key-wrong"},
    "sendgrid": {"api_key": "SG.wrong"},
    "ses": {"access_key_id": "AKIASIMULATED0SES1", "secret_access_key": "wrong-secret"},
    "postmark": {"server_token": "wrong-token"},
    "smtp": {"username": "smtp-1", "password": "wrong-password"},
}


async def test_bad_credentials_are_permanent_and_the_providers_fault(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    adapter = make_adapter(credentials=WRONG_CREDENTIALS[provider_type])

    result = await adapter.send(email_factory())

    assert result.outcome is Outcome.PERMANENT, result
    assert result.provider_fault
    assert await sim.client.delivered_messages(personality) == []


async def test_timeout_after_the_request_was_sent_is_ambiguous(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    await sim.client.set_knobs(personality, hang_rate=1.0, hang_s=10)
    email = email_factory()

    result = await make_adapter(timeout_s=0.5).send(email)

    assert result.outcome is Outcome.AMBIGUOUS, result
    # The simulator did take the email: exactly the case where a blind retry would duplicate it.
    received = await only_delivered(sim, personality)
    assert received["esp_message_id"] == email.message_id


async def test_connection_refused_is_retryable(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    port = free_port()
    endpoint = f"127.0.0.1:{port}" if provider_type == "smtp" else f"http://127.0.0.1:{port}/p/{personality}"

    result = await make_adapter(endpoint=endpoint).send(email_factory())

    assert result.outcome is Outcome.RETRYABLE, result
    assert result.provider_fault


async def test_message_over_the_cap_is_refused_before_any_request(
    sim: RunningSimulator, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    adapter = make_adapter()
    oversized = exploding_attachment(adapter.capabilities.max_message_bytes)

    with pytest.raises(MessageTooLarge) as raised:
        await adapter.send(email_factory(attachments=(oversized,)))

    assert raised.value.size > raised.value.limit == adapter.capabilities.max_message_bytes
    assert await sim.client.requests(personality) == []


#: An outage: HTTP providers answer 503 (retryable); an SMTP relay answers 421, which we treat as throttling.
OUTAGE_OUTCOME = {"mailgun": Outcome.RETRYABLE, "sendgrid": Outcome.RETRYABLE, "ses": Outcome.RETRYABLE,
                  "postmark": Outcome.RETRYABLE, "smtp": Outcome.THROTTLED}


async def test_outage_is_a_transient_failure(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    await sim.client.set_knobs(personality, outage=True)

    result = await make_adapter().send(email_factory())

    assert result.outcome is OUTAGE_OUTCOME[provider_type], result
    assert result.provider_fault


#: The providers' answers to an exhausted daily quota: Mailgun 429, SendGrid 401 "Maximum credits exceeded",
#: SES ThrottlingException, Postmark ErrorCode 405, SMTP 454.
QUOTA_OUTCOME = {"mailgun": Outcome.THROTTLED, "sendgrid": Outcome.PERMANENT, "ses": Outcome.THROTTLED,
                 "postmark": Outcome.PERMANENT, "smtp": Outcome.THROTTLED}


async def test_exhausted_daily_quota_is_the_providers_fault(
    sim: RunningSimulator, provider_type: str, personality: str, make_adapter: Callable[..., BaseAdapter],
    email_factory: Callable[..., OutboundEmail],
) -> None:
    await sim.client.set_knobs(personality, daily_quota=1)
    adapter = make_adapter()

    first = await adapter.send(email_factory())
    second = await adapter.send(email_factory())

    assert first.outcome is Outcome.ACCEPTED, first
    assert second.outcome is QUOTA_OUTCOME[provider_type], second
    assert second.provider_fault
    assert len(await sim.client.delivered_messages(personality)) == 1
