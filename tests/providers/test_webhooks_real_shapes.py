"""Provider callbacks as providers really send them, which leave out fields their tidy examples show.

A webhook loses data only when it is forged, stale or replayed: anything else a provider sends is read as far as
it can be, and what cannot be read is handed back as a malformed item beside the good events, never a reason to
refuse them. Payloads follow the providers' documented (and captured) shapes; the source of each is named.
"""

import json
from datetime import UTC, datetime, timedelta

import pytest

from dev.simulator.signing import (
    generate_sendgrid_key_pair,
    generate_sns_certificate,
    sign_mailgun_payload,
    sign_postmark_payload,
    sign_sendgrid_body,
    sign_sns_document,
    sns_request,
)
from libs.providers.events import BounceType, EventKind
from libs.providers.ses.webhook import StaticCertificateFetcher
from libs.providers.webhook_model import MalformedWebhook, ParsedWebhook, SignatureInvalid
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
EPOCH_NOW = int(NOW.timestamp())

MAILGUN_SECRETS = {"webhook_signing_key": "key-real-shapes-0123456789abcdef"}
SENDGRID_KEYS = generate_sendgrid_key_pair()
SENDGRID_SECRETS = {"verification_key": SENDGRID_KEYS.verification_key}
POSTMARK_USER, POSTMARK_PASSWORD = "postmark-hook", "real-shapes"
POSTMARK_SECRETS = {"webhook_user": POSTMARK_USER, "webhook_password": POSTMARK_PASSWORD}
SNS_TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
SNS_CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-real-shapes.pem"
SNS_CERT = generate_sns_certificate(not_before=NOW - timedelta(days=1))
SES_SECRETS = {"topic_arns": SNS_TOPIC}


def verifier() -> WebhookVerifier:
    fetcher = StaticCertificateFetcher({SNS_CERT_URL: SNS_CERT.certificate_pem})
    return WebhookVerifier(InMemoryReplayGuard(), certificate_fetcher=fetcher)


async def mailgun(event_data: dict, *, token: str | None = None) -> ParsedWebhook:
    callback = sign_mailgun_payload(event_data, MAILGUN_SECRETS["webhook_signing_key"], timestamp=EPOCH_NOW,
                                    token=token)
    result = await verifier().verify("mailgun", MAILGUN_SECRETS, callback.headers, callback.body, NOW)
    assert isinstance(result, ParsedWebhook)
    return result


async def sendgrid(batch: object) -> ParsedWebhook:
    callback = sign_sendgrid_body(json.dumps(batch).encode(), SENDGRID_KEYS.private_key_pem, timestamp=EPOCH_NOW)
    result = await verifier().verify("sendgrid", SENDGRID_SECRETS, callback.headers, callback.body, NOW)
    assert isinstance(result, ParsedWebhook)
    return result


async def postmark(record: dict) -> ParsedWebhook:
    callback = sign_postmark_payload(record, POSTMARK_USER, POSTMARK_PASSWORD)
    result = await verifier().verify("postmark", POSTMARK_SECRETS, callback.headers, callback.body, NOW)
    assert isinstance(result, ParsedWebhook)
    return result


def sns_notification(message: dict | str, *, published_at: str = "2026-03-02T09:29:30.000Z") -> tuple[dict, bytes]:
    document = {
        "Type": "Notification",
        "MessageId": "7c1a3f0e-5f1b-5c8e-9b7a-3a1f0e5c8e9b",
        "TopicArn": SNS_TOPIC,
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": published_at,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    request = sns_request(sign_sns_document(document, SNS_CERT.private_key_pem, SNS_CERT_URL))
    return request.headers, request.body


async def ses(message: dict, **kwargs: str) -> ParsedWebhook:
    headers, body = sns_notification(message, **kwargs)
    result = await verifier().verify("ses", SES_SECRETS, headers, body, NOW)
    assert isinstance(result, ParsedWebhook)
    return result


# --- Mailgun -------------------------------------------------------------------------------------------------

# A "rejected" event as Mailgun's Events API documents it: Mailgun refused the whole request, so there is no
# "recipient" (the addresses are in the message's To header) and, like older events, no "id".
MAILGUN_REJECTED = {
    "event": "rejected",
    "timestamp": EPOCH_NOW - 20.25,
    "reject": {"reason": "Sandbox subdomains are for test purposes only.", "description": ""},
    "flags": {"is-authenticated": True, "is-test-mode": False},
    "tags": [],
    "user-variables": {"esp_message_id": "msg_mg_rejected", "esp_tenant_id": "tenant_acme"},
    "message": {
        "headers": {
            "to": '"Doe, Jane" <jane@example.com>, bob@example.org',
            "message-id": "20260302092910.1.ABCDEF@mg.example.com",
            "from": "Shop <shop@mg.example.com>",
            "subject": "Your receipt",
        },
        "attachments": [],
        "size": 512,
    },
}


async def test_mailgun_rejected_event_reaches_every_address_of_its_to_header():
    result = await mailgun(MAILGUN_REJECTED)

    assert [(e.kind, e.recipient) for e in result.events] == [
        (EventKind.REJECTED, "jane@example.com"),
        (EventKind.REJECTED, "bob@example.org"),
    ]
    assert result.malformed == []
    first = result.events[0]
    assert first.reason == "Sandbox subdomains are for test purposes only."
    assert first.provider_message_id == "<20260302092910.1.ABCDEF@mg.example.com>"
    assert (first.message_id, first.tenant_id) == ("msg_mg_rejected", "tenant_acme")
    assert len({e.event_id for e in result.events}) == 2


async def test_mailgun_event_without_id_gets_the_same_derived_id_on_every_retry():
    # Mailgun's retries come with fresh signature tokens; the event itself is the same.
    first = await mailgun(MAILGUN_REJECTED, token="a" * 50)
    retry = await mailgun(MAILGUN_REJECTED, token="b" * 50)

    assert [e.event_id for e in first.events] == [e.event_id for e in retry.events]


async def test_mailgun_event_without_timestamp_happened_when_it_was_signed():
    # The Events API guarantees only "event" and "timestamp"; even the timestamp is not worth losing an event over.
    delivered = {"event": "delivered", "recipient": "alice@example.com",
                 "message": {"headers": {"message-id": "20260302.2@mg.example.com"}}}

    (event,) = (await mailgun(delivered)).events

    assert event.occurred_at == NOW


async def test_mailgun_failure_without_severity_is_temporary_when_its_code_is_4xx():
    # The Events API's failure example of 2013 carries "severity", older stored events may not.
    failed = {
        "event": "failed", "timestamp": EPOCH_NOW - 5, "recipient": "bar@example.com", "reason": "generic",
        "delivery-status": {"code": 498, "message": "No MX for [example.com]", "retry-seconds": 900,
                            "description": "No MX for [example.com]"},
        "message": {"headers": {"message-id": "20130813230036.10303.40433@samples.mailgun.org"}},
    }

    (event,) = (await mailgun(failed)).events

    assert (event.kind, event.diagnostic) == (EventKind.DEFERRED, "No MX for [example.com]")


async def test_mailgun_event_data_without_an_event_name_is_kept_as_a_malformed_item():
    nameless = {"timestamp": EPOCH_NOW, "recipient": "alice@example.com"}

    result = await mailgun(nameless)

    assert result.events == []
    (item,) = result.malformed
    assert item.raw == nameless
    assert "no event name" in item.reason


async def test_mailgun_event_about_nobody_and_no_message_is_kept_as_a_malformed_item():
    result = await mailgun({"event": "rejected", "timestamp": EPOCH_NOW, "reject": {"reason": "?"}})

    assert result.events == []
    assert len(result.malformed) == 1


# --- SendGrid ------------------------------------------------------------------------------------------------

# A "dropped" event as SendGrid really posts it (captured in django-anymail's test suite): its sg_message_id is
# the filtering node's id alone, with no X-Message-Id in front of it.
SENDGRID_DROPPED_FILTER_ID = {
    "email": "invalid@invalid",
    "smtp-id": "<wrfRRvF7Q0GgwUo2CvDmEA@ismtpd0006p1sjc2.sendgrid.net>",
    "timestamp": EPOCH_NOW - 30,
    "sg_event_id": "3NPOePGOTkeM_U3fgWApfg",
    "sg_message_id": "filter0093p1las1.9128.5717FB8127.0",
    "reason": "Invalid",
    "event": "dropped",
    "esp_message_id": "msg_sg_dropped",
    "esp_tenant_id": "tenant_acme",
}
# SendGrid's batched-events example of its Event Webhook docs: the dropped event carries neither sg_event_id nor
# sg_message_id.
SENDGRID_DROPPED_BARE = {
    "email": "not an email address",
    "smtp-id": "<4FB29F5D.5080404@sendgrid.com>",
    "timestamp": EPOCH_NOW - 20,
    "reason": "Invalid",
    "event": "dropped",
    "category": ["category1", "category2", "category3"],
    "id": "001",
    "purchase": "PO1452297845",
    "uid": "123456",
}
SENDGRID_DELIVERED = {
    "email": "john.doe@sendgrid.com",
    "sg_event_id": "vZL1Dhx34srS-HkO-gTXBLg",
    "sg_message_id": "142d9f3f351.7618.254f56.filter-147.22649.52A663508.0",
    "timestamp": EPOCH_NOW - 10,
    "smtp-id": "<142d9f3f351.7618.254f56@sendgrid.com>",
    "event": "delivered",
    "response": "250 OK",
    "category": "cat facts",
}


async def test_sendgrid_filter_id_is_not_taken_for_a_provider_message_id():
    (event,) = (await sendgrid([SENDGRID_DROPPED_FILTER_ID])).events

    assert event.kind is EventKind.REJECTED
    assert event.provider_message_id is None
    assert (event.message_id, event.tenant_id) == ("msg_sg_dropped", "tenant_acme")


async def test_sendgrid_event_without_event_id_gets_the_same_derived_id_every_time():
    first = (await sendgrid([SENDGRID_DROPPED_BARE])).events
    again = (await sendgrid([SENDGRID_DROPPED_BARE])).events

    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert first[0].event_id.startswith("sendgrid:")
    assert (first[0].kind, first[0].provider_message_id, first[0].reason) == (EventKind.REJECTED, None, "Invalid")


async def test_sendgrid_bounce_without_sg_message_id_is_still_an_event():
    # SendGrid's docs: "sg_message_id" may be missing from bounce events it cannot match to a message.
    bounce = {"email": "gone@example.com", "timestamp": EPOCH_NOW - 3, "event": "bounce", "type": "bounce",
              "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw", "reason": "550 5.1.1 unknown user", "status": "5.1.1",
              "esp_message_id": "msg_sg_bounce"}

    (event,) = (await sendgrid([bounce])).events

    assert (event.kind, event.bounce_type, event.provider_message_id) == (EventKind.BOUNCED, BounceType.HARD, None)


async def test_sendgrid_bounce_without_type_is_blocked_when_its_status_is_4xx():
    bounce = {"email": "busy@example.com", "timestamp": EPOCH_NOW - 3, "event": "bounce",
              "sg_event_id": "b4xx", "reason": "421 try later", "status": "4.2.1"}

    (event,) = (await sendgrid([bounce])).events

    assert event.bounce_type is BounceType.SOFT


@pytest.mark.parametrize(
    ("sendgrid_event", "extra", "kind"),
    [
        ("deferred", {"response": "400 try again later", "attempt": "5"}, EventKind.DEFERRED),
        ("spamreport", {}, EventKind.COMPLAINED),
        ("group_unsubscribe", {"asm_group_id": 10, "useragent": "Mozilla/5.0", "ip": "255.255.255.255"},
         EventKind.UNSUBSCRIBED),
        ("unsubscribe", {}, EventKind.UNSUBSCRIBED),
    ],
)
async def test_sendgrid_documented_delivery_and_account_events_are_read(sendgrid_event, extra, kind):
    item = {"email": "example@test.com", "timestamp": EPOCH_NOW - 1, "event": sendgrid_event,
            "sg_event_id": f"id-{sendgrid_event}", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.1.0",
            "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>", "category": "cat facts", **extra}

    (event,) = (await sendgrid([item])).events

    assert (event.kind, event.provider_message_id) == (kind, "14c5d75ce93.dfd.64b469")


async def test_sendgrid_resubscribes_and_processed_events_yield_nothing():
    items = [{"email": "example@test.com", "timestamp": EPOCH_NOW, "event": name, "sg_event_id": name}
             for name in ("group_resubscribe", "processed")]

    result = await sendgrid(items)

    assert (result.events, result.malformed) == ([], [])


async def test_one_malformed_item_in_a_sendgrid_batch_does_not_cost_the_others():
    no_event_name = {"email": "carol@example.com", "timestamp": EPOCH_NOW, "sg_event_id": "x"}
    batch = [SENDGRID_DELIVERED, no_event_name, "not an object", SENDGRID_DROPPED_FILTER_ID]

    result = await sendgrid(batch)

    assert [e.recipient for e in result.events] == ["john.doe@sendgrid.com", "invalid@invalid"]
    assert [(item.index, item.raw) for item in result.malformed] == [(1, no_event_name), (2, "not an object")]


async def test_sendgrid_item_without_a_recipient_is_a_malformed_item():
    result = await sendgrid([{"event": "delivered", "timestamp": EPOCH_NOW, "sg_event_id": "no-email"}])

    assert result.events == []
    assert "no recipient" in result.malformed[0].reason


async def test_signed_sendgrid_body_that_is_not_json_is_refused_as_authentic_but_unreadable():
    callback = sign_sendgrid_body(b"[{oops", SENDGRID_KEYS.private_key_pem, timestamp=EPOCH_NOW)

    with pytest.raises(MalformedWebhook) as refused:
        await verifier().verify("sendgrid", SENDGRID_SECRETS, callback.headers, callback.body, NOW)

    assert refused.value.authentic


async def test_forged_sendgrid_batch_is_refused_however_readable_it_is():
    other = generate_sendgrid_key_pair()
    callback = sign_sendgrid_body(json.dumps([SENDGRID_DELIVERED]).encode(), other.private_key_pem,
                                  timestamp=EPOCH_NOW)

    with pytest.raises(SignatureInvalid):
        await verifier().verify("sendgrid", SENDGRID_SECRETS, callback.headers, callback.body, NOW)


# --- Postmark ------------------------------------------------------------------------------------------------

# A bounce record of type Unsubscribe (TypeCode 16: a reply asking to be removed) as Postmark really posts it:
# no Email and no BouncedAt.
POSTMARK_UNSUBSCRIBE_BOUNCE = {
    "RecordType": "Bounce",
    "MessageStream": "outbound",
    "ID": 3719297970,
    "Type": "Unsubscribe",
    "TypeCode": 16,
    "Name": "Unsubscribe request",
    "Tag": "",
    "MessageID": "a8c1040e-db1c-4e18-ac79-bc5f64c7ce2c",
    "Metadata": {},
    "ServerID": 23,
    "Description": "Unsubscribe or Remove request.",
    "Details": "",
    "Inactive": False,
    "CanActivate": True,
    "Subject": "Re: Your receipt",
}


async def test_postmark_unsubscribe_bounce_without_email_or_bounced_at_is_an_unsubscribe():
    (event,) = (await postmark(POSTMARK_UNSUBSCRIBE_BOUNCE)).events

    assert event.kind is EventKind.UNSUBSCRIBED
    assert event.provider_message_id == "a8c1040e-db1c-4e18-ac79-bc5f64c7ce2c"
    assert event.recipient == ""  # the receiver fills it in from the message
    assert event.occurred_at == NOW
    assert event.event_id == "postmark:bounce:3719297970"


async def test_postmark_bounce_without_record_type_is_recognised_by_its_fields():
    # The bounce webhook example on postmarkapp.com/email-webhooks has no RecordType.
    legacy = {
        "ID": 42, "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
        "Details": "Test bounce details", "Email": "john@example.com", "BouncedAt": "2026-03-02T09:28:10.2735393Z",
        "DumpAvailable": True, "Inactive": True, "CanActivate": True, "Subject": "Test subject",
        "Metadata": {"user_id": 43},
    }

    (event,) = (await postmark(legacy)).events

    assert (event.kind, event.bounce_type, event.recipient) == (EventKind.BOUNCED, BounceType.HARD,
                                                                "john@example.com")
    assert event.occurred_at == datetime(2026, 3, 2, 9, 28, 10, 273539, tzinfo=UTC)


async def test_postmark_bounce_without_type_name_is_read_by_its_type_code():
    record = {"RecordType": "Bounce", "ID": 7, "TypeCode": 100002, "Email": "off@example.com",
              "MessageID": "m-7", "BouncedAt": "2026-03-02T09:29:00Z"}

    (event,) = (await postmark(record)).events

    assert (event.reason, event.bounce_type) == ("ManuallyDeactivated", BounceType.HARD)


async def test_postmark_record_of_a_type_we_do_not_track_is_accepted_with_no_events():
    result = await postmark({"RecordType": "InboundTransform", "MessageID": "m-8", "ServerID": 23})

    assert (result.events, result.malformed) == ([], [])


async def test_postmark_record_naming_no_recipient_and_no_message_is_a_malformed_item():
    record = {"RecordType": "Delivery", "ServerID": 23, "DeliveredAt": "2026-03-02T09:29:00Z"}

    result = await postmark(record)

    assert result.events == []
    assert result.malformed[0].raw == record


async def test_postmark_body_that_is_not_an_object_is_refused_as_authentic_but_unreadable():
    callback = sign_postmark_payload({}, POSTMARK_USER, POSTMARK_PASSWORD)

    with pytest.raises(MalformedWebhook) as refused:
        await verifier().verify("postmark", POSTMARK_SECRETS, callback.headers, b"[1, 2]", NOW)

    assert refused.value.authentic


# --- Amazon SES ----------------------------------------------------------------------------------------------

SES_MAIL = {
    "timestamp": "2026-03-02T09:20:00.000Z",
    "source": "shop@example.com",
    "sendingAccountId": "123456789012",
    "messageId": "0100018e0a1b2c3d-11111111-2222-3333-4444-555555555555-000000",
    "destination": ["recipient@example.com"],
    "tags": {"esp_message_id": ["msg_ses_1"], "esp_tenant_id": ["tenant_acme"]},
}


async def test_ses_bounce_without_its_own_timestamp_happened_when_sns_published_it():
    message = {"eventType": "Bounce", "mail": SES_MAIL,
               "bounce": {"bounceType": "Permanent", "bounceSubType": "General",
                          "bouncedRecipients": [{"emailAddress": "recipient@example.com", "status": "5.1.1"}]}}

    (event,) = (await ses(message, published_at="2026-03-02T09:29:30.000Z")).events

    assert event.occurred_at == datetime(2026, 3, 2, 9, 29, 30, tzinfo=UTC)
    assert (event.kind, event.bounce_type) == (EventKind.BOUNCED, BounceType.HARD)


async def test_ses_bounce_without_its_recipient_list_is_about_every_destination():
    message = {"notificationType": "Bounce", "mail": SES_MAIL,
               "bounce": {"bounceType": "Transient", "timestamp": "2026-03-02T09:29:00.000Z"}}

    (event,) = (await ses(message)).events

    assert (event.recipient, event.bounce_type, event.reason) == ("recipient@example.com", BounceType.SOFT,
                                                                  "Transient")


async def test_ses_delivery_delay_as_aws_documents_it_is_a_deferral():
    # "Examples of event data that Amazon SES publishes to Amazon SNS": DeliveryDelay record.
    message = {
        "eventType": "DeliveryDelay",
        "mail": SES_MAIL,
        "deliveryDelay": {
            "timestamp": "2026-03-02T09:28:00.000Z",
            "delayType": "TransientCommunicationFailure",
            "expirationTime": "2026-03-02T23:20:00.000Z",
            "delayedRecipients": [{"emailAddress": "recipient@example.com", "status": "4.4.1",
                                   "diagnosticCode": "smtp; 421 4.4.1 Unable to connect to remote host"}],
        },
    }

    (event,) = (await ses(message)).events

    assert (event.kind, event.reason) == (EventKind.DEFERRED, "TransientCommunicationFailure")
    assert event.diagnostic == "smtp; 421 4.4.1 Unable to connect to remote host"


async def test_ses_subscription_opt_out_as_aws_documents_it_is_an_unsubscribe():
    message = {
        "eventType": "Subscription",
        "mail": SES_MAIL,
        "subscription": {
            "contactList": "ContactListName",
            "timestamp": "2026-03-02T09:28:30.000Z",
            "source": "UnsubscribeHeader",
            "newTopicPreferences": {"unsubscribeAll": True, "topicSubscriptionStatus": [
                {"topicName": "ExampleTopicName", "subscriptionStatus": "OptOut"}]},
            "oldTopicPreferences": {"unsubscribeAll": False, "topicSubscriptionStatus": [
                {"topicName": "ExampleTopicName", "subscriptionStatus": "OptIn"}]},
        },
    }

    (event,) = (await ses(message)).events

    assert (event.kind, event.recipient, event.reason) == (EventKind.UNSUBSCRIBED, "recipient@example.com",
                                                           "ContactListName")


async def test_ses_reject_is_dated_when_the_email_was_sent():
    message = {"eventType": "Reject", "mail": SES_MAIL, "reject": {"reason": "Bad content"}}

    (event,) = (await ses(message)).events

    assert (event.kind, event.occurred_at) == (EventKind.REJECTED, datetime(2026, 3, 2, 9, 20, tzinfo=UTC))


async def test_ses_event_naming_nobody_is_a_malformed_item():
    message = {"eventType": "Complaint", "complaint": {"timestamp": "2026-03-02T09:28:00.000Z"}}

    result = await ses(message)

    assert result.events == []
    assert result.malformed[0].raw == message


async def test_ses_notification_whose_message_is_not_json_is_refused_as_authentic_but_unreadable():
    headers, body = sns_notification("not json {")

    with pytest.raises(MalformedWebhook) as refused:
        await verifier().verify("ses", SES_SECRETS, headers, body, NOW)

    assert refused.value.authentic


async def test_unreadable_items_are_dropped_by_verify_and_parse_which_returns_the_good_events():
    callback = sign_sendgrid_body(json.dumps([SENDGRID_DELIVERED, 7]).encode(), SENDGRID_KEYS.private_key_pem,
                                  timestamp=EPOCH_NOW)

    events = await verifier().verify_and_parse("sendgrid", SENDGRID_SECRETS, callback.headers, callback.body, NOW)

    assert [e.recipient for e in events] == ["john.doe@sendgrid.com"]


async def test_a_body_that_cannot_be_read_before_it_is_verified_is_not_taken_for_authentic():
    # Mailgun's signature travels inside the JSON body: a body that is not JSON cannot be checked at all.
    with pytest.raises(MalformedWebhook) as refused:
        await verifier().verify("mailgun", MAILGUN_SECRETS, {"Content-Type": "application/json"}, b"{oops", NOW)

    assert not refused.value.authentic
