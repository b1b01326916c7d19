"""Amazon SES events through SNS: RSA signatures (v1 SHA1, v2 SHA256), certificate URL, topic allow-list."""

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from dev.simulator.signing import (
    generate_sns_certificate,
    ses_callback,
    sign_sns_document,
    sns_request,
    sns_subscription_confirmation,
)
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.providers.ses.webhook import (
    HttpxCertificateFetcher,
    StaticCertificateFetcher,
    string_to_sign,
    validate_signing_cert_url,
)
from libs.providers.webhook_model import (
    CertificateUnavailable,
    ReplayedWebhook,
    SignatureInvalid,
    SignatureMissing,
    StaleWebhook,
    SubscriptionConfirmation,
)
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem"
)
CERT = generate_sns_certificate(not_before=NOW - timedelta(days=1))
SECRETS = {"topic_arns": f"arn:aws:sns:eu-west-1:123456789012:other, {TOPIC}"}

# The bounce record from AWS's "Examples of event data that Amazon SES publishes to Amazon SNS".
BOUNCE_RECORD = {
    "eventType": "Bounce",
    "bounce": {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "bouncedRecipients": [
            {
                "emailAddress": "recipient@example.com",
                "action": "failed",
                "status": "5.1.1",
                "diagnosticCode": "smtp; 550 5.1.1 user unknown",
            }
        ],
        "timestamp": "2017-08-05T00:41:02.669Z",
        "feedbackId": "01000157c44f053b-61b59c11-9236-11e6-8f96-7be8aexample-000000",
        "reportingMTA": "dsn; mta.example.com",
    },
    "mail": {
        "timestamp": "2017-08-05T00:40:02.012Z",
        "source": "Sender Name <sender@example.com>",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/sender@example.com",
        "sendingAccountId": "123456789012",
        "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
        "destination": ["recipient@example.com"],
        "headersTruncated": False,
        "headers": [
            {"name": "From", "value": "Sender Name <sender@example.com>"},
            {"name": "To", "value": "recipient@example.com"},
            {"name": "X-ESP-Message-Id", "value": "msg_from_header"},
        ],
        "commonHeaders": {
            "from": ["Sender Name <sender@example.com>"],
            "to": ["recipient@example.com"],
            "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
            "subject": "Message sent from Amazon SES",
        },
        "tags": {
            "ses:configuration-set": ["ConfigSet"],
            "ses:source-ip": ["192.0.2.0"],
            "esp_message_id": ["msg_from_tag"],
            "esp_tenant_id": ["tenant_acme"],
        },
    },
}


def verifier(fetcher=None) -> WebhookVerifier:
    fetcher = fetcher or StaticCertificateFetcher({CERT_URL: CERT.certificate_pem})
    return WebhookVerifier(InMemoryReplayGuard(), certificate_fetcher=fetcher)


def notification(record, *, at=NOW, version=2, topic=TOPIC, key_pem=CERT.private_key_pem, cert_url=CERT_URL):
    document = {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": json.dumps(record),
        "Timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    return sns_request(sign_sns_document(document, key_pem, cert_url, signature_version=version))


def sample_event(kind: EventKind, **changes) -> DeliveryEvent:
    fields = {
        "kind": kind,
        "provider_type": "ses",
        "provider_name": "ses-us",
        "recipient": "dana@example.com",
        "occurred_at": datetime(2026, 3, 2, 9, 29, 58, 125000, tzinfo=UTC),
        "event_id": "ignored",
        "provider_message_id": "010001812345abcd-11111111-2222-3333-4444-555555555555-000000",
        "message_id": "msg_42",
        "tenant_id": "tenant_acme",
    }
    return DeliveryEvent(**(fields | changes))


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
    ],
)
def test_signing_cert_url_on_an_sns_host_is_allowed(url):
    validate_signing_cert_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/x.pem",
        "http://sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com/x.txt",
        "https://sns.us-east-1.amazonaws.com/x.pem?.txt",
        "https://sns.us-east-1.amazonaws.com.evil.example.com/x.pem",
        "https://sns.us-east-1.amazonaws.com@evil.example.com/x.pem",
        "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        "https://sns.a.amazonaws.com/x.pem",
    ],
)
def test_signing_cert_url_elsewhere_is_rejected(url):
    with pytest.raises(SignatureInvalid):
        validate_signing_cert_url(url)


def test_string_to_sign_follows_the_documented_key_order():
    document = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": TOPIC,
        "Subject": "Hi",
        "Message": "line one\nline two",
        "Timestamp": "2026-03-02T09:30:00.000Z",
        "SignatureVersion": "2",
        "Signature": "ignored",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://example",
    }

    assert (
        string_to_sign(document)
        == (
            f"Message\nline one\nline two\nMessageId\nm-1\nSubject\nHi\nTimestamp\n2026-03-02T09:30:00.000Z\n"
            f"TopicArn\n{TOPIC}\nType\nNotification\n"
        ).encode()
    )


def test_string_to_sign_for_a_confirmation_includes_token_and_subscribe_url():
    document = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "m-2",
        "Token": "tok",
        "TopicArn": TOPIC,
        "Message": "confirm",
        "SubscribeURL": "https://sns/confirm",
        "Timestamp": "t",
    }

    assert (
        string_to_sign(document)
        == (
            f"Message\nconfirm\nMessageId\nm-2\nSubscribeURL\nhttps://sns/confirm\nTimestamp\nt\nToken\ntok\n"
            f"TopicArn\n{TOPIC}\nType\nSubscriptionConfirmation\n"
        ).encode()
    )


@pytest.mark.parametrize("version", [1, 2])
async def test_genuine_bounce_notification_is_normalised(version):
    callback = notification(BOUNCE_RECORD, version=version)

    [event] = await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert event.kind is EventKind.BOUNCED
    assert event.bounce_type is BounceType.HARD
    assert event.recipient == "recipient@example.com"
    # mail.messageId is what SendEmail returned; the SNS MessageId is a per-notification id.
    assert event.provider_message_id == "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
    assert (event.message_id, event.tenant_id) == ("msg_from_tag", "tenant_acme")
    assert event.reason == "Permanent/General"
    assert event.diagnostic == "smtp; 550 5.1.1 user unknown"
    assert event.occurred_at == datetime(2017, 8, 5, 0, 41, 2, 669000, tzinfo=UTC)
    assert event.raw == BOUNCE_RECORD


async def test_our_message_id_falls_back_to_the_header_without_tags():
    record = json.loads(json.dumps(BOUNCE_RECORD))
    del record["mail"]["tags"]
    callback = notification(record)

    [event] = await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert event.message_id == "msg_from_header"


async def test_transient_bounce_is_soft():
    record = json.loads(json.dumps(BOUNCE_RECORD))
    record["bounce"]["bounceType"] = "Transient"
    callback = notification(record)

    [event] = await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert event.bounce_type is BounceType.SOFT


async def test_one_event_per_bounced_recipient():
    record = json.loads(json.dumps(BOUNCE_RECORD))
    record["bounce"]["bouncedRecipients"].append({"emailAddress": "second@example.com", "status": "5.1.1"})
    callback = notification(record)

    events = await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert [event.recipient for event in events] == ["recipient@example.com", "second@example.com"]
    assert len({event.event_id for event in events}) == 2


@pytest.mark.parametrize(
    "expected",
    [
        sample_event(EventKind.DELIVERED, diagnostic="250 2.6.0 Message received"),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.HARD,
            reason="Permanent/NoEmail",
            diagnostic="smtp; 550 5.1.1 no such user",
        ),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.SOFT,
            reason="Transient/MailboxFull",
            diagnostic="smtp; 452 4.2.2 mailbox full",
        ),
        sample_event(EventKind.COMPLAINED, reason="abuse"),
        sample_event(EventKind.DEFERRED, reason="MailboxFull", diagnostic="smtp; 452 4.2.2 over quota"),
        sample_event(EventKind.REJECTED, reason="Bad content"),
        sample_event(EventKind.OPENED),
        sample_event(EventKind.CLICKED, url="https://example.com/pricing"),
        sample_event(EventKind.UNSUBSCRIBED, reason="newsletter"),
    ],
    ids=lambda event: f"{event.kind}-{event.bounce_type}",
)
async def test_every_event_type_survives_a_signed_round_trip(expected):
    callback = ses_callback(expected, CERT.private_key_pem, CERT_URL, TOPIC, published_at=NOW)

    [event] = await verifier().verify_and_parse(
        "ses", SECRETS, callback.headers, callback.body, NOW, provider_name="ses-us"
    )

    assert event == dataclasses.replace(expected, event_id=event.event_id)
    assert event.event_id.startswith("ses:")
    assert event.raw == json.loads(json.loads(callback.body)["Message"])


@pytest.mark.parametrize(
    "expected",
    [
        sample_event(EventKind.DELIVERED, diagnostic="250 ok"),
        sample_event(
            EventKind.BOUNCED,
            bounce_type=BounceType.HARD,
            reason="Permanent/General",
            diagnostic="smtp; 550 user unknown",
        ),
        sample_event(EventKind.COMPLAINED, reason="abuse"),
    ],
    ids=lambda event: str(event.kind),
)
async def test_identity_notifications_use_notification_type(expected):
    callback = ses_callback(
        expected,
        CERT.private_key_pem,
        CERT_URL,
        TOPIC,
        published_at=NOW,
        form="notificationType",
        subject="Amazon SES Email Notification",
    )
    assert "notificationType" in json.loads(json.loads(callback.body)["Message"])

    [event] = await verifier().verify_and_parse(
        "ses", SECRETS, callback.headers, callback.body, NOW, provider_name="ses-us"
    )

    assert (event.kind, event.bounce_type, event.recipient) == (
        expected.kind,
        expected.bounce_type,
        expected.recipient,
    )


async def test_send_event_yields_nothing():
    record = {"eventType": "Send", "mail": BOUNCE_RECORD["mail"], "send": {}}
    callback = notification(record)

    assert await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW) == []


async def test_subscription_confirmation_is_surfaced_for_the_receiver_to_confirm():
    callback = sns_subscription_confirmation(
        CERT.private_key_pem,
        CERT_URL,
        TOPIC,
        token="tok-123",
        published_at=NOW,
        subscribe_url="https://sns.us-east-1.amazonaws.com/?c",
    )

    result = await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert isinstance(result, SubscriptionConfirmation)
    assert (result.topic_arn, result.token, result.subscribe_url) == (
        TOPIC,
        "tok-123",
        "https://sns.us-east-1.amazonaws.com/?c",
    )


async def test_subscription_confirmation_for_a_foreign_topic_is_rejected():
    foreign = "arn:aws:sns:us-east-1:999999999999:someone-else"
    callback = sns_subscription_confirmation(CERT.private_key_pem, CERT_URL, foreign, published_at=NOW)

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)


async def test_notification_from_an_unexpected_topic_is_rejected():
    callback = notification(BOUNCE_RECORD, topic="arn:aws:sns:us-east-1:123456789012:not-ours")

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)


async def test_certificate_from_a_foreign_host_is_never_fetched():
    fetcher = StaticCertificateFetcher({"https://evil.example.com/x.pem": CERT.certificate_pem})
    callback = notification(BOUNCE_RECORD, cert_url="https://evil.example.com/x.pem")

    with pytest.raises(SignatureInvalid):
        await verifier(fetcher).verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)
    assert fetcher.requested_urls == []


async def test_forged_notification_signed_with_another_key_is_rejected():
    impostor = generate_sns_certificate(not_before=NOW - timedelta(days=1), key_size=1024)
    callback = notification(BOUNCE_RECORD, key_pem=impostor.private_key_pem)

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)


async def test_notification_with_a_changed_message_is_rejected():
    callback = notification(BOUNCE_RECORD)
    tampered = callback.body.replace(b"Permanent", b"Transient", 1)
    assert tampered != callback.body

    with pytest.raises(SignatureInvalid):
        await verifier().verify_and_parse("ses", SECRETS, callback.headers, tampered, NOW)


async def test_unsigned_notification_is_rejected():
    document = json.loads(notification(BOUNCE_RECORD).body)
    del document["Signature"]

    with pytest.raises(SignatureMissing):
        await verifier().verify_and_parse("ses", SECRETS, {}, json.dumps(document).encode(), NOW)


async def test_raw_message_delivery_is_rejected_as_unsigned():
    with pytest.raises(SignatureMissing):
        await verifier().verify_and_parse(
            "ses", SECRETS, {"x-amz-sns-rawdelivery": "true"}, json.dumps(BOUNCE_RECORD).encode(), NOW
        )


async def test_notification_published_beyond_the_retry_window_is_stale():
    callback = notification(BOUNCE_RECORD, at=NOW - timedelta(minutes=66))

    with pytest.raises(StaleWebhook):
        await verifier().verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)


async def test_replayed_notification_is_rejected():
    shared = verifier()
    callback = notification(BOUNCE_RECORD)
    await shared.verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await shared.verify_and_parse(
            "ses", SECRETS, callback.headers, callback.body, NOW + timedelta(seconds=20)
        )


async def test_expired_signing_certificate_is_rejected():
    expired = generate_sns_certificate(
        not_before=NOW - timedelta(days=30), valid_for=timedelta(days=1), key_size=1024
    )
    fetcher = StaticCertificateFetcher({CERT_URL: expired.certificate_pem})
    callback = notification(BOUNCE_RECORD, key_pem=expired.private_key_pem)

    with pytest.raises(SignatureInvalid):
        await verifier(fetcher).verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)


async def test_signing_certificate_is_fetched_once_and_cached():
    fetcher = StaticCertificateFetcher({CERT_URL: CERT.certificate_pem})
    shared = verifier(fetcher)
    for _ in range(3):
        callback = notification(BOUNCE_RECORD)
        await shared.verify_and_parse("ses", SECRETS, callback.headers, callback.body, NOW)

    assert fetcher.requested_urls == [CERT_URL]


async def test_httpx_fetcher_gets_the_pem_over_https_without_redirects():
    requests = []

    def aws(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path.endswith("/missing.pem"):
            return httpx.Response(404, text="<Error><Code>NoSuchKey</Code></Error>")
        return httpx.Response(
            200, content=CERT.certificate_pem, headers={"Content-Type": "application/x-x509-ca-cert"}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(aws)) as client:
        fetcher = HttpxCertificateFetcher(client)
        assert await fetcher.fetch(CERT_URL) == CERT.certificate_pem
        with pytest.raises(CertificateUnavailable):
            await fetcher.fetch("https://sns.us-east-1.amazonaws.com/missing.pem")

    assert [str(request.url) for request in requests] == [
        CERT_URL,
        "https://sns.us-east-1.amazonaws.com/missing.pem",
    ]
