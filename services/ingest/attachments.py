"""Attachments: streamed into S3 multipart uploads as bytes arrive, with size and sha256 enforced on the way.

Memory stays bounded whatever the file size: at most one part being filled plus one part being uploaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import FieldViolation, InvalidArgument, NotFound
from services.ingest.accept import require_known
from services.ingest.model import StoredAttachment

MAX_ATTACHMENT_BYTES = 150 * 1024 * 1024
"""150 MiB, the largest attachment accepted."""
PART_BYTES = 8 * 1024 * 1024
"""S3 multipart part size (S3's minimum is 5 MiB for every part but the last)."""
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UploadMetadata:
    """What the client declares in the first frame."""

    filename: str
    content_type: str = ""
    size_bytes: int = 0
    sha256: str = ""
    request_id: str = ""


def _check_metadata(meta: UploadMetadata) -> UploadMetadata:
    problems: list[FieldViolation] = []
    if not meta.filename or len(meta.filename) > 255 or any(c in meta.filename for c in "\r\n\0/\\"):
        problems.append(FieldViolation("metadata.filename", "1 to 255 characters, no path separators or CR/LF/NUL"))
    if meta.size_bytes < 0 or meta.size_bytes > MAX_ATTACHMENT_BYTES:
        problems.append(FieldViolation("metadata.size_bytes", f"0 to {MAX_ATTACHMENT_BYTES} bytes",
                                       "ATTACHMENT_TOO_LARGE"))
    if meta.sha256 and not _SHA256_HEX.match(meta.sha256.lower()):
        problems.append(FieldViolation("metadata.sha256", "64 lowercase hex digits"))
    if any(c in meta.content_type for c in "\r\n\0"):
        problems.append(FieldViolation("metadata.content_type", "CR/LF/NUL are not allowed", "HEADER_INJECTION"))
    if problems:
        raise InvalidArgument("invalid attachment metadata", reason="INVALID_ATTACHMENT", field_violations=problems)
    content_type = meta.content_type or mimetypes.guess_type(meta.filename)[0] or "application/octet-stream"
    return UploadMetadata(meta.filename, content_type, meta.size_bytes, meta.sha256.lower(), meta.request_id)


class AttachmentStore:
    """Attachment rows in Postgres, bytes in S3."""

    def __init__(self, pool: AsyncConnectionPool, s3: Any, bucket: str) -> None:
        self.pool = pool
        self.s3 = s3
        self.bucket = bucket

    async def upload(self, tenant_id: str, meta: UploadMetadata, chunks: AsyncIterator[bytes]) -> StoredAttachment:
        """Stream ``chunks`` into S3; refuse (and abort the multipart upload) past the size cap or on a bad hash."""
        meta = _check_metadata(meta)
        if meta.request_id:
            earlier = await self._by_request_id(tenant_id, meta.request_id)
            if earlier is not None:
                async for _ in chunks:  # drain: the client is retrying an upload that already succeeded
                    pass
                return earlier
        attachment_id = secrets.token_hex(12)
        key = f"{tenant_id}/{attachment_id}"
        created = await asyncio.to_thread(
            self.s3.create_multipart_upload, Bucket=self.bucket, Key=key, ContentType=meta.content_type)
        upload_id = created["UploadId"]
        try:
            size, digest = await self._stream_parts(key, upload_id, meta, chunks)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(
                self.s3.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id))
            raise
        stored = StoredAttachment(attachment_id, tenant_id, meta.filename, meta.content_type, size, digest, key)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """INSERT INTO ingest.attachments (id, tenant_id, request_id, filename, content_type, size_bytes,
                       sha256, s3_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id""",
                (attachment_id, tenant_id, meta.request_id or None, meta.filename, meta.content_type, size, digest,
                 key),
            )
            inserted = await cur.fetchone()
        if inserted is None:  # a concurrent upload with the same request_id won
            await asyncio.to_thread(self.s3.delete_object, Bucket=self.bucket, Key=key)
            earlier = await self._by_request_id(tenant_id, meta.request_id)
            assert earlier is not None
            return earlier
        return stored

    async def _stream_parts(self, key: str, upload_id: str, meta: UploadMetadata,
                            chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        hasher = hashlib.sha256()
        size = 0
        parts: list[dict[str, Any]] = []
        buffer = bytearray()
        in_flight: asyncio.Task[None] | None = None

        async def put_part(number: int, data: bytes) -> None:
            result = await asyncio.to_thread(self.s3.upload_part, Bucket=self.bucket, Key=key,
                                             UploadId=upload_id, PartNumber=number, Body=data)
            parts.append({"PartNumber": number, "ETag": result["ETag"]})

        part_number = 0

        async def flush() -> None:
            nonlocal in_flight, buffer, part_number
            if in_flight is not None:
                await in_flight  # at most one part uploading while the next one fills
            part_number += 1
            data = bytes(buffer)
            buffer = bytearray()
            in_flight = asyncio.create_task(put_part(part_number, data))

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_ATTACHMENT_BYTES:
                    raise InvalidArgument(
                        f"attachment larger than {MAX_ATTACHMENT_BYTES} bytes", reason="ATTACHMENT_TOO_LARGE",
                        metadata={"max_bytes": str(MAX_ATTACHMENT_BYTES)},
                        field_violations=[FieldViolation("chunk", f"more than {MAX_ATTACHMENT_BYTES} bytes",
                                                         "ATTACHMENT_TOO_LARGE")])
                hasher.update(chunk)
                buffer += chunk
                if len(buffer) >= PART_BYTES:
                    await flush()
            if buffer or part_number == 0:
                await flush()
            if in_flight is not None:
                await in_flight
        except BaseException:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
            raise
        digest = hasher.hexdigest()
        if meta.size_bytes and size != meta.size_bytes:
            raise InvalidArgument(f"declared {meta.size_bytes} bytes, received {size}", reason="SIZE_MISMATCH",
                                  field_violations=[FieldViolation("metadata.size_bytes", "does not match")])
        if meta.sha256 and digest != meta.sha256:
            raise InvalidArgument("sha256 of the received bytes does not match", reason="CHECKSUM_MISMATCH",
                                  metadata={"received_sha256": digest},
                                  field_violations=[FieldViolation("metadata.sha256", "does not match")])
        parts.sort(key=lambda p: p["PartNumber"])
        await asyncio.to_thread(self.s3.complete_multipart_upload, Bucket=self.bucket, Key=key,
                                UploadId=upload_id, MultipartUpload={"Parts": parts})
        return size, digest

    async def _by_request_id(self, tenant_id: str, request_id: str) -> StoredAttachment | None:
        found = await self._select("tenant_id = %s AND request_id = %s AND deleted_at IS NULL",
                                   (tenant_id, request_id))
        return found[0] if found else None

    async def _select(self, where: str, args: tuple[object, ...]) -> list[StoredAttachment]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT id, tenant_id, filename, content_type, size_bytes, sha256, s3_key
                    FROM ingest.attachments WHERE {where}""", args)
            return [StoredAttachment(**row) for row in await cur.fetchall()]

    async def get(self, tenant_id: str, attachment_id: str) -> StoredAttachment:
        """One attachment of this tenant; another tenant's is NOT_FOUND, as if it did not exist."""
        found = await self._select("tenant_id = %s AND id = %s AND deleted_at IS NULL", (tenant_id, attachment_id))
        if not found:
            raise NotFound(f"attachment {attachment_id!r} not found", reason="ATTACHMENT_NOT_FOUND")
        return found[0]

    async def get_many(self, tenant_id: str, attachment_ids: Sequence[str]) -> list[StoredAttachment]:
        if not attachment_ids:
            return []
        ids = [a.removeprefix("attachments/") for a in attachment_ids]
        found = await self._select("tenant_id = %s AND id = ANY(%s) AND deleted_at IS NULL", (tenant_id, ids))
        require_known(found, attachment_ids)
        by_id = {a.id: a for a in found}
        return [by_id[i] for i in ids]

    async def delete(self, tenant_id: str, attachment_id: str) -> None:
        stored = await self.get(tenant_id, attachment_id)
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE ingest.attachments SET deleted_at = now() WHERE id = %s", (stored.id,))
