"""The provider-independent parts: handler lookup, configuration errors, freshness override, replay release,
the in-memory replay guard and the event model's invariants."""

from datetime import UTC, datetime, timedelta

import pytest

from dev.simulator.signing import generate_sendgrid_key_pair, sign_mailgun_payload, sign_sendgrid_body
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.providers.webhook_model import ReplayedWebhook, StaleWebhook, UnsupportedProvider, WebhookConfigurationError
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
SECRETS = {"webhook_signing_key": "key-registry-tests"}
EVENT_DATA = {
    "id": "e1",
    "event": "delivered",
    "timestamp": NOW.timestamp(),
    "recipient": "a@example.com",
    "message": {"headers": {"message-id": "1@mg.example.com"}},
}


def mailgun_request(at=NOW):
    return sign_mailgun_payload(EVENT_DATA, SECRETS["webhook_signing_key"], timestamp=int(at.timestamp()))


async def test_smtp_has_no_webhooks_and_says_so():
    with pytest.raises(UnsupportedProvider, match="no delivery webhooks"):
        await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse("smtp", {}, {}, b"{}", NOW)


@pytest.mark.parametrize("provider_type", ["sparkpost", "../ses", "Mailgun", "events"])
async def test_unknown_provider_type_is_unsupported(provider_type):
    with pytest.raises(UnsupportedProvider):
        await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse(provider_type, {}, {}, b"{}", NOW)


async def test_missing_secret_is_a_configuration_error_not_a_rejection():
    callback = mailgun_request()

    with pytest.raises(WebhookConfigurationError):
        await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse(
            "mailgun", {}, callback.headers, callback.body, NOW
        )


async def test_headers_are_matched_case_insensitively():
    keys = generate_sendgrid_key_pair()
    callback = sign_sendgrid_body(b"[]", keys.private_key_pem, timestamp=int(NOW.timestamp()))
    lowered = {name.lower(): value for name, value in callback.headers.items()}

    events = await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse(
        "sendgrid", {"verification_key": keys.verification_key}, lowered, callback.body, NOW
    )

    assert events == []


async def test_freshness_window_can_be_narrowed_per_provider():
    callback = mailgun_request(at=NOW - timedelta(minutes=2))
    narrow = WebhookVerifier(InMemoryReplayGuard(), tolerances={"mailgun": timedelta(minutes=1)})

    with pytest.raises(StaleWebhook):
        await narrow.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)


async def test_timestamp_from_the_future_beyond_the_window_is_stale():
    callback = mailgun_request(at=NOW + timedelta(minutes=16))

    with pytest.raises(StaleWebhook):
        await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse(
            "mailgun", SECRETS, callback.headers, callback.body, NOW
        )


async def test_released_request_is_accepted_again_when_the_provider_retries():
    verifier = WebhookVerifier(InMemoryReplayGuard())
    callback = mailgun_request()
    await verifier.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    await verifier.release("mailgun", SECRETS, callback.headers, callback.body, NOW)
    events = await verifier.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    assert [event.event_id for event in events] == ["e1"]


async def test_verifier_without_release_keeps_rejecting_the_retry():
    verifier = WebhookVerifier(InMemoryReplayGuard())
    callback = mailgun_request()
    await verifier.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)

    with pytest.raises(ReplayedWebhook):
        await verifier.verify_and_parse("mailgun", SECRETS, callback.headers, callback.body, NOW)


async def test_naive_now_is_refused():
    callback = mailgun_request()

    with pytest.raises(ValueError, match="timezone-aware"):
        await WebhookVerifier(InMemoryReplayGuard()).verify_and_parse(
            "mailgun", SECRETS, callback.headers, callback.body, datetime(2026, 3, 2, 9, 30)
        )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_in_memory_guard_reports_a_key_seen_within_its_ttl():
    guard = InMemoryReplayGuard(clock=FakeClock())

    assert await guard.seen("k", 60) is False
    assert await guard.seen("k", 60) is True


async def test_in_memory_guard_forgets_a_key_after_its_ttl():
    clock = FakeClock()
    guard = InMemoryReplayGuard(clock=clock)
    await guard.seen("k", 60)

    clock.now += 61

    assert await guard.seen("k", 60) is False


async def test_in_memory_guard_stays_bounded_by_evicting_the_oldest_keys():
    guard = InMemoryReplayGuard(max_entries=3, clock=FakeClock())
    for key in ["a", "b", "c", "d"]:
        await guard.seen(key, 60)

    assert await guard.seen("d", 60) is True
    assert await guard.seen("a", 60) is False


def test_event_requires_an_aware_timestamp():
    with pytest.raises(ValueError, match="timezone-aware"):
        DeliveryEvent(
            kind=EventKind.DELIVERED,
            provider_type="ses",
            provider_name="ses",
            recipient="a@b.c",
            occurred_at=datetime(2026, 1, 1),
            event_id="x",
        )


@pytest.mark.parametrize(
    ("kind", "bounce_type"), [(EventKind.BOUNCED, None), (EventKind.DELIVERED, BounceType.HARD)]
)
def test_bounce_type_goes_with_bounced_events_only(kind, bounce_type):
    with pytest.raises(ValueError, match="bounce_type"):
        DeliveryEvent(
            kind=kind,
            provider_type="ses",
            provider_name="ses",
            recipient="a@b.c",
            occurred_at=NOW,
            event_id="x",
            bounce_type=bounce_type,
        )


def test_events_compare_equal_regardless_of_raw_payload():
    common = {
        "kind": EventKind.OPENED,
        "provider_type": "ses",
        "provider_name": "ses",
        "recipient": "a@b.c",
        "occurred_at": NOW,
        "event_id": "x",
    }

    assert DeliveryEvent(**common, raw={"a": 1}) == DeliveryEvent(**common, raw=b"other")
    assert hash(DeliveryEvent(**common, raw={"a": 1})) == hash(DeliveryEvent(**common, raw={"b": 2}))
