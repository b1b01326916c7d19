"""One-click unsubscribe (RFC 8058) on the reports HTTP server: POST suppresses, GET only asks, bad tokens 404."""

from __future__ import annotations

import base64

import httpx
import pytest

from libs.common.message_classes import MessageClass
from libs.common.settings import SettingsError, load_settings
from libs.common.suppressions import (
    suppressed_among,
    suppression_key,
    suppression_key_for_every_class,
    suppression_key_for_topic,
)
from libs.common.unsubscribe import UnsubscribeTarget, UnsubscribeTokens, new_key_entry
from services.reports.config import ReportsSettings
from tests.reports.builders import new_id
from tests.reports.conftest import ReportsService

ONE_CLICK = {"content": b"List-Unsubscribe=One-Click",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def _target(**fields: str) -> UnsubscribeTarget:
    return UnsubscribeTarget(tenant_id=new_id("tenant-"), email=f"{new_id('reader-')}@example.com", **fields)


def _token(reports: ReportsService, target: UnsubscribeTarget) -> str:
    return UnsubscribeTokens.from_entries(reports.settings.unsubscribe_keys).sign(target)


async def _request(reports: ReportsService, method: str, token: str, **kwargs: object) -> httpx.Response:
    # As a mail client: no cookies, redirects not followed.
    async with httpx.AsyncClient(base_url=reports.webhook_url, timeout=10, follow_redirects=False) as client:
        return await client.request(method, f"/u/{token}", **kwargs)  # type: ignore[arg-type]


async def _suppression_rows(reports: ReportsService, target: UnsubscribeTarget) -> list[tuple[str, str]]:
    async with await reports.connect_db() as conn:
        cur = await conn.execute("SELECT reason, note FROM reports.suppressions WHERE tenant_id = %s AND email = %s",
                                 (target.tenant_id, target.email.lower()))
        return [(reason, note) for reason, note in await cur.fetchall()]


async def _mirrored(reports: ReportsService, target: UnsubscribeTarget) -> bool:
    return bool(await suppressed_among(reports.redis, reports.settings.namespace, target.tenant_id, [target.email]))


async def test_a_one_click_post_as_a_mail_client_sends_it_suppresses_the_recipient(reports: ReportsService):
    target = _target()

    response = await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    assert response.status_code == 200
    assert [reason for reason, _ in await _suppression_rows(reports, target)] == ["unsubscribe"]
    assert await _mirrored(reports, target)


async def test_a_one_click_post_leaves_otp_and_transactional_mail_admissible(reports: ReportsService):
    target = _target()

    await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    namespace, emails = reports.settings.namespace, [target.email]
    assert await suppressed_among(reports.redis, namespace, target.tenant_id, emails, MessageClass.BULK) == {
        target.email}
    for message_class in (MessageClass.OTP, MessageClass.TRANSACTIONAL):
        assert not await suppressed_among(reports.redis, namespace, target.tenant_id, emails, message_class)


async def test_a_repeated_one_click_post_answers_200_and_leaves_one_suppression(reports: ReportsService):
    target = _target()
    token = _token(reports, target)

    first = await _request(reports, "POST", token, **ONE_CLICK)
    again = await _request(reports, "POST", token, **ONE_CLICK)

    assert (first.status_code, again.status_code) == (200, 200)
    assert len(await _suppression_rows(reports, target)) == 1
    assert await _mirrored(reports, target)


async def test_a_one_click_post_as_multipart_form_data_also_unsubscribes(reports: ReportsService):
    target = _target()

    response = await _request(reports, "POST", _token(reports, target),
                              files={"List-Unsubscribe": (None, "One-Click")})

    assert response.status_code == 200
    assert await _mirrored(reports, target)


async def test_campaign_and_topic_are_kept_in_the_suppression_note(reports: ReportsService):
    target = _target(campaign_id="cmp-42", topic="news")

    await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    assert await _suppression_rows(reports, target) == [("unsubscribe", "one-click; campaign=cmp-42; topic=news")]


async def test_a_get_shows_a_confirmation_form_that_posts_and_suppresses_nothing(reports: ReportsService):
    target = _target()

    response = await _request(reports, "GET", _token(reports, target))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<form method="post">' in page and 'name="List-Unsubscribe" value="One-Click"' in page
    assert target.email not in page  # masked: the page is one leaked URL away from anyone
    assert await _suppression_rows(reports, target) == []
    assert not await _mirrored(reports, target)


async def test_the_pages_set_no_cookie_and_send_no_referrer(reports: ReportsService):
    token = _token(reports, _target())

    for response in (await _request(reports, "GET", token), await _request(reports, "POST", token, **ONE_CLICK)):
        assert "set-cookie" not in response.headers
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_tampered_token_answers_404_and_suppresses_nothing(reports: ReportsService, method: str):
    target = _target()
    token = _token(reports, target)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()

    response = await _request(reports, method, tampered, **(ONE_CLICK if method == "POST" else {}))

    assert response.status_code == 404
    assert response.text == "not found"
    assert await _suppression_rows(reports, target) == []
    assert not await _mirrored(reports, target)


@pytest.mark.parametrize("token", ["garbage", "A" * 5000, "%00"])
async def test_a_token_that_is_not_ours_answers_404(reports: ReportsService, token: str):
    response = await _request(reports, "POST", token, **ONE_CLICK)

    assert response.status_code == 404


async def test_a_token_signed_with_the_previous_key_still_unsubscribes(reports: ReportsService):
    target = _target()
    previous_key_only = UnsubscribeTokens.from_entries(reports.settings.unsubscribe_keys[1:])

    response = await _request(reports, "POST", previous_key_only.sign(target), **ONE_CLICK)

    assert response.status_code == 200
    assert await _mirrored(reports, target)


async def test_a_token_signed_with_a_key_reports_does_not_have_answers_404(reports: ReportsService):
    target = _target()
    stranger = UnsubscribeTokens.from_entries([new_key_entry(2)])

    response = await _request(reports, "POST", stranger.sign(target), **ONE_CLICK)

    assert response.status_code == 404
    assert not await _mirrored(reports, target)


async def test_an_address_suppressed_earlier_keeps_its_first_reason(reports: ReportsService):
    target = _target()
    async with await reports.connect_db() as conn:
        await conn.execute("INSERT INTO reports.suppressions (tenant_id, email, reason) VALUES (%s, %s, 'complaint')",
                           (target.tenant_id, target.email))

    response = await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    assert response.status_code == 200
    assert [reason for reason, _ in await _suppression_rows(reports, target)] == ["complaint"]
    assert await _mirrored(reports, target)  # the mirror is repaired even when Postgres already had the row


def test_a_malformed_unsubscribe_key_fails_the_settings_without_quoting_it():
    with pytest.raises(SettingsError) as refused:
        load_settings(ReportsSettings, {"ESP_UNSUBSCRIBE_KEYS": "1:c2hvcnQta2V5"})

    assert "ESP_UNSUBSCRIBE_KEYS" in str(refused.value)
    assert "c2hvcnQta2V5" not in str(refused.value)


def test_the_settings_repr_does_not_show_the_keys():
    key = new_key_entry(1)

    assert key.partition(":")[2] not in repr(load_settings(ReportsSettings, {"ESP_UNSUBSCRIBE_KEYS": key}))


async def test_a_one_click_post_with_a_topic_suppresses_only_that_topic(reports: ReportsService):
    target = _target(campaign_id="cmp-7", topic="weekly-deals")

    response = await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    assert response.status_code == 200
    namespace, emails = reports.settings.namespace, [target.email]
    assert await suppressed_among(reports.redis, namespace, target.tenant_id, emails, MessageClass.BULK,
                                  topic="weekly-deals") == {target.email}
    assert not await suppressed_among(reports.redis, namespace, target.tenant_id, emails, MessageClass.BULK,
                                      topic="product-updates")
    assert not await suppressed_among(reports.redis, namespace, target.tenant_id, emails, MessageClass.BULK)
    for message_class in (MessageClass.OTP, MessageClass.TRANSACTIONAL):
        assert not await suppressed_among(reports.redis, namespace, target.tenant_id, emails, message_class,
                                          topic="weekly-deals")


async def test_a_one_click_post_with_a_topic_records_a_topic_scoped_unsubscribe(reports: ReportsService):
    target = _target(topic="Weekly-Deals")

    await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    async with await reports.connect_db() as conn:
        cur = await conn.execute("SELECT reason, topic FROM reports.suppressions WHERE tenant_id = %s AND email = %s",
                                 (target.tenant_id, target.email.lower()))
        assert await cur.fetchall() == [("unsubscribe", "weekly-deals")]


async def test_a_one_click_post_with_a_topic_puts_the_address_in_the_topics_redis_set_only(reports: ReportsService):
    target = _target(topic="weekly-deals")

    await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    namespace, email = reports.settings.namespace, target.email.lower()
    assert await reports.redis.sismember(suppression_key_for_topic(namespace, target.tenant_id, "weekly-deals"), email)
    assert not await reports.redis.sismember(suppression_key(namespace, target.tenant_id), email)
    assert not await reports.redis.sismember(suppression_key_for_every_class(namespace, target.tenant_id), email)


async def test_the_confirmation_page_of_a_topic_names_the_topic(reports: ReportsService):
    response = await _request(reports, "GET", _token(reports, _target(topic="weekly-deals")))

    assert "Stop receiving <b>weekly-deals</b> email" in response.text


async def test_a_token_whose_topic_cannot_be_a_topic_unsubscribes_from_every_topic(reports: ReportsService):
    target = _target(topic="not a topic~")

    response = await _request(reports, "POST", _token(reports, target), **ONE_CLICK)

    assert response.status_code == 200
    assert await suppressed_among(reports.redis, reports.settings.namespace, target.tenant_id, [target.email],
                                  MessageClass.BULK) == {target.email}
