"""Each adapter speaks its provider's documented API: paths, auth, body format, status codes, id formats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import httpx
import pytest

from dev.simulator import RunningSimulator
from dev.simulator.parsing import parse_form_data
from dev.smtp_sink import serve as serve_smtp_sink
from libs.providers.base import BaseAdapter
from libs.providers.domain_registration import create_registrar
from libs.providers.errors import TooManyRecipients, UnsupportedFeature
from libs.providers.model import Address, OutboundEmail, Outcome, SendResult
from libs.providers.registry import create_adapter
from libs.providers.ses.send import classify_client_error
from tests.conftest import free_port
from tests.providers.conftest import new_email


def campaign(count: int) -> list[OutboundEmail]:
    """``count`` emails of one campaign sent unrendered: equal content and headers, each recipient's own values."""
    return [
        new_email(message_class="bulk", to=(Address(f"r{i}@example.org"),), subject="Hi {{ name }}",
                  text="Dear {{name}}", html="<p>Dear {{ name }}</p>",
                  headers={"List-Unsubscribe": "<https://u.example/{{ token }}>"},
                  recipient_variables={f"r{i}@example.org": {"name": f"R{i}", "token": f"t{i}", "unused": "x"}})
        for i in range(count)
    ]


async def form_fields(request: httpx.Request) -> dict[str, list[str]]:
    """A multipart request's text fields, by name."""
    fields: dict[str, list[str]] = {}
    for name, value in parse_form_data(await request.aread(), request.headers["content-type"]):
        if isinstance(value, str):
            fields.setdefault(name, []).append(value)
    return fields


def adapter_for(sim: RunningSimulator, personality: str, **overrides: Any) -> BaseAdapter:
    adapter = create_adapter(sim.provider_config(personality, **overrides))
    assert isinstance(adapter, BaseAdapter)
    return adapter


async def send_one(sim: RunningSimulator, personality: str, **overrides: Any) -> SendResult:
    email = overrides.pop("email", None) or new_email()
    adapter = adapter_for(sim, personality, **overrides)
    try:
        return await adapter.send(email)
    finally:
        await adapter.aclose()


async def only_request(sim: RunningSimulator, personality: str) -> dict[str, Any]:
    records = await sim.client.requests(personality)
    assert len(records) == 1, records
    return records[0]


# -- Mailgun ---------------------------------------------------------------------------------------------------


async def test_mailgun_posts_multipart_with_basic_auth_to_the_domains_messages_path(sim: RunningSimulator) -> None:
    result = await send_one(sim, "mailgun-us")

    record = await only_request(sim, "mailgun-us")
    assert (record["method"], record["path"], record["status"]) == ("POST", "/v3/mg.example.com/messages", 200)
    assert record["request_headers"]["authorization-scheme"] == "Basic"
    assert record["request_headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert "transfer-encoding" not in record["request_headers"]  # streamed, but with an exact Content-Length
    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("<") and result.provider_message_id.endswith("@mg.example.com>")


async def test_mailgun_unknown_domain_is_permanent_and_the_providers_fault(sim: RunningSimulator) -> None:
    result = await send_one(sim, "mailgun-us", options={"domain": "elsewhere.example.com"})

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 404, True)
    assert "Domain not found" in result.reason


async def _register_at_mailgun(sim: RunningSimulator, domain: str) -> None:
    registrar = create_registrar(sim.provider_config("mailgun-us"))
    try:
        await registrar.register(domain)
    finally:
        await registrar.aclose()


async def test_mailgun_sends_a_tenant_domains_mail_through_that_domain_once_registered(sim: RunningSimulator) -> None:
    await _register_at_mailgun(sim, "shop-mg.example.org")

    result = await send_one(sim, "mailgun-us", email=new_email(
        sender=Address("news@shop-mg.example.org"), sending_domain="shop-mg.example.org"))

    record = (await sim.client.requests("mailgun-us"))[-1]  # after the registration's
    assert (record["path"], record["status"], result.outcome) == (
        "/v3/shop-mg.example.org/messages", 200, Outcome.ACCEPTED)


async def test_mailgun_refuses_a_tenant_domain_it_has_not_verified(sim: RunningSimulator) -> None:
    await _register_at_mailgun(sim, "held-mg.example.org")
    await sim.client.hold_domain("mailgun-us", "held-mg.example.org", "pending")

    result = await send_one(sim, "mailgun-us", email=new_email(
        sender=Address("news@held-mg.example.org"), sending_domain="held-mg.example.org"))

    assert (result.outcome, result.status_code) == (Outcome.PERMANENT, 404)
    assert "Domain not found: held-mg.example.org" in result.reason


async def test_mailgun_sends_sandbox_mail_through_its_configured_domain(sim: RunningSimulator) -> None:
    await send_one(sim, "mailgun-us", email=new_email(sender=Address("news@example.com")))

    assert (await only_request(sim, "mailgun-us"))["path"] == "/v3/mg.example.com/messages"


async def test_mailgun_banner_answer_from_a_wrong_path_is_not_taken_for_success(sim: RunningSimulator) -> None:
    result = await send_one(sim, "mailgun-us", endpoint=f"{sim.http_url}/p/mailgun-us/api")

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 200, True)
    assert "Mailgun Magnificent API" in result.reason


async def test_mailgun_refuses_a_fourth_tag_before_sending(sim: RunningSimulator) -> None:
    with pytest.raises(UnsupportedFeature):
        await send_one(sim, "mailgun-us", email=new_email(tags=("a", "b", "c", "d")))

    assert await sim.client.requests("mailgun-us") == []


async def test_mailgun_batch_is_one_call_whose_id_every_email_shares(sim: RunningSimulator) -> None:
    emails = [new_email(to=(Address(f"user{i}@example.org"),)) for i in range(3)]
    adapter = adapter_for(sim, "mailgun-us")
    try:
        results = await adapter.send_batch(emails)
    finally:
        await adapter.aclose()

    assert len({r.provider_message_id for r in results}) == 1
    delivered = await sim.client.delivered_messages("mailgun-us")
    # Recipient variables make Mailgun send each recipient a message of their own.
    assert sorted(m["to"][0] for m in delivered) == ["user0@example.org", "user1@example.org", "user2@example.org"]
    assert all(len(m["to"]) == 1 for m in delivered)


async def test_mailgun_batch_carries_each_recipients_values_and_translates_header_placeholders(
    sim: RunningSimulator,
) -> None:
    emails = campaign(1000)
    adapter = adapter_for(sim, "mailgun-us")
    try:
        fields = await form_fields(adapter.build_batch_request(emails))
    finally:
        await adapter.aclose()

    assert (fields["subject"], fields["text"], fields["html"]) == (
        ["Hi %recipient.name%"], ["Dear %recipient.name%"], ["<p>Dear %recipient.name%</p>"])
    assert fields["h:List-Unsubscribe"] == ["<https://u.example/%recipient.token%>"]
    assert len(fields["to"]) == 1000
    variables = json.loads(fields["recipient-variables"][0])
    assert variables["r7@example.org"] == {"name": "R7", "token": "t7", "esp_message_id": emails[7].message_id}


async def test_mailgun_batch_delivers_each_recipient_its_own_values_in_one_call(sim: RunningSimulator) -> None:
    adapter = adapter_for(sim, "mailgun-us")
    try:
        results = await adapter.send_batch(campaign(1000))
    finally:
        await adapter.aclose()

    assert {r.outcome for r in results} == {Outcome.ACCEPTED}
    assert len(await sim.client.requests("mailgun-us")) == 1
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages("mailgun-us")}
    assert len(delivered) == 1000
    assert delivered["r7@example.org"]["subject"] == "Hi R7"
    assert delivered["r7@example.org"]["headers"]["List-Unsubscribe"] == "<https://u.example/t7>"


# -- SendGrid --------------------------------------------------------------------------------------------------


async def test_sendgrid_posts_json_with_a_bearer_token_and_reads_x_message_id(sim: RunningSimulator) -> None:
    result = await send_one(sim, "sendgrid-1")

    record = await only_request(sim, "sendgrid-1")
    assert (record["method"], record["path"], record["status"]) == ("POST", "/v3/mail/send", 202)
    assert record["request_headers"]["authorization-scheme"] == "Bearer"
    assert record["request_headers"]["content-type"] == "application/json"
    assert record["request_headers"]["accept"] == "application/json"
    assert result.provider_message_id == record["messages"][0]["provider_message_id"]


async def test_sendgrid_sandbox_mode_is_validated_but_not_delivered(sim: RunningSimulator) -> None:
    result = await send_one(sim, "sendgrid-1", options={"sandbox": "true"})

    record = await only_request(sim, "sendgrid-1")
    assert (result.outcome, result.status_code) == (Outcome.ACCEPTED, 200)
    assert record["result"] == "sandbox"
    assert await sim.client.delivered_messages("sendgrid-1") == []


async def test_sendgrid_batch_never_repeats_an_address_within_one_request(sim: RunningSimulator) -> None:
    # SendGrid refuses a request naming an address twice, so the same recipient goes in a second request.
    emails = [new_email(to=(Address("same@example.org"),)), new_email(to=(Address("same@example.org"),))]
    adapter = adapter_for(sim, "sendgrid-1")
    try:
        results = await adapter.send_batch(emails)
    finally:
        await adapter.aclose()

    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert len(await sim.client.requests("sendgrid-1")) == 2


async def test_sendgrid_refuses_an_eleventh_category_before_sending(sim: RunningSimulator) -> None:
    with pytest.raises(UnsupportedFeature):
        await send_one(sim, "sendgrid-1", email=new_email(tags=tuple(f"t{i}" for i in range(11))))


async def test_sendgrid_batch_renders_header_placeholders_into_each_personalization(sim: RunningSimulator) -> None:
    emails = campaign(3)
    adapter = adapter_for(sim, "sendgrid-1")
    try:
        payload = json.loads(await adapter.build_batch_request(emails).aread())
    finally:
        await adapter.aclose()

    # SendGrid substitutes in the subject and bodies only: a header is rendered here, per recipient.
    assert "List-Unsubscribe" not in payload.get("headers", {})
    assert (payload["subject"], payload["content"][1]["value"]) == ("Hi {{name}}", "<p>Dear {{name}}</p>")
    second = payload["personalizations"][1]
    assert second["headers"]["List-Unsubscribe"] == "<https://u.example/t1>"
    assert second["substitutions"] == {"{{name}}": "R1"}


async def test_sendgrid_single_send_is_rendered_before_the_call(sim: RunningSimulator) -> None:
    [email] = campaign(1)
    adapter = adapter_for(sim, "sendgrid-1")
    try:
        payload = json.loads(await adapter.build_request(email).aread())
    finally:
        await adapter.aclose()

    assert (payload["subject"], payload["headers"]["List-Unsubscribe"]) == ("Hi R0", "<https://u.example/t0>")
    assert "substitutions" not in payload["personalizations"][0]


# -- Amazon SES ------------------------------------------------------------------------------------------------


async def test_ses_sends_raw_content_signed_with_sigv4(sim: RunningSimulator) -> None:
    email = new_email()

    result = await send_one(sim, "ses-1", email=email)

    record = await only_request(sim, "ses-1")
    assert (record["method"], record["path"], record["status"]) == ("POST", "/v2/email/outbound-emails", 200)
    assert record["request_headers"]["authorization-scheme"] == "AWS4-HMAC-SHA256"
    assert "x-amz-date" in record["request_headers"]
    assert result.provider_message_id == record["messages"][0]["provider_message_id"]
    # EmailTags carry our ids, so SES events (mail.tags) can be matched without the provider id.
    assert record["messages"][0]["metadata"]["esp_message_id"] == email.message_id


async def test_ses_credentials_scoped_to_another_region_are_refused(sim: RunningSimulator) -> None:
    result = await send_one(sim, "ses-1", region="eu-west-1")

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 403, True)
    assert "InvalidSignatureException" in result.reason


async def test_ses_refuses_a_51st_recipient_before_sending(sim: RunningSimulator) -> None:
    many = tuple(Address(f"r{i}@example.org") for i in range(51))

    with pytest.raises(TooManyRecipients):
        await send_one(sim, "ses-1", email=new_email(to=many))

    assert await sim.client.requests("ses-1") == []


async def test_ses_refuses_tags_it_cannot_carry_before_sending(sim: RunningSimulator) -> None:
    with pytest.raises(UnsupportedFeature):
        await send_one(sim, "ses-1", email=new_email(tags=("spring sale!",)))


async def test_ses_unverified_sender_identity_is_permanent_and_the_providers_fault(sim: RunningSimulator) -> None:
    email = new_email(sender=Address("unverified-shop@example.com"))

    result = await send_one(sim, "ses-1", email=email)

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 400, True)
    assert result.reason.startswith("MessageRejected: Email address is not verified.")
    assert await sim.client.delivered_messages("ses-1") == []


def test_ses_message_rejected_for_its_content_is_the_emails_fault() -> None:
    # What botocore raises for SES's 400 MessageRejected about the content (the simulator's answer for the identity
    # case above comes through the same class).
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": "MessageRejected", "Message": "Illegal header 'X-Bad Header'."},
         "ResponseMetadata": {"HTTPStatusCode": 400}}, "SendEmail")

    result = classify_client_error(error)

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 400, False)


# -- Postmark --------------------------------------------------------------------------------------------------


async def test_postmark_posts_json_with_the_server_token_header(sim: RunningSimulator) -> None:
    email = new_email(tags=("receipt",), metadata={"order": "42"})

    result = await send_one(sim, "postmark-1", email=email)

    record = await only_request(sim, "postmark-1")
    assert (record["method"], record["path"], record["status"]) == ("POST", "/email", 200)
    assert record["request_headers"]["x-postmark-server-token"] == "present"
    assert record["request_headers"]["accept"] == "application/json"
    message = record["messages"][0]
    assert message["tags"] == ["receipt"]
    assert message["metadata"] == {"order": "42", "esp_message_id": email.message_id, "esp_tenant_id": "tenant-1"}
    assert result.provider_message_id == message["provider_message_id"]


async def test_postmark_batch_reports_each_messages_own_outcome(sim: RunningSimulator) -> None:
    emails = [new_email(), new_email(to=(Address("broken@nowhere"),)), new_email()]
    adapter = adapter_for(sim, "postmark-1")
    try:
        results = await adapter.send_batch(emails)
    finally:
        await adapter.aclose()

    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.PERMANENT, Outcome.ACCEPTED]
    assert "ErrorCode 300" in results[1].reason
    assert results[0].provider_message_id != results[2].provider_message_id
    record = await only_request(sim, "postmark-1")
    assert record["path"] == "/email/batch"


async def test_postmark_inactive_recipient_is_permanent_but_not_the_providers_fault(sim: RunningSimulator) -> None:
    result = await send_one(sim, "postmark-1", email=new_email(to=(Address("inactive.user@example.org"),)))

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 422, False)
    assert "ErrorCode 406" in result.reason


async def test_postmark_test_token_validates_without_delivering(sim: RunningSimulator) -> None:
    result = await send_one(sim, "postmark-1", credentials={"server_token": "POSTMARK_API_TEST"})

    assert result.outcome is Outcome.ACCEPTED
    assert await sim.client.delivered_messages("postmark-1") == []


async def test_postmark_refuses_a_second_tag_before_sending(sim: RunningSimulator) -> None:
    with pytest.raises(UnsupportedFeature):
        await send_one(sim, "postmark-1", email=new_email(tags=("a", "b")))


# -- SMTP ------------------------------------------------------------------------------------------------------


async def test_smtp_upgrades_with_starttls_and_authenticates(sim: RunningSimulator) -> None:
    result = await send_one(sim, "smtp-1", options={"tls": "starttls", "validate_certs": "false"})

    assert result.outcome is Outcome.ACCEPTED, result
    record = await only_request(sim, "smtp-1")
    assert record["request_headers"]["tls"] == "yes"


async def test_smtp_keeps_lines_that_start_with_a_dot(sim: RunningSimulator) -> None:
    text = ".\n.hidden line\n..two dots\nend"

    await send_one(sim, "smtp-1", email=new_email(text=text, html=None))

    delivered = await sim.client.delivered_messages("smtp-1")
    assert delivered[0]["text"].replace("\r\n", "\n").rstrip("\n") == text


async def test_smtp_accepts_for_the_other_recipients_and_names_each_refused_one(sim: RunningSimulator) -> None:
    email = new_email(to=(Address("alice@example.org"), Address("nobody@no-dot")), cc=(Address("carol@dot-less"),))

    result = await send_one(sim, "smtp-1", email=email)

    assert result.outcome is Outcome.ACCEPTED, result
    assert result.refused_recipients == {
        "nobody@no-dot": "553 5.1.3 The recipient address is not a valid RFC 5321 address",
        "carol@dot-less": "553 5.1.3 The recipient address is not a valid RFC 5321 address",
    }
    delivered = await sim.client.delivered_messages("smtp-1")
    assert delivered[0]["recipients"] == ["alice@example.org"]


async def test_smtp_accepted_for_every_recipient_names_none_refused(sim: RunningSimulator) -> None:
    result = await send_one(sim, "smtp-1", email=new_email(to=(Address("alice@example.org"),)))

    assert result.outcome is Outcome.ACCEPTED, result
    assert result.refused_recipients == {}


async def test_smtp_refused_for_every_recipient_is_permanent_and_the_emails_fault(sim: RunningSimulator) -> None:
    email = new_email(to=(Address("nobody@no-dot"), Address("carol@dot-less")))

    result = await send_one(sim, "smtp-1", email=email)

    assert (result.outcome, result.status_code, result.provider_fault) == (Outcome.PERMANENT, 553, False)
    assert await sim.client.delivered_messages("smtp-1") == []


async def test_smtp_reuses_one_session_for_consecutive_emails(sim: RunningSimulator) -> None:
    adapter = adapter_for(sim, "smtp-1", options={"tls": "none", "pool_size": "1"})
    try:
        results = [await adapter.send(new_email()) for _ in range(3)]
    finally:
        await adapter.aclose()

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3
    peers = {record["request_headers"]["peer"] for record in await sim.client.requests("smtp-1")}
    assert len(peers) == 1


@pytest.fixture
async def plain_relay(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A real SMTP relay that offers neither STARTTLS nor AUTH (``dev.smtp_sink``): its endpoint and its maildir."""
    port, maildir, stop = free_port(), tmp_path / "mail", asyncio.Event()
    relay = asyncio.create_task(serve_smtp_sink("127.0.0.1", port, maildir, stop))
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        break
    yield f"127.0.0.1:{port}", maildir
    stop.set()
    await relay


async def test_smtp_relay_without_starttls_is_permanent_and_the_providers_fault(
    sim: RunningSimulator, plain_relay: tuple[str, Path],
) -> None:
    endpoint, maildir = plain_relay

    result = await send_one(sim, "smtp-1", endpoint=endpoint, credentials={}, options={"tls": "starttls"})

    assert (result.outcome, result.provider_fault) == (Outcome.PERMANENT, True), result
    assert "STARTTLS" in result.reason
    assert list(maildir.glob("*.eml")) == []  # nothing went in clear text


async def test_smtp_relay_without_auth_for_our_credentials_is_permanent_and_the_providers_fault(
    sim: RunningSimulator, plain_relay: tuple[str, Path],
) -> None:
    endpoint, maildir = plain_relay

    result = await send_one(sim, "smtp-1", endpoint=endpoint, options={"tls": "none"})

    assert (result.outcome, result.provider_fault) == (Outcome.PERMANENT, True), result
    assert "AUTH" in result.reason
    assert list(maildir.glob("*.eml")) == []
