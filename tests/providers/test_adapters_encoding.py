"""The shared encoders and helpers under every adapter: MIME, streamed bodies, sizes, personalisation, registry."""

from __future__ import annotations

import base64
import email
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.providers.base import parse_retry_after
from libs.providers.errors import AdapterConfigError, AttachmentSizeMismatch, InvalidMessage, UnknownProviderType
from libs.providers.mime import (
    base64_chunks,
    base64_encoded_size,
    build_mime,
    check_header_fields,
    fits_size_cap,
    mime_size,
    mime_size_bound,
    streamed_form_data,
    streamed_json,
)
from libs.providers.model import Address, Attachment, ProviderConfig, personalize
from libs.providers.registry import adapter_types, create_adapter
from libs.providers.smtp.send import DotStuffer, classify_reply, queue_id_from_reply
from tests.providers.conftest import new_email


def streamed(data: bytes, chunk: int) -> Attachment:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), chunk):
            yield data[start : start + chunk]

    return Attachment("data.bin", "application/octet-stream", len(data), chunks)


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


# -- MIME --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        {"html": None},
        {"text": None},
        {},
        {"attachments": (Attachment.from_bytes("a.txt", "text/plain", b"x" * 1000),)},
        {"attachments": (Attachment.from_bytes("logo.png", "image/png", b"p" * 77, content_id="logo"),)},
        {"attachments": (Attachment.from_bytes("r.pdf", "application/pdf", b"\0" * 58),
                         Attachment.from_bytes("i.png", "image/png", b"", content_id="i"))},
    ],
)
async def test_mime_size_is_exactly_what_is_streamed(shape: dict) -> None:
    message = new_email(subject="Grüße 🎉", **shape)

    document = build_mime(message)

    assert len(await document.read()) == document.size == mime_size(message)


_LINE_BREAKS = "\x00\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # refused in headers (NUL and str.splitlines)
_header_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=_LINE_BREAKS), max_size=120)
_names = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"), min_size=1,
                 max_size=20).map(lambda name: f"X-{name}")
_addresses = st.builds(Address, st.sampled_from(["a@example.com", "bob.smith+tag@sub.example.org"]), _header_text)


@settings(deadline=None)  # the exact size renders MIME: slow on a loaded machine, and time is not the point
@given(
    subject=_header_text, text=st.none() | st.text(max_size=3000), html=st.none() | st.text(max_size=3000),
    to=st.lists(_addresses, min_size=1, max_size=4), cc=st.lists(_addresses, max_size=2),
    headers=st.dictionaries(_names, _header_text, max_size=3),
    files=st.lists(st.tuples(_header_text, st.integers(0, 5000), st.booleans()), max_size=3),
)
def test_the_cheap_size_bound_is_never_below_the_exact_mime_size(
    subject: str, text: str | None, html: str | None, to: list[Address], cc: list[Address],
    headers: dict[str, str], files: list[tuple[str, int, bool]],
) -> None:
    attachments = tuple(Attachment.from_bytes(name or "f", "application/pdf", b"x" * size,
                                              content_id=f"c{index}" if inline else None)
                        for index, (name, size, inline) in enumerate(files))
    message = new_email(subject=subject, text=text, html=html if text or html else "<p/>", to=tuple(to),
                        cc=tuple(cc), headers=headers, attachments=attachments)

    assert mime_size_bound(message) >= mime_size(message)


@pytest.mark.parametrize("value", ["é" * 200, "x" * 2000, "🎉 " * 100, ""])
def test_the_cheap_size_bound_counts_what_the_recipients_values_add(value: str) -> None:
    message = new_email(
        to=(Address("alice@example.org"),), subject="{{ name }}" * 10, text="Dear {{name}}. " * 50,
        html="<p>{{ name }}</p>" * 50, headers={"List-Unsubscribe": "<https://u.example/{{ name }}>"},
        recipient_variables={"alice@example.org": {"name": value, "unused": "y"}})

    assert mime_size_bound(message) >= mime_size(message)


def test_the_exact_size_is_the_size_of_the_email_as_rendered() -> None:
    message = new_email(to=(Address("alice@example.org"),), subject="Hi {{ name }}", html="<p>{{ name }}</p>",
                        recipient_variables={"alice@example.org": {"name": "Alice " * 50}})

    assert mime_size(message) == build_mime(personalize(message)).size > build_mime(message).size


def test_a_size_cap_between_the_bound_and_the_exact_size_is_judged_by_the_exact_size() -> None:
    message = new_email(html="é" * 10_000)
    exact, bound = mime_size(message), mime_size_bound(message)
    assert exact < bound

    assert fits_size_cap(message, exact) == (True, exact)
    assert fits_size_cap(message, exact - 1) == (False, exact)
    assert fits_size_cap(message, bound) == (True, bound)


@pytest.mark.parametrize("fields", [
    {"headers": {"Subject": "override"}},
    {"headers": {"X-Evil": "a\r\nBcc: victim@example.com"}},
    {"headers": {"Bad Name": "x"}},
    {"subject": "hi\nBcc: victim@example.com"},
    {"subject": "next line\x85Bcc: victim@example.com"},
    {"to": (Address("alice@example.org", "Alice\r\nBcc: x@example.com"),)},
])
def test_header_problems_are_found_without_rendering_the_message(fields: dict) -> None:
    message = new_email(**fields)

    with pytest.raises(InvalidMessage):
        check_header_fields(message)


@pytest.mark.parametrize("fields", [{"subject": "Hi {{ name }}"}, {"headers": {"X-Greeting": "Hi {{name}}"}}])
def test_a_line_break_in_a_value_substituted_into_a_header_is_refused(fields: dict) -> None:
    message = new_email(to=(Address("alice@example.org"),), **fields,
                        recipient_variables={"alice@example.org": {"name": "Al\r\nBcc: victim@example.com"}})

    with pytest.raises(InvalidMessage):
        check_header_fields(message)


def test_a_line_break_in_a_value_used_only_in_the_bodies_is_fine() -> None:
    message = new_email(to=(Address("alice@example.org"),), text="Dear {{ name }}", html=None,
                        recipient_variables={"alice@example.org": {"name": "Alice\nand Bob"}})

    check_header_fields(message)


async def test_mime_round_trips_through_a_standard_parser() -> None:
    message = new_email(
        sender=Address("shop@example.com", "Zoë, GmbH"),
        bcc=(Address("hidden@example.org"),),
        headers={"List-Unsubscribe": "<mailto:u@example.com>"},
        attachments=(Attachment.from_bytes("résumé.pdf", "application/pdf", b"%PDF" * 100),),
    )

    parsed = email.message_from_bytes(await build_mime(message).read(), policy=policy.default)

    assert parsed["From"].addresses[0].display_name == "Zoë, GmbH"
    assert parsed["X-ESP-Message-Id"] == message.message_id
    assert parsed["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert parsed["Bcc"] is None
    attachment = next(parsed.iter_attachments())
    assert (attachment.get_filename(), attachment.get_content()) == ("résumé.pdf", b"%PDF" * 100)


def test_retries_of_an_email_carry_the_same_message_id_header() -> None:
    message = new_email()
    first = build_mime(message, date=datetime(2024, 1, 1, tzinfo=UTC))
    second = build_mime(message, date=datetime(2024, 1, 1, tzinfo=UTC))

    assert first.segments == second.segments


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
async def test_streamed_base64_lines_decode_to_the_original_bytes(data: bytes, chunk: int) -> None:
    encoded = await collect(base64_chunks(streamed(data, chunk), line_breaks=True))

    assert base64.b64decode(encoded) == data
    assert len(encoded) == base64_encoded_size(len(data), line_length=76)
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))


async def test_attachment_shorter_than_declared_is_an_error() -> None:
    liar = Attachment("a.bin", "application/octet-stream", 10, streamed(b"12345", 2).chunks)

    with pytest.raises(AttachmentSizeMismatch):
        await collect(base64_chunks(liar, line_breaks=False))


def test_encoded_size_counts_attachments_as_base64_with_line_breaks() -> None:
    bare = new_email()
    with_file = new_email(message_id=bare.message_id, attachments=(streamed(b"x" * 57_000, 1000),))

    growth = mime_size(with_file) - mime_size(bare)

    assert growth > base64_encoded_size(57_000, line_length=76)  # plus the part's headers and boundaries
    assert growth < base64_encoded_size(57_000, line_length=76) + 1000


# -- streamed HTTP bodies ------------------------------------------------------------------------------------


async def test_streamed_json_puts_attachments_in_as_base64_strings() -> None:
    data = bytes(range(256)) * 40
    body = streamed_json({"Subject": "Grüße \"quoted\"", "Attachments": [{"Content": streamed(data, 333)}]})

    raw = await body.read()

    assert len(raw) == body.size
    expected_content = base64.b64encode(data).decode()
    assert json.loads(raw) == {"Subject": 'Grüße "quoted"', "Attachments": [{"Content": expected_content}]}


async def test_streamed_form_data_has_an_exact_length_and_raw_file_bytes() -> None:
    data = b"\r\n--not-a-boundary\r\n" * 100
    body = streamed_form_data([("to", "a@example.org"), ("attachment", ("ä.bin", streamed(data, 7)))],
                              boundary="B0UNDARY")

    raw = await body.read()

    assert len(raw) == body.size
    assert body.content_type == "multipart/form-data; boundary=B0UNDARY"
    assert data in raw
    assert raw.endswith(b"--B0UNDARY--\r\n")


# -- SMTP details ------------------------------------------------------------------------------------------


@given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"\r", b"\n", b".."]), max_size=40),
       st.integers(min_value=1, max_value=5))
def test_dot_stuffing_does_not_depend_on_chunk_boundaries(pieces: list[bytes], chunk: int) -> None:
    data = b"".join(pieces)
    whole = DotStuffer().feed(data)
    stuffer = DotStuffer()

    chunked = b"".join(stuffer.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))

    assert chunked == whole
    assert (b"\r\n" + whole).replace(b"\r\n..", b"\r\n.")[2:] == data


@pytest.mark.parametrize(
    ("code", "outcome", "provider_fault"),
    [(421, "throttled", True), (454, "throttled", True), (450, "retryable", False), (550, "permanent", False),
     (535, "permanent", True)],
)
def test_smtp_replies_map_to_outcomes(code: int, outcome: str, provider_fault: bool) -> None:
    result = classify_reply(code, "text")

    assert (result.outcome, result.provider_fault) == (outcome, provider_fault)


def test_queue_id_is_read_from_the_relays_reply() -> None:
    assert queue_id_from_reply("2.0.0 Ok: queued as 4BfX3b1Tz") == "4BfX3b1Tz"
    assert queue_id_from_reply("Ok 0100018c-abc") == "Ok 0100018c-abc"


# -- personalisation and headers ------------------------------------------------------------------------------


def test_personalize_renders_placeholders_for_the_single_recipient() -> None:
    message = new_email(
        to=(Address("ann@example.org"),), subject="Hi {{ name }}", text="{{name}} owes {{ amount }} {{unknown}}",
        html=None, recipient_variables={"ann@example.org": {"name": "Ann", "amount": "5 €"}},
    )

    rendered = personalize(message)

    assert (rendered.subject, rendered.text) == ("Hi Ann", "Ann owes 5 € {{unknown}}")
    assert rendered.recipient_variables == {}


def test_personalize_renders_placeholders_in_header_values() -> None:
    message = new_email(
        to=(Address("ann@example.org"),), headers={"List-Unsubscribe": "<https://u.example/{{ token }}>", "X-A": "b"},
        recipient_variables={"ann@example.org": {"token": "t1"}},
    )

    rendered = personalize(message)

    assert rendered.headers == {"List-Unsubscribe": "<https://u.example/t1>", "X-A": "b"}


def test_personalize_renders_the_to_recipients_values_for_cc_and_bcc_alike() -> None:
    message = new_email(
        to=(Address("ann@example.org"),), cc=(Address("boss@example.org"),), subject="Hi {{ name }}",
        recipient_variables={"ann@example.org": {"name": "Ann"}},
    )

    assert personalize(message).subject == "Hi Ann"


def test_personalize_leaves_an_email_with_several_to_recipients_as_it_is() -> None:
    message = new_email(
        to=(Address("ann@example.org"), Address("ben@example.org")), subject="Hi {{ name }}",
        recipient_variables={"ann@example.org": {"name": "Ann"}},
    )

    assert personalize(message) == message


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0", 0.0), ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0), ("soon", None), (None, None)],
)
def test_retry_after_accepts_seconds_and_http_dates(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)

    assert parse_retry_after(header, now=now) == seconds


# -- registry and configuration -------------------------------------------------------------------------------


def test_every_builtin_adapter_type_is_registered() -> None:
    assert adapter_types() == ["mailgun", "postmark", "sendgrid", "ses", "smtp"]


def test_unknown_adapter_type_is_a_configuration_error() -> None:
    with pytest.raises(UnknownProviderType):
        create_adapter(ProviderConfig(name="x", type="pigeon", endpoint="", credentials={}))


@pytest.mark.parametrize(
    ("type_name", "endpoint", "credentials", "options", "missing"),
    [
        ("mailgun", "https://api.mailgun.net", {}, {"domain": "d"}, "api_key"),
        ("mailgun", "https://api.mailgun.net", {"api_key": "k"}, {}, "domain"),
        ("sendgrid", "https://api.sendgrid.com", {}, {}, "api_key"),
        ("postmark", "https://api.postmarkapp.com", {}, {}, "server_token"),
        ("smtp", "no-port-here", {}, {}, "host:port"),
        ("ses", "", {"access_key_id": "a"}, {}, "secret_access_key"),
    ],
)
def test_incomplete_configuration_is_refused_naming_what_is_missing(
    type_name: str, endpoint: str, credentials: dict, options: dict, missing: str
) -> None:
    config = ProviderConfig(name="p", type=type_name, endpoint=endpoint, credentials=credentials, options=options,
                            region="us-east-1")

    with pytest.raises(AdapterConfigError, match=missing):
        create_adapter(config)


def test_option_can_lower_but_not_raise_an_api_providers_size_cap() -> None:
    def cap(value: str) -> int:
        config = ProviderConfig(name="p", type="postmark", endpoint="https://api.postmarkapp.com",
                                credentials={"server_token": "t"}, options={"max_message_bytes": value})
        return create_adapter(config).capabilities.max_message_bytes

    assert cap("1000") == 1000
    assert cap("999999999") == 10_000_000
