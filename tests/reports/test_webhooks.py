"""Provider webhooks end to end: a signed callback → verified → EVENTS stream → consumer → message state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from esp.v1 import messages_pb2, reports_pb2

from dev.simulator.signing import mailgun_callback, sign_mailgun_payload, sns_subscription_confirmation
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from libs.routing.catalog import ProviderSpec, open_bucket
from services.reports.suppressions import is_suppressed
from tests.reports.builders import accepted, at, eventually, new_id, sent
from tests.reports.conftest import ReportsService, caller, message_state, wait_for_state

M, R = messages_pb2, reports_pb2
SIGNING_KEY = "key-reports-tests-0123456789abcdef"


async def configure_webhooks(reports: ReportsService, name: str, provider_type: str, secrets: dict[str, str]) -> None:
    """Put a provider instance with these webhook secrets in the provider catalog, as the router does after an admin
    RPC (sealing aside: tests/reports/test_provider_secrets.py and tests/e2e cover it), and wait until reports has
    it (its webhook endpoint stops answering 404)."""
    kv = await open_bucket(reports.js, reports.settings.namespace)
    await kv.put(name, ProviderSpec(name, provider_type, "http://127.0.0.1:9", webhook_secrets=secrets).to_json())

    async def known() -> bool:
        return (await _post(reports, name, {}, b"{}")).status_code != 404

    await eventually(known, what=f"reports knows {name}")


@pytest.fixture(scope="module")
async def mailgun(reports: ReportsService) -> str:
    """A Mailgun provider instance with its webhook signing key configured; returns its name."""
    name = f"mailgun-{new_id()[:8]}"
    await configure_webhooks(reports, name, "mailgun", {"webhook_signing_key": SIGNING_KEY})
    return name


def _mailgun_event(provider: str, provider_message_id: str, kind: EventKind = EventKind.DELIVERED, *,
                   recipient: str = "alice@example.com", **fields: object) -> DeliveryEvent:
    return DeliveryEvent(kind=kind, provider_type="mailgun", provider_name=provider, recipient=recipient,
                         occurred_at=datetime.now(UTC), event_id=new_id("mg-"),
                         provider_message_id=provider_message_id, **fields)  # type: ignore[arg-type]


async def _post(reports: ReportsService, provider: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=reports.webhook_url, timeout=10) as client:
        return await client.post(f"/webhooks/{provider}", headers=headers, content=body)


async def _sent_message(reports: ReportsService, provider: str) -> tuple[str, str, str]:
    """A tenant's message that ``provider`` took; returns (tenant, message id, provider message id)."""
    tenant, message_id = new_id("tenant-"), new_id()
    provider_message_id = f"<{new_id()}@mg.example>"
    await reports.publish([
        accepted(tenant, message_id, at(16)),
        sent(tenant, message_id, at(16, 0, 2), provider=provider, provider_message_id=provider_message_id),
    ])
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_SENT)
    return tenant, message_id, provider_message_id


async def _events_of(reports: ReportsService, tenant: str, message_id: str) -> list[messages_pb2.MessageEvent]:
    response = await reports.messages.ListMessageEvents(
        M.ListMessageEventsRequest(parent=f"messages/{message_id}", page_size=100), metadata=caller(tenant))
    return list(response.events)


async def _published_on(reports: ReportsService, tenant: str) -> int:
    """How many messages the EVENTS stream holds for the tenant."""
    subject = reports.topology.events_subject(tenant)
    info = await reports.js.stream_info(reports.topology.events_stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def test_a_signed_mailgun_delivered_callback_marks_the_message_delivered(reports: ReportsService, mailgun: str):
    tenant, message_id, provider_message_id = await _sent_message(reports, mailgun)
    callback = mailgun_callback(_mailgun_event(mailgun, provider_message_id), SIGNING_KEY)

    response = await _post(reports, mailgun, callback.headers, callback.body)

    assert response.status_code == 200
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)
    delivered = (await _events_of(reports, tenant, message_id))[-1]
    assert delivered.type == M.MESSAGE_EVENT_TYPE_DELIVERED
    assert delivered.provider == mailgun
    assert delivered.recipient == "alice@example.com"
    assert delivered.attributes["provider_type"] == "mailgun"


async def test_a_forged_callback_is_refused_and_changes_nothing(reports: ReportsService, mailgun: str):
    tenant, message_id, provider_message_id = await _sent_message(reports, mailgun)
    published_before = await _published_on(reports, tenant)
    forged = mailgun_callback(_mailgun_event(mailgun, provider_message_id), "not-the-signing-key")

    response = await _post(reports, mailgun, forged.headers, forged.body)

    assert response.status_code == 401
    assert await _published_on(reports, tenant) == published_before
    assert await message_state(reports, tenant, message_id) == M.MESSAGE_STATE_SENT


async def test_a_callback_with_a_tampered_signature_block_is_refused(reports: ReportsService, mailgun: str):
    _tenant, _message_id, provider_message_id = await _sent_message(reports, mailgun)
    callback = mailgun_callback(_mailgun_event(mailgun, provider_message_id), SIGNING_KEY)
    body = json.loads(callback.body)
    body["signature"]["token"] = body["signature"]["token"][::-1]

    response = await _post(reports, mailgun, callback.headers, json.dumps(body).encode())

    assert response.status_code == 401


async def test_a_stale_callback_is_refused(reports: ReportsService, mailgun: str):
    _tenant, _message_id, provider_message_id = await _sent_message(reports, mailgun)
    an_hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp())
    callback = mailgun_callback(_mailgun_event(mailgun, provider_message_id), SIGNING_KEY, timestamp=an_hour_ago)

    response = await _post(reports, mailgun, callback.headers, callback.body)

    assert response.status_code == 403


async def test_a_signed_callback_without_event_data_is_a_bad_request(reports: ReportsService, mailgun: str):
    callback = sign_mailgun_payload({}, SIGNING_KEY)
    body = json.loads(callback.body)
    del body["event-data"]

    response = await _post(reports, mailgun, callback.headers, json.dumps(body).encode())

    assert response.status_code == 400


async def test_a_replayed_callback_is_acknowledged_but_recorded_once(reports: ReportsService, mailgun: str):
    tenant, message_id, provider_message_id = await _sent_message(reports, mailgun)
    callback = mailgun_callback(_mailgun_event(mailgun, provider_message_id, EventKind.OPENED), SIGNING_KEY)

    first = await _post(reports, mailgun, callback.headers, callback.body)
    again = await _post(reports, mailgun, callback.headers, callback.body)
    marker = mailgun_callback(_mailgun_event(mailgun, provider_message_id), SIGNING_KEY)
    await _post(reports, mailgun, marker.headers, marker.body)
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)

    assert (first.status_code, again.status_code) == (200, 200)
    opened = [e for e in await _events_of(reports, tenant, message_id) if e.type == M.MESSAGE_EVENT_TYPE_OPENED]
    assert len(opened) == 1


async def test_a_callback_for_an_unknown_provider_is_not_found(reports: ReportsService):
    callback = mailgun_callback(_mailgun_event("nobody", "<x@mg>"), SIGNING_KEY)

    response = await _post(reports, f"unknown-{new_id()[:8]}", callback.headers, callback.body)

    assert response.status_code == 404


async def test_a_hard_bounce_callback_suppresses_the_recipient(reports: ReportsService, mailgun: str):
    tenant, message_id, provider_message_id = await _sent_message(reports, mailgun)
    bounce = _mailgun_event(mailgun, provider_message_id, EventKind.BOUNCED, recipient="Gone@Example.com",
                            bounce_type=BounceType.HARD)
    callback = mailgun_callback(bounce, SIGNING_KEY)

    response = await _post(reports, mailgun, callback.headers, callback.body)

    assert response.status_code == 200
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_BOUNCED)
    assert await is_suppressed(reports.redis, reports.settings.namespace, tenant, "gone@example.com")
    suppression = await reports.suppressions.GetSuppression(
        R.GetSuppressionRequest(name="suppressions/gone@example.com"), metadata=caller(tenant))
    assert suppression.reason == R.SUPPRESSION_REASON_HARD_BOUNCE


async def test_a_callback_that_beats_its_sent_event_is_applied_once_the_message_is_known(
        reports: ReportsService, mailgun: str):
    tenant, message_id = new_id("tenant-"), new_id()
    provider_message_id = f"<{new_id()}@mg.example>"
    early = mailgun_callback(_mailgun_event(mailgun, provider_message_id), SIGNING_KEY)

    response = await _post(reports, mailgun, early.headers, early.body)
    assert response.status_code == 200
    await reports.publish([
        accepted(tenant, message_id, at(17)),
        sent(tenant, message_id, at(17, 0, 2), provider=mailgun, provider_message_id=provider_message_id),
    ])

    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)


async def test_a_callback_carrying_our_message_id_finds_the_message_without_the_provider_id(
        reports: ReportsService, mailgun: str):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([accepted(tenant, message_id, at(18))])
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_ACCEPTED)
    callback = mailgun_callback(_mailgun_event(mailgun, f"<{new_id()}@mg.example>", message_id=message_id,
                                               tenant_id=tenant), SIGNING_KEY)

    response = await _post(reports, mailgun, callback.headers, callback.body)

    assert response.status_code == 200
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)


async def test_an_sns_subscription_confirmation_is_handed_to_the_confirmer(reports: ReportsService):
    name, topic = f"ses-{new_id()[:8]}", "arn:aws:sns:us-east-1:123456789012:esp-events"
    await configure_webhooks(reports, name, "ses", {"topic_arns": topic})
    request = sns_subscription_confirmation(reports.sns_certificate.private_key_pem, reports.sns_cert_url, topic)

    response = await _post(reports, name, request.headers, request.body)

    assert response.status_code == 200
    confirmed = [c for provider, c in reports.confirmations if provider == name]
    assert len(confirmed) == 1
    assert confirmed[0].topic_arn == topic  # type: ignore[attr-defined]
