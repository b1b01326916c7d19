"""Postmark webhooks: HTTP basic auth from the webhook URL; records matched on RecordType / Type names."""

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from dev.simulator.signing import postmark_callback, sign_postmark_payload
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.providers.webhook_model import ReplayedWebhook, SignatureInvalid, SignatureMissing, StaleWebhook
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
USER, PASSWORD = "postmark-hook", "s3cr3t-Pa55"
SECRETS = {"webhook_user": USER, "webhook_password": PASSWORD}

# Postmark's bounce webhook example (dates moved to "now").
BOUNCE = {
    "RecordType": "Bounce",
    "MessageStream": "outbound",
    "ID": 4323372036854775807,
    "Type": "HardBounce",
    "TypeCode": 1,
    "Name": "Hard bounce",
    "Tag": "Test",
    "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
    "Metadata": {"a_key": "a_value", "esp_message_id": "msg_pm_1", "esp_tenant_id": "tenant_acme"},
    "ServerID": 23,
    "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
    "Details": "Test bounce details",
    "Email": "john@example.com",
    "From": "sender@example.com",
    "BouncedAt": "2026-03-02T09:29:10.2735393Z",
    "DumpAvailable": True,
    "Inactive": True,
    "CanActivate": True,
    "Subject": "Test subject",
    "Content": "<Full dump of bounce>",
}
# Postmark's spam complaint webhook example: note TypeCode 512, which is "SpamNotification" in the code table.
SPAM_COMPLAINT = {
    "RecordType": "SpamComplaint",
    "MessageStream": "outbound",
    "ID": 42,
    "Type": "SpamComplaint",
    "TypeCode": 512,
    "Name": "Spam complaint",
    "Tag": "Test",
    "MessageID": "00000000-0000-0000-0000-000000000000",
    "Metadata": {"esp_message_id": "msg_pm_2"},
    "ServerID": 1234,
    "Description": "",
    "Details": "Test spam complaint details",
    "Email": "john@example.com",
    "From": "sender@example.com",
    "BouncedAt": "2026-03-02T09:29:00Z",
    "DumpAvailable": True,
    "Inactive": True,
    "CanActivate": False,
    "Subject": "Test subject",
    "Content": "<Abuse report dump>",
}


def verifier() -> WebhookVerifier:
    return WebhookVerifier(InMemoryReplayGuard())


def post(record, user=USER, password=PASSWORD):
    return sign_postmark_payload(record, user, password)


def sample_event(kind: EventKind, **changes) -> DeliveryEvent:
    fields = {
        "kind": kind,
        "provider_type": "postmark",
        "provider_name": "postmark",
        "recipient": "erin@example.com",
        "occurred_at": NOW - timedelta(seconds=30),
        "event_id": "ignored",
        "provider_message_id": "0a129aee-e1cd-480d-b08d-4f48548ff48d",
        "message_id": "msg_pm_9",
        "tenant_id": "tenant_acme",
    }
    return DeliveryEvent(**(fields | changes))


async def test_genuine_hard_bounce_is_normalised():
    callback = post(BOUNCE)

    [event] = await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    assert (event.kind, event.bounce_type) == (EventKind.BOUNCED, BounceType.HARD)
    assert event.recipient == "john@example.com"
    assert event.provider_message_id == "883953f4-6105-42a2-a16a-77a8eac79483"
    assert (event.message_id, event.tenant_id) == ("msg_pm_1", "tenant_acme")
    assert event.occurred_at == datetime(2026, 3, 2, 9, 29, 10, 273539, tzinfo=UTC)
    assert event.event_id == "postmark:bounce:4323372036854775807"
    assert (event.reason, event.diagnostic) == ("HardBounce", "Test bounce details")
    assert event.raw == BOUNCE


async def test_spam_complaint_is_matched_on_record_type_not_type_code():
    callback = post(SPAM_COMPLAINT)

    [event] = await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    assert (event.kind, event.bounce_type, event.message_id) == (EventKind.COMPLAINED, None, "msg_pm_2")


@pytest.mark.parametrize(
    ("bounce_type", "expected"),
    [
        ("HardBounce", BounceType.HARD),
        ("BadEmailAddress", BounceType.HARD),
        ("ManuallyDeactivated", BounceType.HARD),
        ("SoftBounce", BounceType.SOFT),
        ("Transient", BounceType.SOFT),
        ("DnsError", BounceType.SOFT),
        ("Blocked", BounceType.SOFT),
        ("SomethingPostmarkAddsLater", BounceType.SOFT),
    ],
)
async def test_bounce_type_name_decides_hard_or_soft(bounce_type, expected):
    # TypeCode deliberately contradicts the name: only the name may count.
    callback = post(BOUNCE | {"Type": bounce_type, "TypeCode": 4096 if expected is BounceType.HARD else 1})

    [event] = await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    assert (event.kind, event.bounce_type) == (EventKind.BOUNCED, expected)


async def test_auto_responder_bounce_record_is_not_a_delivery_outcome():
    callback = post(BOUNCE | {"Type": "AutoResponder", "TypeCode": 64})

    assert await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW) == []


@pytest.mark.parametrize(
    "expected",
    [
        sample_event(EventKind.DELIVERED, diagnostic="smtp;250 2.0.0 OK"),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.HARD,
            reason="BadEmailAddress",
            diagnostic="550 no such user",
        ),
        sample_event(
            EventKind.BOUNCED, bounce_type=BounceType.SOFT, reason="SoftBounce", diagnostic="452 full"
        ),
        sample_event(EventKind.REJECTED, reason="DMARCPolicy", diagnostic="rejected by DMARC"),
        sample_event(EventKind.COMPLAINED, reason="SpamComplaint", diagnostic="feedback loop"),
        sample_event(EventKind.OPENED),
        sample_event(EventKind.CLICKED, url="https://example.com/landing"),
        sample_event(EventKind.UNSUBSCRIBED, reason="ManualSuppression"),
    ],
    ids=lambda event: f"{event.kind}-{event.bounce_type}",
)
async def test_every_record_type_survives_an_authenticated_round_trip(expected):
    callback = postmark_callback(expected, USER, PASSWORD)

    [event] = await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    assert event == dataclasses.replace(expected, event_id=event.event_id)
    assert event.raw == json.loads(callback.body)


async def test_suppression_lifted_by_subscription_change_yields_nothing():
    record = {
        "RecordType": "SubscriptionChange",
        "MessageID": "m",
        "ServerID": 1,
        "MessageStream": "broadcast",
        "ChangedAt": "2026-03-02T09:29:00Z",
        "Recipient": "erin@example.com",
        "Origin": "Customer",
        "SuppressSending": False,
        "SuppressionReason": None,
        "Tag": "",
        "Metadata": {},
    }
    callback = post(record)

    assert await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW) == []


async def test_broadcast_complaint_reported_as_suppression_is_a_complaint():
    record = {
        "RecordType": "SubscriptionChange",
        "MessageID": "m",
        "ServerID": 1,
        "MessageStream": "broadcast",
        "ChangedAt": "2026-03-02T09:29:00Z",
        "Recipient": "erin@example.com",
        "Origin": "Recipient",
        "SuppressSending": True,
        "SuppressionReason": "SpamComplaint",
        "Tag": "",
        "Metadata": {},
    }
    callback = post(record)

    [event] = await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    assert event.kind is EventKind.COMPLAINED


async def test_wrong_password_is_rejected():
    callback = post(BOUNCE, password="guess")

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)


async def test_wrong_user_is_rejected():
    callback = post(BOUNCE, user="someone")

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)


async def test_credentials_without_a_separator_are_rejected():
    token = base64.b64encode(f"{USER}{PASSWORD}".encode()).decode()

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse(
            "postmark", SECRETS, {"Authorization": f"Basic {token}"}, json.dumps(BOUNCE).encode(), NOW
        )


async def test_request_without_credentials_is_rejected():
    with pytest.raises(SignatureMissing):
        await verifier().verify_and_parse(
            "postmark", SECRETS, {"Content-Type": "application/json"}, json.dumps(BOUNCE).encode(), NOW
        )


async def test_record_older_than_postmarks_retry_window_is_stale():
    callback = post(BOUNCE | {"BouncedAt": "2026-03-01T22:00:00Z"})

    with pytest.raises(StaleWebhook):
        await verifier().verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)


async def test_replayed_record_is_rejected():
    shared = verifier()
    callback = post(BOUNCE)
    await shared.verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse("postmark", SECRETS, callback.headers, callback.body, NOW)
