"""Provider callbacks the receiver must not refuse: real shapes, batches with a bad item, unreadable bodies.

A callback loses data only when it is forged, stale or replayed. These tests run a webhook receiver against the
session's real Postgres and NATS, next to the reports service that consumes what it publishes; only the lookup of
each provider instance's secrets is a fixed table here (it is configuration, not what is tested).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import grpc
import httpx
import pytest
from esp.v1 import messages_pb2, reports_pb2
from psycopg_pool import AsyncConnectionPool

from dev.simulator.signing import generate_sendgrid_key_pair, sign_postmark_payload, sign_sendgrid_body
from libs.common.db import create_pool
from libs.providers.webhooks import RedisReplayGuard, WebhookVerifier
from services.reports.webhook_receiver import ProviderWebhookConfig, WebhookReceiver
from tests.reports.builders import accepted, at, eventually, new_id, sent
from tests.reports.conftest import ReportsService, caller, wait_for_state

M, R = messages_pb2, reports_pb2
SENDGRID_KEYS = generate_sendgrid_key_pair()
POSTMARK_USER, POSTMARK_PASSWORD = "postmark-hook", "tolerance-tests"


class FixedSecrets:
    """Each provider instance's webhook settings, as a fixed table."""

    def __init__(self, configs: Mapping[str, ProviderWebhookConfig]) -> None:
        self._configs = dict(configs)

    async def get(self, provider_name: str) -> ProviderWebhookConfig | None:
        return self._configs.get(provider_name)


SENDGRID = f"sendgrid-{new_id()[:8]}"
POSTMARK = f"postmark-{new_id()[:8]}"
SECRETS = FixedSecrets({
    SENDGRID: ProviderWebhookConfig(SENDGRID, "sendgrid", {"verification_key": SENDGRID_KEYS.verification_key}),
    POSTMARK: ProviderWebhookConfig(POSTMARK, "postmark", {"webhook_user": POSTMARK_USER,
                                                           "webhook_password": POSTMARK_PASSWORD}),
})


@pytest.fixture(scope="module")
async def pool(reports: ReportsService) -> AsyncIterator[AsyncConnectionPool]:
    pool = await create_pool(reports.settings.postgres_dsn, min_size=1, max_size=4, name="tolerance-tests")
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def webhooks(reports: ReportsService, pool: AsyncConnectionPool) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a webhook receiver publishing to the reports service's EVENTS stream."""
    guard = RedisReplayGuard(reports.redis, key_prefix=f"{reports.settings.namespace}:tolerance-replay:")
    receiver = WebhookReceiver(pool, reports.js, reports.topology, WebhookVerifier(guard), SECRETS)
    transport = httpx.ASGITransport(app=receiver.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        yield client


def _sendgrid_post(batch: object) -> tuple[dict[str, str], bytes]:
    callback = sign_sendgrid_body(json.dumps(batch).encode(), SENDGRID_KEYS.private_key_pem)
    return callback.headers, callback.body


async def _message_sent_through(reports: ReportsService, provider: str, provider_message_id: str,
                                to: str = "alice@example.com") -> tuple[str, str]:
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([
        accepted(tenant, message_id, at(16), to=(to,)),
        sent(tenant, message_id, at(16, 0, 2), provider=provider, provider_message_id=provider_message_id),
    ])
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_SENT)
    return tenant, message_id


async def _kept(pool: AsyncConnectionPool, provider: str) -> list[tuple[str, int | None, str, bytes, int]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT scope, item_index, reason, payload, times_received FROM reports.rejected_webhook_items
               WHERE provider = %s ORDER BY id""", (provider,))
        return [(scope, index, reason, bytes(payload), times) for scope, index, reason, payload, times
                in await cur.fetchall()]


async def _forget_kept(pool: AsyncConnectionPool, provider: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM reports.rejected_webhook_items WHERE provider = %s", (provider,))


async def test_a_batch_with_one_unreadable_item_delivers_the_others_and_keeps_that_item(
        reports: ReportsService, pool: AsyncConnectionPool, webhooks: httpx.AsyncClient):
    x_message_id = new_id().replace("-", "")[:22]
    tenant, message_id = await _message_sent_through(reports, SENDGRID, x_message_id)
    delivered = {"email": "alice@example.com", "timestamp": 1772443791, "event": "delivered",
                 "sg_event_id": new_id(), "sg_message_id": f"{x_message_id}.filterdrecv-5645d9c87f-6r2ch-1-0",
                 "response": "250 OK"}
    unreadable = {"email": "bob@example.com", "timestamp": 1772443792, "sg_event_id": new_id()}
    headers, body = _sendgrid_post([delivered, unreadable])

    response = await webhooks.post(f"/webhooks/{SENDGRID}", headers=headers, content=body)

    assert response.status_code == 200
    assert response.json()["result"] == "accepted_with_unreadable_items"
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_DELIVERED)
    ((index, reason, payload),) = [(index, reason, payload) for scope, index, reason, payload, _
                                   in await _kept(pool, SENDGRID) if scope == "item"]
    assert (index, json.loads(payload)) == (1, unreadable)
    assert "no event name" in reason


async def test_an_authentic_body_nobody_can_read_is_refused_and_kept_once_however_often_it_is_retried(
        pool: AsyncConnectionPool, webhooks: httpx.AsyncClient):
    await _forget_kept(pool, SENDGRID)
    body = b'[{"event": "delivered", "email": "truncated@exa'
    callback = sign_sendgrid_body(body, SENDGRID_KEYS.private_key_pem)

    first = await webhooks.post(f"/webhooks/{SENDGRID}", headers=callback.headers, content=callback.body)
    retry = await webhooks.post(f"/webhooks/{SENDGRID}", headers=callback.headers, content=callback.body)

    assert (first.status_code, retry.status_code) == (400, 400)
    ((scope, index, _reason, payload, times),) = await _kept(pool, SENDGRID)
    assert (scope, index, payload, times) == ("body", None, body, 2)


async def test_a_forged_body_is_refused_and_not_kept(pool: AsyncConnectionPool, webhooks: httpx.AsyncClient):
    await _forget_kept(pool, SENDGRID)
    forged = sign_sendgrid_body(b"not json", generate_sendgrid_key_pair().private_key_pem)

    response = await webhooks.post(f"/webhooks/{SENDGRID}", headers=forged.headers, content=forged.body)

    assert response.status_code == 401
    assert await _kept(pool, SENDGRID) == []


async def test_a_dropped_event_with_a_filter_id_finds_its_message_by_our_own_id(
        reports: ReportsService, webhooks: httpx.AsyncClient):
    tenant, message_id = new_id("tenant-"), new_id()
    await reports.publish([accepted(tenant, message_id, at(17), to=("invalid@invalid",))])
    await wait_for_state(reports, tenant, message_id, M.MESSAGE_STATE_ACCEPTED)
    dropped = {"email": "invalid@invalid", "timestamp": 1772443790, "event": "dropped", "reason": "Invalid",
               "sg_event_id": new_id(), "sg_message_id": "filter0093p1las1.9128.5717FB8127.0",
               "esp_message_id": message_id, "esp_tenant_id": tenant}
    headers, body = _sendgrid_post([dropped])

    response = await webhooks.post(f"/webhooks/{SENDGRID}", headers=headers, content=body)

    assert response.status_code == 200

    async def rejected_recorded() -> bool:
        events = await reports.messages.ListMessageEvents(
            M.ListMessageEventsRequest(parent=f"messages/{message_id}", page_size=100), metadata=caller(tenant))
        return any(e.type == M.MESSAGE_EVENT_TYPE_REJECTED and not e.provider_message_id for e in events.events)

    await eventually(rejected_recorded, what="the dropped event on the message's timeline")


async def test_a_postmark_unsubscribe_bounce_without_email_unsubscribes_the_messages_only_recipient(
        reports: ReportsService, webhooks: httpx.AsyncClient):
    postmark_message_id = new_id()
    tenant, _message_id = await _message_sent_through(reports, POSTMARK, postmark_message_id,
                                                      to="Leaver@Example.com")
    # As Postmark posts it: no Email, no BouncedAt.
    record = {"RecordType": "Bounce", "MessageStream": "outbound", "ID": 3719297970, "Type": "Unsubscribe",
              "TypeCode": 16, "Name": "Unsubscribe request", "MessageID": postmark_message_id, "ServerID": 23,
              "Description": "Unsubscribe or Remove request.", "Details": "", "Inactive": False,
              "CanActivate": True, "Subject": "Re: Hello"}
    callback = sign_postmark_payload(record, POSTMARK_USER, POSTMARK_PASSWORD)

    response = await webhooks.post(f"/webhooks/{POSTMARK}", headers=callback.headers, content=callback.body)

    assert response.status_code == 200

    async def unsubscribed() -> bool:
        try:
            suppression = await reports.suppressions.GetSuppression(
                R.GetSuppressionRequest(name="suppressions/leaver@example.com"), metadata=caller(tenant))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return suppression.reason == R.SUPPRESSION_REASON_UNSUBSCRIBE

    await eventually(unsubscribed, what="the recipient unsubscribed")


async def test_kept_payloads_past_their_retention_are_deleted_when_another_is_kept(
        pool: AsyncConnectionPool, webhooks: httpx.AsyncClient):
    await _forget_kept(pool, POSTMARK)
    async with pool.connection() as conn:
        await conn.execute(
            """INSERT INTO reports.rejected_webhook_items (provider, provider_type, scope, reason, payload,
                   payload_sha256, first_received_at, last_received_at)
               VALUES (%s, 'postmark', 'body', 'old', 'x', 'x', now() - interval '40 days',
                       now() - interval '31 days')""", (POSTMARK,))
    unreadable = sign_postmark_payload({}, POSTMARK_USER, POSTMARK_PASSWORD)

    response = await webhooks.post(f"/webhooks/{POSTMARK}", headers=unreadable.headers, content=b"[]")

    assert response.status_code == 400
    assert [(scope, payload) for scope, _, _, payload, _ in await _kept(pool, POSTMARK)] == [("body", b"[]")]
