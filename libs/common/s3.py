"""S3 client factory (boto3) for attachments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import boto3
from botocore.config import Config

__all__ = [
    "create_s3_client",
    "ensure_bucket",
    "stream_object",
]


def create_s3_client(endpoint: str, region: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client; ``endpoint`` empty means AWS itself."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id=access_key or None,
        aws_secret_access_key=secret_key or None,
        config=Config(
            # Over plain http botocore would sha256 every part to sign it (and, since 1.36, CRC32 it as well):
            # ~11 ms of CPU per 8 MiB part, the largest cost of an upload on our side. Over https (production)
            # it signs no payload by default either; TLS protects the bytes in flight, and ingest checks the
            # attachment's own sha256 as it streams through.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            # SigV4 for pre-signed URLs as well (botocore would otherwise presign with SigV2 query auth, which AWS
            # no longer accepts in newer regions and S3-compatible servers often refuse).
            signature_version="s3v4",
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32),
    )

    # Skip "Expect: 100-continue": every part would wait a round trip for the server's go-ahead.
    def _drop_expect(request: Any, **_: Any) -> None:
        request.headers.pop("Expect", None)

    client.meta.events.register_first("before-send.s3.*", _drop_expect)
    return client


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` if it does not exist."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


async def stream_object(client: Any, bucket: str, key: str, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """The object's bytes, a chunk at a time (boto3 is blocking: each read runs in a worker thread)."""
    response = await asyncio.to_thread(client.get_object, Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        while True:
            chunk = await asyncio.to_thread(body.read, chunk_bytes)
            if not chunk:
                return
            yield chunk
    finally:
        body.close()
