"""The large-attachment policy: an email too large for every provider that could carry it goes out with expiring
download links instead of attachments (tenant policy ``link``), or is refused at accept (policy ``reject``); the
decision is stated in the message's events. Also the sender-side links (services/sender/links.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime

import grpc
import httpx
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2, tenants_pb2

from libs.routing.catalog import ProviderSpec
from services.sender.links import link_attachments
from tests.ingest.conftest import IngestHarness, TenantHandle, refused, send_request

SMALL_CAP = 60_000
ATTACHMENT = os.urandom(100_000)  # ~137 kB base64-encoded: over SMALL_CAP, far under the adapters' own caps


def provider(provider_id: str, cap: int, **fields: object) -> ProviderSpec:
    return ProviderSpec(id=provider_id, type="smtp", endpoint="127.0.0.1:1", max_message_bytes=cap, **fields)


async def _task(harness: IngestHarness, message_id: str) -> queue_pb2.SendTask:
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT task FROM ingest.messages WHERE id = %s", (message_id,))
        row = await cur.fetchone()
    assert row is not None
    return queue_pb2.SendTask.FromString(bytes(row[0]))


async def _events(harness: IngestHarness, tenant: TenantHandle, name: str) -> list[messages_pb2.MessageEvent]:
    for _ in range(300):
        try:
            reply = await harness.messages.ListMessageEvents(messages_pb2.ListMessageEventsRequest(parent=name),
                                                             metadata=tenant.auth)
            if reply.events:
                return list(reply.events)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"no events for {name}")


@pytest.mark.usefixtures("no_providers")
async def test_an_email_too_large_for_every_provider_is_accepted_to_go_out_with_links(harness: IngestHarness):
    await harness.set_providers([provider("small-a", SMALL_CAP), provider("small-b", SMALL_CAP // 2)])
    tenant = await harness.new_tenant()
    attachment = await harness.upload(tenant, ATTACHMENT, filename="plans.zip")
    message = await harness.send(tenant, send_request(attachment_ids=[attachment.id]))
    task = await _task(harness, message.id)
    assert task.attachments_as_links
    assert task.message_bytes <= SMALL_CAP  # routing will find a provider for it
    assert [a.attachment_id for a in task.attachments] == [attachment.id]  # the sender links them
    accepted = (await _events(harness, tenant, message.name))[0]
    assert accepted.type == messages_pb2.MESSAGE_EVENT_TYPE_ACCEPTED
    assert accepted.attributes["attachments_as_links"] == "true"
    assert int(accepted.attributes["attached_message_bytes"]) > SMALL_CAP
    assert accepted.attributes["largest_provider_cap_bytes"] == str(SMALL_CAP)


@pytest.mark.usefixtures("no_providers")
async def test_under_policy_reject_such_an_email_is_refused_at_accept_and_costs_nothing(harness: IngestHarness):
    await harness.set_providers([provider("small", SMALL_CAP)])
    tenant = await harness.new_tenant(large_attachment_policy=tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT)
    attachment = await harness.upload(tenant, ATTACHMENT)
    before = await harness.balance(tenant)
    failed = await refused(harness.messages.SendEmail(send_request(attachment_ids=[attachment.id]),
                                                      metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.info.reason == "ATTACHMENTS_TOO_LARGE"
    assert failed.info.metadata["largest_provider_cap_bytes"] == str(SMALL_CAP)
    assert int(failed.info.metadata["message_bytes"]) > SMALL_CAP
    assert await harness.balance(tenant) == before
    assert await harness.message_rows(tenant) == 0
    assert await harness.parts.gate.used_today(tenant.id) == 0


@pytest.mark.usefixtures("no_providers")
async def test_an_email_one_provider_can_carry_keeps_its_attachments(harness: IngestHarness):
    await harness.set_providers([provider("small", SMALL_CAP), provider("large", 10 * SMALL_CAP)])
    tenant = await harness.new_tenant(large_attachment_policy=tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT)
    attachment = await harness.upload(tenant, ATTACHMENT)
    message = await harness.send(tenant, send_request(attachment_ids=[attachment.id]))
    assert not (await _task(harness, message.id)).attachments_as_links


@pytest.mark.usefixtures("no_providers")
async def test_disabled_providers_and_those_not_carrying_the_class_do_not_count(harness: IngestHarness):
    await harness.set_providers([provider("small", SMALL_CAP), provider("off", 10 * SMALL_CAP, disabled=True),
                                 provider("otp-only", 10 * SMALL_CAP, allowed_classes=("otp",))])
    tenant = await harness.new_tenant()
    attachment = await harness.upload(tenant, ATTACHMENT)
    transactional = await harness.send(tenant, send_request(attachment_ids=[attachment.id]))
    otp = await harness.send(tenant, send_request(attachment_ids=[attachment.id],
                                                  message_class=common_pb2.MESSAGE_CLASS_OTP))
    assert (await _task(harness, transactional.id)).attachments_as_links
    assert not (await _task(harness, otp.id)).attachments_as_links


@pytest.mark.usefixtures("no_providers")
async def test_with_no_provider_known_the_attachments_stay_attached(harness: IngestHarness):
    tenant = await harness.new_tenant(large_attachment_policy=tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT)
    attachment = await harness.upload(tenant, ATTACHMENT)
    message = await harness.send(tenant, send_request(attachment_ids=[attachment.id]))
    assert not (await _task(harness, message.id)).attachments_as_links


# -- the sender's side: links ------------------------------------------------------------------------------------
async def _linked_task(harness: IngestHarness, **body: str) -> tuple[queue_pb2.SendTask, bytes]:
    tenant = await harness.new_tenant()
    payload = os.urandom(5000)
    attachment = await harness.upload(tenant, payload, filename="Q3 report <final>.pdf",
                                      content_type="application/pdf")
    task = queue_pb2.SendTask(message_id="m-1", tenant_id=tenant.id, attachments_as_links=True, **body,
                              attachments=[queue_pb2.AttachmentRef(
                                  attachment_id=attachment.id, s3_key=f"{tenant.id}/{attachment.id}",
                                  filename=attachment.filename, content_type=attachment.content_type,
                                  size_bytes=attachment.size_bytes)])
    return task, payload


async def test_a_link_downloads_the_attachment_under_its_own_name(harness: IngestHarness):
    task, payload = await _linked_task(harness, text_body="Here you go.")
    linked = link_attachments(task, harness.parts.s3, harness.settings.s3_bucket, ttl_s=600)
    assert len(linked.links) == 1 and linked.links[0].url in linked.task.text_body
    async with httpx.AsyncClient() as client:
        response = await client.get(linked.links[0].url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(payload).digest()
    assert response.headers["content-type"] == "application/pdf"
    assert "Q3%20report%20%3Cfinal%3E.pdf" in response.headers["content-disposition"]


async def test_linking_removes_the_attachments_and_appends_the_links_to_both_bodies(harness: IngestHarness):
    task, _ = await _linked_task(harness, text_body="Hello", html_body="<html><body><p>Hello</p></body></html>")
    now = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    linked = link_attachments(task, harness.parts.s3, harness.settings.s3_bucket, ttl_s=3600, now=now)
    assert len(linked.task.attachments) == 0 and linked.task.attachments_as_links
    assert linked.task.text_body.startswith("Hello\n\nAttachments (download links, valid until 2030-01-02 04:04 UTC)")
    assert linked.task.html_body.endswith("</ul></div></body></html>")
    assert "Q3 report &lt;final&gt;.pdf" in linked.task.html_body  # escaped, never markup
    assert linked.expires_at == datetime(2030, 1, 2, 4, 4, tzinfo=UTC)
    assert task.text_body == "Hello" and len(task.attachments) == 1  # the original is untouched


async def test_linking_asks_for_one_attachments_linked_event_per_message(harness: IngestHarness):
    task, _ = await _linked_task(harness, text_body="Hi")
    first = link_attachments(task, harness.parts.s3, harness.settings.s3_bucket)
    again = link_attachments(task, harness.parts.s3, harness.settings.s3_bucket)
    assert first.event_type == messages_pb2.MESSAGE_EVENT_TYPE_ATTACHMENTS_LINKED
    assert first.event_id == again.event_id == "m-1:attachments_linked"
    assert first.event_attributes["attachments"] == "Q3 report <final>.pdf"
    assert "links_expire_at" in first.event_attributes
    assert not any("http" in value for value in first.event_attributes.values())  # URLs grant access: not in events


def test_a_link_lifetime_beyond_seven_days_is_refused():
    with pytest.raises(ValueError):
        link_attachments(queue_pb2.SendTask(), None, "bucket", ttl_s=7 * 86_400 + 1)
