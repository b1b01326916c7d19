"""Attachments: client-streamed into S3 multipart uploads, checked (size, sha256, metadata) on the way, usable
by id in sends — several per email."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import attachments_pb2

from tests.ingest.conftest import IngestHarness, TenantHandle, _frames, count_passes, refused, send_request


async def _s3(harness: IngestHarness, method: str, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(harness.parts.s3, method), Bucket=harness.settings.s3_bucket, **kwargs)


async def _leftovers(harness: IngestHarness, tenant: TenantHandle) -> tuple[list[Any], list[Any], int]:
    """Unfinished multipart uploads, objects and attachment rows the tenant has."""
    uploads = (await _s3(harness, "list_multipart_uploads", Prefix=f"{tenant.id}/")).get("Uploads", [])
    objects = (await _s3(harness, "list_objects_v2", Prefix=f"{tenant.id}/")).get("Contents", [])
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM ingest.attachments WHERE tenant_id = %s", (tenant.id,))
        row = await cur.fetchone()
    return uploads, objects, int(row[0]) if row else 0


async def test_an_upload_is_stored_in_s3_with_its_size_checksum_and_content_type(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    payload = b"%PDF-1.7 " + bytes(range(256)) * 5000
    digest = hashlib.sha256(payload).hexdigest()
    attachment = await harness.upload(tenant, payload, filename="invoice.pdf", content_type="application/pdf",
                                      sha256=digest)
    assert (attachment.filename, attachment.size_bytes, attachment.sha256) == ("invoice.pdf", len(payload), digest)
    assert attachment.content_type == "application/pdf"
    stored = await _s3(harness, "get_object", Key=f"{tenant.id}/{attachment.id}")
    assert stored["Body"].read() == payload
    assert stored["ContentType"] == "application/pdf"


async def test_the_content_type_is_guessed_from_the_filename_when_not_given(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    attachment = await harness.upload(tenant, b"a,b\n1,2\n", filename="report.csv")
    assert attachment.content_type == "text/csv"


async def test_a_checksum_mismatch_is_refused_and_leaves_nothing_behind(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.attachments.UploadAttachment(_frames([
        attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="a.bin", sha256=hashlib.sha256(b"something else").hexdigest())),
        attachments_pb2.UploadAttachmentRequest(chunk=b"the real bytes")]), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.info.reason == "CHECKSUM_MISMATCH"
    assert failed.info.metadata["received_sha256"] == hashlib.sha256(b"the real bytes").hexdigest()
    assert await _leftovers(harness, tenant) == ([], [], 0)


async def test_a_declared_size_over_the_cap_is_refused_before_any_byte_is_stored(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.attachments.UploadAttachment(_frames([
        attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="huge.bin", size_bytes=150 * 1024 * 1024 + 1))]), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.violation("metadata.size_bytes").reason == "ATTACHMENT_TOO_LARGE"
    assert await _leftovers(harness, tenant) == ([], [], 0)


async def test_fewer_bytes_than_declared_are_refused(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.attachments.UploadAttachment(_frames([
        attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="short.bin", size_bytes=100)),
        attachments_pb2.UploadAttachmentRequest(chunk=b"x" * 99)]), metadata=tenant.auth))
    assert failed.info.reason == "SIZE_MISMATCH"
    assert await _leftovers(harness, tenant) == ([], [], 0)


async def test_the_first_frame_must_be_the_metadata(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.attachments.UploadAttachment(_frames([
        attachments_pb2.UploadAttachmentRequest(chunk=b"bytes first")]), metadata=tenant.auth))
    assert failed.info.reason == "METADATA_FIRST"


async def test_a_filename_or_content_type_with_a_line_break_is_refused(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.attachments.UploadAttachment(_frames([
        attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="a\r\nb.txt", content_type="text/plain\r\nX-Evil: 1")),
        attachments_pb2.UploadAttachmentRequest(chunk=b"x")]), metadata=tenant.auth))
    assert sorted(failed.fields) == ["metadata.content_type", "metadata.filename"]


async def test_a_retried_upload_with_the_same_request_id_returns_the_first_attachment(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    first = await harness.upload(tenant, b"once", request_id="upload-1")
    again = await harness.upload(tenant, b"once", request_id="upload-1")
    assert again.id == first.id
    assert len((await _leftovers(harness, tenant))[1]) == 1


async def test_an_email_carries_several_attachments_in_the_order_given(harness: IngestHarness):
    tenant = await harness.new_tenant()
    ids = [(await harness.upload(tenant, f"file {i}".encode(), filename=f"f{i}.txt")).id for i in range(3)]
    message = await harness.send(tenant, send_request(attachment_ids=[ids[2], ids[0], ids[1]]))
    assert list(message.attachment_ids) == [ids[2], ids[0], ids[1]]
    async with harness.parts.pool.connection() as conn:
        cur = await conn.execute("SELECT task FROM ingest.messages WHERE id = %s", (message.id,))
        row = await cur.fetchone()
    assert row is not None
    task = queue_pb2.SendTask.FromString(bytes(row[0]))
    assert [(a.attachment_id, a.filename, a.size_bytes) for a in task.attachments] == [
        (ids[2], "f2.txt", 6), (ids[0], "f0.txt", 6), (ids[1], "f1.txt", 6)]
    assert all(a.s3_key == f"{tenant.id}/{a.attachment_id}" for a in task.attachments)
    assert not task.attachments_as_links


async def test_concurrent_sends_with_attachments_share_passes_and_are_charged_for_the_attachments(
        harness: IngestHarness, monkeypatch: pytest.MonkeyPatch):
    # A single send with attachments is a batch of one like any other: it joins its tenant and class's pool.
    tenant = await harness.new_tenant()
    attachment = await harness.upload(tenant, b"attached")
    plain = await harness.send(tenant, send_request(subject="plain"))
    passes = count_passes(harness.parts.acceptor, monkeypatch)
    sent = await asyncio.gather(*(harness.send(tenant, send_request(
        subject=f"s{i}", attachment_ids=[attachment.id], request_id=f"r{i}" if i % 2 else "")) for i in range(10)))
    assert sum(passes) == 10 and len(passes) < 10
    assert all(list(m.attachment_ids) == [attachment.id] for m in sent)
    assert len({m.credits for m in sent}) == 1 and sent[0].credits > plain.credits  # the attachment's price too
    assert (await harness.balance(tenant)).held == plain.credits + sum(m.credits for m in sent)


async def test_a_deleted_attachment_can_no_longer_be_sent(harness: IngestHarness):
    tenant = await harness.new_tenant()
    attachment = await harness.upload(tenant, b"gone soon")
    await harness.attachments.DeleteAttachment(attachments_pb2.DeleteAttachmentRequest(name=attachment.name),
                                               metadata=tenant.auth)
    failed = await refused(harness.messages.SendEmail(send_request(attachment_ids=[attachment.id]),
                                                      metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.NOT_FOUND
    assert failed.fields == ["attachment_ids[0]"]
