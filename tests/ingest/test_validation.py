"""Validation: every bad field is reported at once as a field violation (google.rpc.BadRequest), and a refused
request changes nothing (no message, no credits held, no rate token, no quota)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import pytest
from esp.v1 import common_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from libs.common.errors import InvalidArgument
from services.ingest.model import EmailDraft, Mailbox
from services.ingest.validation import MAX_BODY_BYTES, MAX_RECIPIENTS, MAX_SUBJECT_CHARS, validate_draft
from tests.ingest.conftest import IngestHarness, refused, send_request

DRAFT = EmailDraft(message_class="transactional", sender=Mailbox("shop@example.com", "Shop"),
                   to=(Mailbox("rcpt@example.net", "Rcpt"),), subject="Hello", text_body="Hi")


def violations(draft: EmailDraft, **kwargs: Any) -> dict[str, str]:
    """field → reason of every violation ``draft`` has (empty when it is valid)."""
    try:
        validate_draft(draft, **kwargs)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_EMAIL_REQUEST"
        return {v.field: v.reason for v in exc.field_violations}
    return {}


# -- addresses ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "simple@example.com", "first.last+tag@example.co.uk", "o'brien@example.ie", "x@sub.domain.example",
    "Zoë@bücher.example", "用户@例子.广告", "почта@пример.рф", "user@xn--bcher-kva.example",
])
def test_rfc_5322_and_internationalised_addresses_are_accepted(address: str):
    assert violations(replace(DRAFT, to=(Mailbox(address),))) == {}


@pytest.mark.parametrize("address", [
    "no-at-sign.example.net", "two@@example.net", "trailing-dot.@example.net", "a@b", "spaces in@example.net",
    "@example.net", "user@", "user@-example.net", "user@exa_mple.net", "<user@example.net>",
])
def test_malformed_addresses_are_refused_field_by_field(address: str):
    assert violations(replace(DRAFT, to=(Mailbox("ok@example.net"), Mailbox(address)))) == {
        "to[1].email": "MALFORMED_ADDRESS"}


def test_addresses_come_back_in_canonical_form():
    valid = validate_draft(replace(DRAFT, to=(Mailbox("Someone@Bücher.EXAMPLE"),)))
    assert valid.to[0].email == "Someone@bücher.example"


def test_every_recipient_list_and_the_sender_are_checked():
    draft = replace(DRAFT, sender=Mailbox("bad"), cc=(Mailbox("bad"),), bcc=(Mailbox("bad"),),
                    reply_to=(Mailbox("bad"),))
    assert set(violations(draft)) == {"from[0].email", "cc[0].email", "bcc[0].email", "reply_to[0].email"}


def test_more_than_the_recipient_cap_is_refused():
    many = tuple(Mailbox(f"r{i}@example.net") for i in range(MAX_RECIPIENTS + 1))
    assert violations(replace(DRAFT, to=many[:30], cc=many[30:])) == {"to": "TOO_MANY_RECIPIENTS"}
    assert violations(replace(DRAFT, to=many[:MAX_RECIPIENTS])) == {}


# -- header injection --------------------------------------------------------------------------------------------
_BREAKS = st.sampled_from(["\r", "\n", "\r\n", "\0", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"])
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=20)


def _inject(where: str, value: str) -> EmailDraft:
    return {
        "subject": replace(DRAFT, subject=value),
        "sender name": replace(DRAFT, sender=Mailbox("shop@example.com", value)),
        "recipient name": replace(DRAFT, to=(Mailbox("rcpt@example.net", value),)),
        "header value": replace(DRAFT, headers={"X-Campaign": value}),
        "header name": replace(DRAFT, headers={f"X-{value}": "v"}),
        "tag": replace(DRAFT, tags=(value,)),
        "metadata value": replace(DRAFT, metadata={"k": value}),
        "metadata key": replace(DRAFT, metadata={value: "v"}),
        "recipient address": replace(DRAFT, to=(Mailbox(f"rcpt{value}@example.net"),)),
    }[where]


@settings(max_examples=150, deadline=None)
@given(where=st.sampled_from(["subject", "sender name", "recipient name", "header value", "header name", "tag",
                              "metadata value", "metadata key", "recipient address"]),
       before=_TEXT, line_break=_BREAKS, after=_TEXT)
def test_a_line_break_or_nul_anywhere_in_a_header_is_refused_as_injection(where: str, before: str, line_break: str,
                                                                  after: str):
    found = violations(_inject(where, f"{before}{line_break}Bcc: victim@example.org{after}"))
    assert "HEADER_INJECTION" in found.values(), found


@settings(max_examples=100, deadline=None)
@given(where=st.sampled_from(["subject", "sender name", "recipient name", "header value", "tag", "metadata value",
                              "metadata key"]), value=_TEXT.filter(lambda v: v.strip() != ""))
def test_the_same_fields_without_line_breaks_are_accepted(where: str, value: str):
    assert "HEADER_INJECTION" not in violations(_inject(where, value)).values()


# -- headers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["X-Campaign-Id", "List-Unsubscribe", "List-Unsubscribe-Post", "In-Reply-To"])
def test_headers_on_the_allow_list_are_accepted(name: str):
    assert violations(replace(DRAFT, headers={name: "value"})) == {}


@pytest.mark.parametrize("name", ["Bcc", "From", "Return-Path", "DKIM-Signature", "Content-Type", "X-ESP-Tenant",
                                  "Organization"])
def test_headers_off_the_allow_list_are_refused(name: str):
    assert violations(replace(DRAFT, headers={name: "value"})) == {f"headers[{name!r}]": "HEADER_NOT_ALLOWED"}


def test_a_tenants_own_allow_list_adds_headers_but_never_reserved_ones():
    draft = replace(DRAFT, headers={"Organization": "ACME", "Sender": "x@example.com"})
    assert violations(draft, extra_allowed_headers=frozenset({"organization", "sender"})) == {
        "headers['Sender']": "HEADER_NOT_ALLOWED"}


def test_a_header_name_with_a_colon_or_space_is_refused():
    assert violations(replace(DRAFT, headers={"X-A: b": "v"})) == {"headers['X-A: b']": "HEADER_INJECTION"}


# -- sizes, class, attachments -----------------------------------------------------------------------------------
def test_a_subject_longer_than_an_rfc_5322_line_is_refused():
    assert violations(replace(DRAFT, subject="s" * (MAX_SUBJECT_CHARS + 1))) == {"subject": "TOO_LONG"}
    assert violations(replace(DRAFT, subject="s" * MAX_SUBJECT_CHARS)) == {}


def test_a_body_larger_than_the_cap_is_refused_counting_utf8_bytes():
    two_byte_chars = "é" * (MAX_BODY_BYTES // 2 + 1)  # under the cap in characters, over it in bytes
    assert violations(replace(DRAFT, html_body=two_byte_chars)) == {"html_body": "TOO_LARGE"}
    assert violations(replace(DRAFT, text_body="a" * MAX_BODY_BYTES)) == {}


def test_an_email_needs_a_body():
    assert set(violations(replace(DRAFT, text_body="", html_body=""))) == {"text_body"}


def test_the_message_class_is_required():
    assert set(violations(replace(DRAFT, message_class=""))) == {"message_class"}


def test_malformed_or_repeated_attachment_ids_are_refused():
    found = violations(replace(DRAFT, attachment_ids=("../etc/passwd", "abc", "attachments/abc")))
    assert set(found) == {"attachment_ids[0]", "attachment_ids[2]"}


def test_every_problem_is_reported_at_once():
    draft = replace(DRAFT, message_class="", to=(Mailbox("bad"),), subject="a\nb", headers={"Bcc": "x"})
    assert set(violations(draft)) == {"message_class", "to[0].email", "subject", "headers['Bcc']"}


# -- through the API ---------------------------------------------------------------------------------------------
async def test_the_api_returns_invalid_argument_with_a_violation_per_field(harness: IngestHarness):
    tenant = await harness.new_tenant()
    failed = await refused(harness.messages.SendEmail(send_request(
        to=[common_pb2.EmailAddress(email="nope")], subject="x\r\nBcc: victim@example.org",
        headers={"X-Ok": "fine", "Received": "forged"}), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.info.reason == "INVALID_EMAIL_REQUEST"
    assert sorted(failed.fields) == sorted(["to[0].email", "subject", "headers['Received']"])
    assert failed.violation("subject").reason == "HEADER_INJECTION"


async def test_a_refused_request_changes_nothing(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=0.01, daily_quota=1)
    before = await harness.balance(tenant)
    for bad in (send_request(to=[common_pb2.EmailAddress(email="nope")]),
                send_request(attachment_ids=["a" * 24]),
                send_request(message_class=common_pb2.MESSAGE_CLASS_UNSPECIFIED, request_id="r-1")):
        await refused(harness.messages.SendEmail(bad, metadata=tenant.auth))
    assert await harness.balance(tenant) == before
    assert await harness.message_rows(tenant) == 0
    assert await harness.parts.gate.used_today(tenant.id) == 0
    # The one email the rate (burst of 1) and the quota (1 a day) allow is still available, and request_id r-1
    # is still free.
    sent = await harness.send(tenant, send_request(request_id="r-1"))
    assert sent.request_id == "r-1"


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-."
_LABEL = st.text(alphabet="abcXYZ019-", min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(local=st.text(alphabet=_ATEXT, min_size=1, max_size=70),
       labels=st.lists(_LABEL, min_size=1, max_size=4),
       tld=st.text(alphabet="abcXYZ019-", min_size=1, max_size=6))
@example(local="first.last+tag", labels=["Mail-1", "example"], tld="COM")
@example(local="a", labels=["b--c"], tld="com")
def test_the_fast_path_for_everyday_addresses_agrees_with_the_full_rfc_check(local: str, labels: list[str],
                                                                          tld: str):
    from email_validator import EmailNotValidError, validate_email

    from libs.common.addresses import _plain_address

    address = f"{local}@{'.'.join([*labels, tld])}"
    fast = _plain_address(address)
    try:
        full: str | None = validate_email(address, check_deliverability=False, allow_smtputf8=True).normalized
    except EmailNotValidError:
        full = None
    if fast is not None:  # the fast path may pass an address on to the full check, never decide differently
        assert fast == full
