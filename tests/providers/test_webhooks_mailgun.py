"""Mailgun webhooks: HMAC-SHA256 over timestamp + token with the webhook signing key."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from dev.simulator.signing import mailgun_callback, mailgun_event_data, sign_mailgun_payload
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.providers.webhook_model import (
    MalformedWebhook,
    ReplayedWebhook,
    SignatureInvalid,
    SignatureMissing,
    StaleWebhook,
)
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
SIGNING_KEY = "key-7f3c2a1b9d8e4f60a5b4c3d2e1f00918"
SECRETS = {"webhook_signing_key": SIGNING_KEY}

# Shaped like the "delivered" example in Mailgun's webhook documentation.
DELIVERED_EVENT_DATA = {
    "id": "CPgfbmQMTCKtHW6uIWtuVe",
    "timestamp": 1772443795.123456,
    "log-level": "info",
    "event": "delivered",
    "delivery-status": {
        "tls": True,
        "mx-host": "smtp-in.example.com",
        "code": 250,
        "description": "",
        "session-seconds": 0.43,
        "utf8": True,
        "attempt-no": 1,
        "message": "OK",
        "certificate-verified": True,
    },
    "flags": {"is-routed": False, "is-authenticated": True, "is-system-test": False, "is-test-mode": False},
    "envelope": {
        "transport": "smtp",
        "sender": "bob@sandbox.mailgun.org",
        "sending-ip": "209.61.154.250",
        "targets": "alice@example.com",
    },
    "message": {
        "headers": {
            "to": "Alice <alice@example.com>",
            "message-id": "20130503182626.18666.16540@sandbox.mailgun.org",
            "from": "Bob <bob@sandbox.mailgun.org>",
            "subject": "Test delivered webhook",
        },
        "attachments": [],
        "size": 111,
    },
    "recipient": "alice@example.com",
    "recipient-domain": "example.com",
    "storage": {
        "url": "https://se.api.mailgun.net/v3/domains/sandbox.mailgun.org/messages/message_key",
        "key": "message_key",
    },
    "campaigns": [],
    "tags": ["my_tag_1"],
    "user-variables": {"esp_message_id": "msg_01HZX3", "esp_tenant_id": "tenant_acme"},
}


def verifier(**options) -> WebhookVerifier:
    return WebhookVerifier(InMemoryReplayGuard(), **options)


def signed(event_data=DELIVERED_EVENT_DATA, *, key=SIGNING_KEY, at=NOW, token=None):
    return sign_mailgun_payload(event_data, key, timestamp=int(at.timestamp()), token=token)


def sample_event(kind: EventKind, **changes) -> DeliveryEvent:
    fields = {
        "kind": kind,
        "provider_type": "mailgun",
        "provider_name": "mailgun-eu",
        "recipient": "alice@example.com",
        "occurred_at": NOW - timedelta(seconds=3),
        "event_id": f"evt-{kind}",
        "provider_message_id": "<20260302093000.1.2@mg.example.com>",
        "message_id": "msg_01HZX3",
        "tenant_id": "tenant_acme",
    }
    return DeliveryEvent(**(fields | changes))


async def test_genuine_delivered_webhook_is_normalised():
    callback = signed()

    events = await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    [event] = events
    assert event.kind is EventKind.DELIVERED
    assert event.provider_message_id == "<20130503182626.18666.16540@sandbox.mailgun.org>"
    assert (event.message_id, event.tenant_id) == ("msg_01HZX3", "tenant_acme")
    assert event.recipient == "alice@example.com"
    assert event.occurred_at == datetime.fromtimestamp(1772443795.123456, UTC)
    assert event.event_id == "CPgfbmQMTCKtHW6uIWtuVe"
    assert event.diagnostic == "OK"
    assert event.raw == DELIVERED_EVENT_DATA


@pytest.mark.parametrize(
    "expected",
    [
        sample_event(EventKind.DELIVERED, diagnostic="250 2.0.0 OK"),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.HARD,
            reason="bounce",
            diagnostic="550 5.1.1 The email account does not exist",
        ),
        sample_event(EventKind.BOUNCED, bounce_type=BounceType.SOFT, reason="old", diagnostic="Too old"),
        sample_event(EventKind.DEFERRED, reason="generic", diagnostic="452 mailbox full"),
        sample_event(
            EventKind.REJECTED,
            reason="suppress-bounce",
            diagnostic="Not delivering to previously bounced address",
        ),
        sample_event(EventKind.COMPLAINED),
        sample_event(EventKind.OPENED),
        sample_event(EventKind.CLICKED, url="https://example.com/offer?id=1"),
        sample_event(EventKind.UNSUBSCRIBED),
    ],
    ids=lambda event: f"{event.kind}-{event.bounce_type}",
)
async def test_every_event_kind_survives_a_signed_round_trip(expected):
    callback = mailgun_callback(expected, SIGNING_KEY, timestamp=int(NOW.timestamp()))

    events = await verifier().verify_and_parse(
        "mailgun", SECRETS, callback.headers, callback.body, NOW, provider_name="mailgun-eu"
    )

    assert events == [expected]
    assert events[0].raw == json.loads(callback.body)["event-data"]


async def test_temporary_failure_is_a_deferral_not_a_bounce():
    data = mailgun_event_data(sample_event(EventKind.DELIVERED)) | {
        "event": "failed",
        "severity": "temporary",
        "reason": "generic",
        "delivery-status": {"code": 421, "message": "4.7.0 Try again later", "attempt-no": 2},
    }
    callback = signed(data)

    [event] = await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    assert (event.kind, event.bounce_type, event.diagnostic) == (
        EventKind.DEFERRED,
        None,
        "4.7.0 Try again later",
    )


async def test_accepted_event_yields_no_delivery_event():
    callback = signed(DELIVERED_EVENT_DATA | {"event": "accepted"})

    events = await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    assert events == []


async def test_parent_signature_from_the_primary_account_key_is_accepted():
    callback = signed(key="key-of-the-primary-account")
    body = json.loads(callback.body)
    signature = body["signature"]
    signature["parent-signature"] = signature["signature"]
    signature["signature"] = "0" * 64  # the subaccount's signature, made with a key we do not hold
    secrets = {"webhook_signing_key": "key-of-the-primary-account"}

    events = await verifier().verify_and_parse(
        "mailgun", secrets, callback.headers, json.dumps(body).encode(), NOW
    )

    assert [event.kind for event in events] == [EventKind.DELIVERED]


async def test_forged_webhook_signed_with_another_key_is_rejected():
    callback = signed(key="key-an-attacker-made-up")

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)


async def test_tampered_signed_timestamp_is_rejected():
    callback = signed()
    body = json.loads(callback.body)
    body["signature"]["timestamp"] = str(int(body["signature"]["timestamp"]) + 1)

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse(
            "mailgun", SECRETS, callback.headers, json.dumps(body).encode(), NOW
        )


async def test_tampered_token_is_rejected():
    callback = signed(token="a" * 50)
    tampered = callback.body.replace(b'"' + b"a" * 50 + b'"', b'"' + b"a" * 49 + b'b"')
    assert tampered != callback.body

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, tampered, NOW)


async def test_unsigned_webhook_is_rejected():
    body = json.dumps({"event-data": DELIVERED_EVENT_DATA}).encode()

    with pytest.raises(SignatureMissing):
        await verifier().verify_and_parse("mailgun", SECRETS, {"Content-Type": "application/json"}, body, NOW)


async def test_signature_older_than_the_window_is_stale():
    callback = signed(at=NOW - timedelta(minutes=16))

    with pytest.raises(StaleWebhook):
        await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)


async def test_signature_posted_late_within_the_window_is_accepted():
    callback = signed(at=NOW - timedelta(minutes=14))

    events = await verifier().verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    assert len(events) == 1


async def test_replayed_token_is_rejected():
    shared = verifier()
    callback = signed()
    await shared.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse(
            "mailgun", SECRETS, callback.headers, callback.body, NOW + timedelta(seconds=5)
        )


async def test_same_token_with_different_event_data_is_still_a_replay():
    shared = verifier()
    first = signed(token="t" * 50)
    await shared.verify_and_parse("mailgun", SECRETS, first.headers, first.body, NOW)
    body = json.loads(first.body)
    body["event-data"]["recipient"] = "mallory@example.com"

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse("mailgun", SECRETS, first.headers, json.dumps(body).encode(), NOW)


async def test_rejected_request_leaves_no_replay_record():
    shared = verifier()
    genuine = signed(token="k" * 50)
    forged = signed(key="key-an-attacker-made-up", token="k" * 50)
    with pytest.raises(SignatureInvalid):
        await shared.verify_and_parse("mailgun", SECRETS, forged.headers, forged.body, NOW)

    events = await shared.verify_and_parse("mailgun", SECRETS, genuine.headers, genuine.body, NOW)

    assert len(events) == 1


async def test_legacy_form_encoded_webhook_is_malformed():
    body = b"timestamp=1&token=abc&signature=def&event=delivered"

    with pytest.raises(MalformedWebhook):
        await verifier().verify_and_parse(
            "mailgun", SECRETS, {"Content-Type": "application/x-www-form-urlencoded"}, body, NOW
        )
