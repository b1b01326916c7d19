"""Tenant isolation: a key never sees or uses another tenant's keys, messages, events or attachments — they
look absent (NOT_FOUND), never forbidden, so their existence does not leak."""

from __future__ import annotations

import asyncio

import grpc
from esp.v1 import attachments_pb2, messages_pb2, tenants_pb2

from tests.ingest.conftest import IngestHarness, TenantHandle, refused, send_request


async def _readable(harness: IngestHarness, tenant: TenantHandle, name: str) -> messages_pb2.Message:
    """The message once the status store has it (its ACCEPTED event travels through JetStream)."""
    for _ in range(300):
        try:
            return await harness.messages.GetMessage(messages_pb2.GetMessageRequest(name=name), metadata=tenant.auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became readable by its own tenant")


async def test_another_tenants_message_is_not_found(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    message = await harness.send(owner, send_request())
    await _readable(harness, owner, message.name)
    failed = await refused(harness.messages.GetMessage(messages_pb2.GetMessageRequest(name=message.name),
                                                       metadata=stranger.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND


async def test_another_tenants_message_events_are_not_found(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    message = await harness.send(owner, send_request())
    await _readable(harness, owner, message.name)
    failed = await refused(harness.messages.ListMessageEvents(
        messages_pb2.ListMessageEventsRequest(parent=message.name), metadata=stranger.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND


async def test_listing_messages_shows_only_the_callers_own(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    message = await harness.send(owner, send_request())
    await _readable(harness, owner, message.name)
    listed = await harness.messages.ListMessages(messages_pb2.ListMessagesRequest(), metadata=stranger.auth)
    assert message.id not in [m.id for m in listed.messages]


async def test_another_tenants_attachment_is_not_found(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    attachment = await harness.upload(owner, b"private bytes")
    failed = await refused(harness.attachments.GetAttachment(
        attachments_pb2.GetAttachmentRequest(name=attachment.name), metadata=stranger.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND
    failed = await refused(harness.attachments.DeleteAttachment(
        attachments_pb2.DeleteAttachmentRequest(name=attachment.name), metadata=stranger.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND
    still_there = await harness.attachments.GetAttachment(attachments_pb2.GetAttachmentRequest(name=attachment.name),
                                                          metadata=owner.auth)
    assert still_there.id == attachment.id


async def test_sending_another_tenants_attachment_fails_exactly_like_an_unknown_id(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(), await harness.new_tenant()
    attachment = await harness.upload(owner, b"private bytes")
    foreign = await refused(harness.messages.SendEmail(send_request(attachment_ids=[attachment.id]),
                                                       metadata=stranger.auth))
    unknown = await refused(harness.messages.SendEmail(send_request(attachment_ids=["0" * 24]),
                                                       metadata=stranger.auth))
    assert foreign.code == unknown.code == grpc.StatusCode.NOT_FOUND
    assert foreign.info.reason == unknown.info.reason == "ATTACHMENT_NOT_FOUND"
    assert foreign.fields == unknown.fields == ["attachment_ids[0]"]
    assert await harness.message_rows(stranger) == 0


async def test_another_tenants_keys_cannot_be_listed_or_revoked(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(credits=0), await harness.new_tenant(credits=0)
    owner_key_id = owner.key.split("_")[2]
    listing = await refused(harness.tenants.ListApiKeys(tenants_pb2.ListApiKeysRequest(parent=owner.name),
                                                        metadata=stranger.auth))
    assert listing.code == grpc.StatusCode.NOT_FOUND
    revoking = await refused(harness.tenants.RevokeApiKey(tenants_pb2.RevokeApiKeyRequest(
        name=f"{owner.name}/apiKeys/{owner_key_id}"), metadata=stranger.auth))
    assert revoking.code == grpc.StatusCode.NOT_FOUND
    # Naming the other tenant's key under one's own tenant does not reach it either.
    smuggled = await refused(harness.tenants.RevokeApiKey(tenants_pb2.RevokeApiKeyRequest(
        name=f"{stranger.name}/apiKeys/{owner_key_id}"), metadata=stranger.auth))
    assert smuggled.code == grpc.StatusCode.NOT_FOUND
    listed = await harness.tenants.ListApiKeys(tenants_pb2.ListApiKeysRequest(parent=owner.name),
                                               metadata=owner.auth)
    assert not any(k.revoked for k in listed.api_keys)


async def test_another_tenant_is_not_found(harness: IngestHarness):
    owner, stranger = await harness.new_tenant(credits=0), await harness.new_tenant(credits=0)
    failed = await refused(harness.tenants.GetTenant(tenants_pb2.GetTenantRequest(name=owner.name),
                                                     metadata=stranger.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND
