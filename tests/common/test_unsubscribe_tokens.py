"""One-click unsubscribe tokens and headers (libs.common.unsubscribe): opaque, tamper-proof, rotatable, RFC 8058."""

from __future__ import annotations

import base64
import re
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from libs.common.unsubscribe import (
    InvalidUnsubscribeToken,
    UnsubscribeTarget,
    UnsubscribeTokens,
    list_unsubscribe_headers,
    new_key_entry,
    unsubscribe_url,
)

OLD_KEY, NEW_KEY = new_key_entry(1), new_key_entry(2)
TARGET = UnsubscribeTarget("tenant-7f3a", "Jane.Doe@example.com", campaign_id="01J9ZQ4C8V5N6M7K8J9H0G1F2E",
                           topic="news")


def _flip(token: str, position: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[position] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_a_signed_token_verifies_to_what_it_was_signed_for():
    tokens = UnsubscribeTokens.from_entries([NEW_KEY])

    assert tokens.verify(tokens.sign(TARGET)) == TARGET


def test_a_token_without_campaign_or_topic_round_trips():
    tokens = UnsubscribeTokens.from_entries([NEW_KEY])
    target = UnsubscribeTarget("t", "a@b.example")

    assert tokens.verify(tokens.sign(target)) == target


def test_a_token_is_url_safe_base64_without_padding_and_short_enough_for_a_header():
    token = UnsubscribeTokens.from_entries([NEW_KEY]).sign(TARGET)

    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(token) < 200


def test_a_token_does_not_contain_the_address_or_tenant_in_clear():
    token = UnsubscribeTokens.from_entries([NEW_KEY]).sign(TARGET)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))

    for secret in (b"jane", b"Jane", b"example.com", b"tenant-7f3a", b"news"):
        assert secret not in raw
    for secret in ("jane", "Jane", "example", "tenant", "news"):
        assert secret not in token


@pytest.mark.parametrize("position", [0, 1, 2, 20, -1])
def test_a_token_with_any_byte_changed_is_refused(position: int):
    tokens = UnsubscribeTokens.from_entries([NEW_KEY, OLD_KEY])
    token = tokens.sign(TARGET)

    with pytest.raises(InvalidUnsubscribeToken):
        tokens.verify(_flip(token, position))


@pytest.mark.parametrize("token", ["", "not a token", "AQI", "A" * 2000, "AQI" + "=" * 2, "Zm9v/bar"])
def test_malformed_tokens_are_refused_with_one_uninformative_error(token: str):
    with pytest.raises(InvalidUnsubscribeToken) as refused:
        UnsubscribeTokens.from_entries([NEW_KEY]).verify(token)

    assert refused.value.reason == "UNSUBSCRIBE_TOKEN_INVALID"
    assert str(refused.value) == "invalid unsubscribe token"


def test_a_token_signed_with_the_previous_key_verifies_during_a_rotation():
    before = UnsubscribeTokens.from_entries([OLD_KEY]).sign(TARGET)
    during = UnsubscribeTokens.from_entries([NEW_KEY, OLD_KEY])

    assert during.signing_key_id == 2
    assert during.verify(before) == TARGET


def test_a_token_signed_with_a_key_no_longer_configured_is_refused():
    before = UnsubscribeTokens.from_entries([OLD_KEY]).sign(TARGET)

    with pytest.raises(InvalidUnsubscribeToken):
        UnsubscribeTokens.from_entries([NEW_KEY]).verify(before)


def test_a_different_key_under_the_same_id_refuses_the_token():
    token = UnsubscribeTokens.from_entries([NEW_KEY]).sign(TARGET)

    with pytest.raises(InvalidUnsubscribeToken):
        UnsubscribeTokens.from_entries([new_key_entry(2)]).verify(token)


def test_the_same_recipient_and_list_always_get_the_same_token():
    tokens = UnsubscribeTokens.from_entries([NEW_KEY])

    assert tokens.sign(TARGET) == tokens.sign(TARGET)
    assert tokens.sign(TARGET) != tokens.sign(UnsubscribeTarget(TARGET.tenant_id, TARGET.email, topic="other"))


def test_bad_key_entries_are_all_reported_without_quoting_the_keys():
    short_key = "3:" + base64.urlsafe_b64encode(b"k" * 16).decode()

    with pytest.raises(ValueError) as refused:
        UnsubscribeTokens.from_entries(["nokeyid", short_key, "300:abc", NEW_KEY, NEW_KEY])

    message = str(refused.value)
    for position in ("entry 1", "entry 2", "entry 3", "entry 5"):
        assert position in message
    assert NEW_KEY.partition(":")[2] not in message and short_key.partition(":")[2] not in message


def test_a_target_that_cannot_be_an_address_cannot_be_signed():
    with pytest.raises(ValueError):
        UnsubscribeTarget("t", "not an address")


def test_the_headers_parse_as_rfc_8058_expects():
    url = unsubscribe_url("https://unsub.example.com/", UnsubscribeTokens.from_entries([NEW_KEY]).sign(TARGET))
    message = EmailMessage()
    message["From"] = "news@shop.example"
    message["To"] = TARGET.email
    message["Subject"] = "Our news"
    for name, value in list_unsubscribe_headers(url, mailto="unsubscribe@shop.example").items():
        message[name] = value
    message.set_content("hello")

    wire = message.as_bytes(policy=policy.SMTP)
    parsed = message_from_bytes(wire, policy=policy.default)

    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    uris = re.findall(r"<([^>]*)>", " ".join(str(parsed["List-Unsubscribe"]).split()))
    assert uris == [url, "mailto:unsubscribe@shop.example"]
    assert url.startswith("https://unsub.example.com/u/")
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"


def test_the_headers_without_mailto_carry_only_the_url():
    headers = list_unsubscribe_headers("https://unsub.example.com/u/abc")

    assert headers == {"List-Unsubscribe": "<https://unsub.example.com/u/abc>",
                       "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


@pytest.mark.parametrize("url", ["http://unsub.example.com/u/abc", "ftp://x/u/abc", "https://x/u/a,b",
                                 "https://x/u/a b", "https://x/u/a>b"])
def test_a_url_that_is_not_https_or_would_break_the_header_is_refused(url: str):
    with pytest.raises(ValueError):
        list_unsubscribe_headers(url)


def test_plain_http_is_allowed_on_loopback_for_development():
    assert list_unsubscribe_headers("http://127.0.0.1:8081/u/abc")["List-Unsubscribe"] == \
        "<http://127.0.0.1:8081/u/abc>"
