"""SendGrid Signed Event Webhook: ECDSA P-256/SHA-256 over the timestamp header + the raw body."""

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from dev.simulator.signing import generate_sendgrid_key_pair, sendgrid_callback, sign_sendgrid_body
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.providers.sendgrid.webhook import send_message_id
from libs.providers.webhook_model import (
    MalformedWebhook,
    ReplayedWebhook,
    SignatureInvalid,
    SignatureMissing,
    StaleWebhook,
    WebhookConfigurationError,
)
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
KEYS = generate_sendgrid_key_pair()
SECRETS = {"verification_key": KEYS.verification_key}
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"

# Shaped like the examples in SendGrid's Event Webhook reference: a batch with custom args at top level.
BATCH = [
    {
        "email": "alice@example.com",
        "timestamp": 1772443790,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": "processed",
        "category": "cat facts",
        "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000",
        "esp_message_id": "msg_1",
    },
    {
        "email": "alice@example.com",
        "timestamp": 1772443791,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": "delivered",
        "category": "cat facts",
        "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000",
        "response": "250 OK",
        "esp_message_id": "msg_1",
        "esp_tenant_id": "tenant_acme",
    },
    {
        "email": "bob@example.com",
        "timestamp": 1772443792,
        "event": "bounce",
        "type": "bounce",
        "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw",
        "sg_message_id": "W86EgYT6SQKk0lRflfLRsA.filterdrecv-5645d9c87f-6r2ch-1",
        "reason": "500 unknown recipient",
        "status": "5.0.0",
        "esp_message_id": "msg_2",
    },
    {
        "email": "carol@example.com",
        "timestamp": 1772443793,
        "event": "click",
        "sg_event_id": "kCAi1KttyQdEKHhdC-nuEA",
        "sg_message_id": "X7yUp0e4Rb2fSKnEEWzBkQ.filterdrecv-1",
        "url": "https://www.sendgrid.com/",
        "useragent": "Mozilla/4.0",
        "ip": "255.255.255.255",
        "url_offset": {},
    },
]


def verifier() -> WebhookVerifier:
    return WebhookVerifier(InMemoryReplayGuard())


def signed_batch(batch=BATCH, *, at=NOW, private_key_pem=KEYS.private_key_pem):
    return sign_sendgrid_body(json.dumps(batch).encode(), private_key_pem, timestamp=int(at.timestamp()))


def sample_event(kind: EventKind, **changes) -> DeliveryEvent:
    fields = {
        "kind": kind,
        "provider_type": "sendgrid",
        "provider_name": "sendgrid",
        "recipient": "alice@example.com",
        "occurred_at": NOW - timedelta(seconds=7),
        "event_id": f"sg-{kind}-{changes.get('bounce_type')}",
        "provider_message_id": "W86EgYT6SQKk0lRflfLRsA",
        "message_id": "msg_7",
        "tenant_id": "tenant_acme",
    }
    return DeliveryEvent(**(fields | changes))


async def test_genuine_batch_is_normalised_and_untracked_events_skipped():
    callback = signed_batch()

    events = await verifier().verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)

    assert [(event.kind, event.recipient) for event in events] == [
        (EventKind.DELIVERED, "alice@example.com"),
        (EventKind.BOUNCED, "bob@example.com"),
        (EventKind.CLICKED, "carol@example.com"),
    ]
    delivered, bounced, clicked = events
    assert delivered.provider_message_id == "14c5d75ce93.dfd.64b469"
    assert (delivered.message_id, delivered.tenant_id) == ("msg_1", "tenant_acme")
    assert delivered.occurred_at == datetime.fromtimestamp(1772443791, UTC)
    assert delivered.event_id == "rWVYmVk90MjZJ9iohOBa3w"
    assert delivered.raw == BATCH[1]
    assert (bounced.bounce_type, bounced.reason, bounced.diagnostic) == (
        BounceType.HARD,
        "500 unknown recipient",
        "5.0.0",
    )
    assert bounced.provider_message_id == "W86EgYT6SQKk0lRflfLRsA"
    assert clicked.url == "https://www.sendgrid.com/"


@pytest.mark.parametrize(
    ("sg_message_id", "x_message_id"),
    [
        ("W86EgYT6SQKk0lRflfLRsA.filterdrecv-5645d9c87f-6r2ch-1-5F5FC1BC-3.0", "W86EgYT6SQKk0lRflfLRsA"),
        ("14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0", "14c5d75ce93.dfd.64b469"),
        ("W86EgYT6SQKk0lRflfLRsA.recvd-5f54b5d587-pdwph-1-5F5FC1BC-5.0", "W86EgYT6SQKk0lRflfLRsA"),
    ],
)
def test_sg_message_id_is_reduced_to_the_id_the_send_call_returned(sg_message_id, x_message_id):
    assert send_message_id(sg_message_id) == x_message_id


async def test_every_event_kind_survives_a_signed_round_trip():
    expected = [
        sample_event(EventKind.DELIVERED, diagnostic="250 2.0.0 OK"),
        sample_event(EventKind.DEFERRED, diagnostic="421 try again later"),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.HARD,
            reason="550 5.1.1 unknown user",
            diagnostic="5.1.1",
        ),
        sample_event(
            EventKind.BOUNCED, bounce_type=BounceType.SOFT, reason="550 blocked by policy", diagnostic="5.7.1"
        ),
        sample_event(EventKind.REJECTED, reason="Bounced Address"),
        sample_event(EventKind.OPENED),
        sample_event(EventKind.CLICKED, url="https://example.com/a?b=c"),
        sample_event(EventKind.COMPLAINED),
        sample_event(EventKind.UNSUBSCRIBED),
    ]
    callback = sendgrid_callback(expected, KEYS.private_key_pem, timestamp=int(NOW.timestamp()))

    events = await verifier().verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)

    assert events == expected
    assert [event.raw for event in events] == json.loads(callback.body)


async def test_forged_batch_signed_with_another_key_is_rejected():
    other = generate_sendgrid_key_pair()
    callback = signed_batch(private_key_pem=other.private_key_pem)

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)


async def test_batch_with_one_body_byte_changed_is_rejected():
    callback = signed_batch()
    tampered = callback.body.replace(b"500 unknown recipient", b"500 unknown recipienT")
    assert tampered != callback.body

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("sendgrid", SECRETS, callback.headers, tampered, NOW)


async def test_batch_with_a_changed_timestamp_header_is_rejected():
    callback = signed_batch()
    headers = callback.headers | {"X-Twilio-Email-Event-Webhook-Timestamp": str(int(NOW.timestamp()) + 1)}

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("sendgrid", SECRETS, headers, callback.body, NOW)


async def test_unsigned_batch_is_rejected():
    with pytest.raises(SignatureMissing):
        await verifier().verify_and_parse(
            "sendgrid", SECRETS, {"Content-Type": "application/json"}, json.dumps(BATCH).encode(), NOW
        )


async def test_signature_is_checked_before_the_body_is_parsed():
    not_json = b"\xff not json"
    unsigned = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: base64.b64encode(b"x" * 70).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": str(int(NOW.timestamp())),
    }
    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("sendgrid", SECRETS, unsigned, not_json, NOW)

    signed = sign_sendgrid_body(not_json, KEYS.private_key_pem, timestamp=int(NOW.timestamp()))
    with pytest.raises(MalformedWebhook):
        await verifier().verify_and_parse("sendgrid", SECRETS, signed.headers, signed.body, NOW)


async def test_timestamp_outside_the_window_is_stale():
    callback = signed_batch(at=NOW - timedelta(minutes=6))

    with pytest.raises(StaleWebhook):
        await verifier().verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)


async def test_replayed_batch_is_rejected():
    shared = verifier()
    callback = signed_batch()
    await shared.verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)


async def test_replay_with_a_re_encoded_signature_is_still_rejected():
    # ECDSA signatures are malleable: (r, n - s) verifies too, so the replay key must not be the signature.
    shared = verifier()
    callback = signed_batch()
    await shared.verify_and_parse("sendgrid", SECRETS, callback.headers, callback.body, NOW)
    r, s = decode_dss_signature(base64.b64decode(callback.headers[SIGNATURE_HEADER]))
    curve_order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    twin = base64.b64encode(encode_dss_signature(r, curve_order - s)).decode()
    assert twin != callback.headers[SIGNATURE_HEADER]

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse(
            "sendgrid", SECRETS, callback.headers | {SIGNATURE_HEADER: twin}, callback.body, NOW
        )


async def test_verification_key_in_pem_armour_is_accepted_too():
    pem = "-----BEGIN PUBLIC KEY-----\n" + KEYS.verification_key + "\n-----END PUBLIC KEY-----\n"
    callback = signed_batch()

    events = await verifier().verify_and_parse(
        "sendgrid", {"verification_key": pem}, callback.headers, callback.body, NOW
    )

    assert len(events) == 3


async def test_verification_key_that_is_not_p256_is_a_configuration_error():
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = p384.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    callback = signed_batch()

    with pytest.raises(WebhookConfigurationError):
        await verifier().verify_and_parse(
            "sendgrid",
            {"verification_key": base64.b64encode(der).decode()},
            callback.headers,
            callback.body,
            NOW,
        )
