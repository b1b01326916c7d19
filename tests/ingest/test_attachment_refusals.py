"""A refused upload is answered with its refusal even when aborting its S3 multipart upload fails too.

The abort fails for real: the S3 client ingest uses is the session's real one, except that the upload is aborted
once just before ingest aborts it (as a bucket lifecycle rule or a second replica's clean-up might), so ingest's
own abort gets a real ``NoSuchUpload`` from the S3 server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import botocore.exceptions
import grpc
import pytest
from esp.v1 import attachments_pb2

from libs.common.errors import InvalidArgument
from services.ingest.attachments import AttachmentStore, UploadMetadata
from tests.ingest.conftest import IngestHarness, TenantHandle, refused


class AbortedBeforeUs:
    """The real S3 client, except that every multipart upload is aborted once before the caller's own abort runs,
    which therefore fails with the server's ``NoSuchUpload``."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.aborts_refused: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        self._s3.abort_multipart_upload(**kwargs)
        try:
            return self._s3.abort_multipart_upload(**kwargs)
        except botocore.exceptions.ClientError as exc:
            self.aborts_refused.append(exc.response["Error"]["Code"])
            raise


@pytest.fixture
def aborted_before_us(harness: IngestHarness, monkeypatch: pytest.MonkeyPatch) -> AbortedBeforeUs:
    """Ingest's attachment store talks to S3 through :class:`AbortedBeforeUs` during the test."""
    s3 = AbortedBeforeUs(harness.parts.attachments.s3)
    monkeypatch.setattr(harness.parts.attachments, "s3", s3)
    return s3


async def _left_in_s3(harness: IngestHarness, tenant: TenantHandle) -> tuple[list[Any], list[Any]]:
    """The multipart uploads and the objects S3 holds under the tenant's prefix."""
    s3, bucket = harness.parts.s3, harness.settings.s3_bucket
    uploads = await asyncio.to_thread(s3.list_multipart_uploads, Bucket=bucket, Prefix=f"{tenant.id}/")
    objects = await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket, Prefix=f"{tenant.id}/")
    return uploads.get("Uploads", []), objects.get("Contents", [])


async def test_a_checksum_mismatch_is_refused_as_such_when_the_abort_finds_no_upload(
        harness: IngestHarness, aborted_before_us: AbortedBeforeUs):
    tenant = await harness.new_tenant(credits=0)
    payload = os.urandom(300_000)
    failed = await refused(harness.upload(tenant, payload, sha256=hashlib.sha256(b"other bytes").hexdigest()))
    assert aborted_before_us.aborts_refused == ["NoSuchUpload"]  # the abort did fail, for real
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.info.reason == "CHECKSUM_MISMATCH"
    assert failed.fields == ["metadata.sha256"]
    assert await _left_in_s3(harness, tenant) == ([], [])


async def test_fewer_bytes_than_declared_are_refused_as_such_when_the_abort_finds_no_upload(
        harness: IngestHarness, aborted_before_us: AbortedBeforeUs):
    tenant = await harness.new_tenant(credits=0)
    frames = [attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
        filename="short.bin", size_bytes=1000)), attachments_pb2.UploadAttachmentRequest(chunk=b"x" * 10)]

    async def stream() -> Any:
        for frame in frames:
            yield frame

    failed = await refused(harness.attachments.UploadAttachment(stream(), metadata=tenant.auth, timeout=30))
    assert aborted_before_us.aborts_refused == ["NoSuchUpload"]
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.info.reason == "SIZE_MISMATCH"


async def test_bytes_past_the_cap_are_refused_while_streaming_when_the_abort_finds_no_upload(
        harness: IngestHarness):
    # The cap's own path (refused while parts are still uploading), on a store with a small cap so that no test
    # streams 150 MiB: the gRPC status follows from the InvalidArgument it raises.
    s3 = AbortedBeforeUs(harness.parts.s3)
    store = AttachmentStore(harness.parts.pool, s3, harness.settings.s3_bucket, max_bytes=20 * 1024 * 1024)
    tenant = await harness.new_tenant(credits=0)

    async def chunks() -> Any:
        block = os.urandom(1024 * 1024)
        for _ in range(20):  # the cap exactly, then one byte more
            yield block
        yield b"!"

    with pytest.raises(InvalidArgument) as caught:
        await store.upload(tenant.id, UploadMetadata("too-big.bin"), chunks())
    assert s3.aborts_refused == ["NoSuchUpload"]
    assert caught.value.reason == "ATTACHMENT_TOO_LARGE"
    assert caught.value.metadata == {"max_bytes": str(20 * 1024 * 1024)}
    assert await _left_in_s3(harness, tenant) == ([], [])
