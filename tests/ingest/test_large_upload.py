"""150 MB attachments, end to end against a separate ingest process: exactly 150 MiB (157,286,400 bytes) is
accepted and its S3 object matches the client's sha256; one byte more is refused while streaming and its
multipart upload aborted; the server's memory stays bounded meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from esp.v1 import attachments_pb2, attachments_pb2_grpc

from dev import mesh as m
from libs.common.s3 import stream_object
from services.ingest.attachments import MAX_ATTACHMENT_BYTES
from tests.ingest.conftest import IngestHarness, TenantHandle, failure

MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * MIB
"""The target: the ingest process grows by at most this much while taking a 150 MiB upload."""


def generated_chunks(size: int, chunk: int = MIB) -> Iterator[bytes]:
    """``size`` pseudo-random bytes, a chunk at a time (never all in memory); the same on every call."""
    block = hashlib.shake_256(b"esp attachment").digest(chunk)
    for offset in range(0, size, chunk):
        # Each chunk differs (its index up front), so a lost, repeated or reordered part changes the checksum.
        n = min(chunk, size - offset)
        yield ((offset // chunk).to_bytes(8, "big") + block[8:])[:n]


def sha256_of(size: int) -> str:
    hasher = hashlib.sha256()
    for piece in generated_chunks(size):
        hasher.update(piece)
    return hasher.hexdigest()


async def frames(metadata: attachments_pb2.AttachmentMetadata,
                 size: int) -> AsyncIterator[attachments_pb2.UploadAttachmentRequest]:
    yield attachments_pb2.UploadAttachmentRequest(metadata=metadata)
    for piece in generated_chunks(size):
        yield attachments_pb2.UploadAttachmentRequest(chunk=piece)


def status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset the process' VmHWM (its peak RSS) to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def ingest_process(harness: IngestHarness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[m.Process]:
    """The ingest service as its own process (its memory is measured), sharing the harness' databases."""
    settings = harness.settings
    config = m.MeshConfig(
        postgres_dsn=settings.postgres_dsn, redis_url=settings.redis_url, nats_url=settings.nats_url,
        s3_endpoint=settings.s3_endpoint, namespace=settings.namespace, admin_token=settings.admin_token,
        ports={name: m.free_port() for name in m.GRPC_PORTS}, log_dir=tmp_path_factory.mktemp("ingest-process"),
        services=("ingest",), extra_env={"ESP_S3_BUCKET": settings.s3_bucket, "ESP_LOG_FORMAT": "text"})
    mesh = m.Mesh(config)
    process = mesh.start_service("ingest")
    process.port = config.ports["ingest"]  # type: ignore[attr-defined]
    yield process
    mesh.stop()


async def _upload(port: int, tenant: TenantHandle, metadata: attachments_pb2.AttachmentMetadata,
                  size: int) -> attachments_pb2.Attachment:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await attachments_pb2_grpc.AttachmentServiceStub(channel).UploadAttachment(
            frames(metadata, size), metadata=tenant.auth, timeout=300)


async def test_a_150_mib_upload_streams_into_s3_intact_with_bounded_server_memory(harness: IngestHarness,
                                                                                  ingest_process: m.Process):
    tenant = await harness.new_tenant(credits=0)
    pid = ingest_process.popen.pid
    port = ingest_process.port  # type: ignore[attr-defined]
    expected = await asyncio.to_thread(sha256_of, MAX_ATTACHMENT_BYTES)
    # Warm up (first-use allocations: boto3, thread pool), then measure the peak from here on.
    await _upload(port, tenant, attachments_pb2.AttachmentMetadata(filename="warm.bin"), 20 * MIB)
    reset_peak(pid)
    baseline = status_kib(pid, "VmRSS")

    attachment = await _upload(port, tenant, attachments_pb2.AttachmentMetadata(
        filename="archive.tar", content_type="application/x-tar", sha256=expected), MAX_ATTACHMENT_BYTES)

    growth = status_kib(pid, "VmHWM") - baseline
    assert attachment.size_bytes == MAX_ATTACHMENT_BYTES == 157_286_400
    assert attachment.sha256 == expected
    assert attachment.content_type == "application/x-tar"
    hasher, received = hashlib.sha256(), 0
    async for piece in stream_object(harness.parts.s3, harness.settings.s3_bucket, f"{tenant.id}/{attachment.id}",
                                     chunk_bytes=4 * MIB):
        hasher.update(piece)
        received += len(piece)
    assert (received, hasher.hexdigest()) == (MAX_ATTACHMENT_BYTES, expected)
    assert growth <= RSS_GROWTH_LIMIT, f"ingest grew by {growth / MIB:.1f} MiB"


async def test_one_byte_over_150_mib_is_refused_while_streaming_and_the_multipart_upload_aborted(
        harness: IngestHarness, ingest_process: m.Process):
    tenant = await harness.new_tenant(credits=0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # No declared size: only counting the bytes as they arrive can catch it.
        await _upload(ingest_process.port, tenant,  # type: ignore[attr-defined]
                      attachments_pb2.AttachmentMetadata(filename="too-big.bin"), MAX_ATTACHMENT_BYTES + 1)
    refused = failure(caught.value)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.info.reason == "ATTACHMENT_TOO_LARGE"
    s3, bucket = harness.parts.s3, harness.settings.s3_bucket
    uploads = await asyncio.to_thread(s3.list_multipart_uploads, Bucket=bucket, Prefix=f"{tenant.id}/")
    objects = await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket, Prefix=f"{tenant.id}/")
    assert uploads.get("Uploads", []) == []
    assert objects.get("Contents", []) == []



