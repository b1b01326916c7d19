"""Attachments: streamed into S3 multipart uploads as bytes arrive, with size and sha256 enforced on the way.

Memory stays bounded whatever the file size: one part being filled plus ``PARTS_IN_FLIGHT`` parts being uploaded;
while those are busy the stream is not read, so gRPC flow control holds the client back.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import mimetypes
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.addresses import has_control
from libs.common.errors import FieldViolation, InvalidArgument, NotFound
from services.ingest.model import StoredAttachment

log = logging.getLogger(__name__)

MAX_ATTACHMENT_BYTES = 150 * 1024 * 1024
"""The largest attachment accepted: "150 MB" read as 150 MiB = 157,286,400 bytes, exactly (one byte more is
refused, while streaming, and its multipart upload aborted)."""
PART_BYTES = 8 * 1024 * 1024
"""S3 multipart part size (S3's minimum is 5 MiB for every part but the last)."""
PARTS_IN_FLIGHT = 2
"""Parts uploading at once: two keep S3 busy while the next part fills; the upload's buffers stay at
(PARTS_IN_FLIGHT + 1) x PART_BYTES whatever the file size."""
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;.*)?$")


@dataclass(frozen=True)
class UploadMetadata:
    """What the client declares in the first frame."""

    filename: str
    content_type: str = ""
    size_bytes: int = 0
    sha256: str = ""
    request_id: str = ""


def _check_metadata(meta: UploadMetadata, max_bytes: int) -> UploadMetadata:
    problems: list[FieldViolation] = []
    if not meta.filename or len(meta.filename) > 255 or has_control(meta.filename) or any(
            c in meta.filename for c in "/\\"):
        problems.append(FieldViolation("metadata.filename", "1 to 255 characters, no path separators, line breaks "
                                       "or control characters", "INVALID_FILENAME"))
    if meta.size_bytes < 0 or meta.size_bytes > max_bytes:
        problems.append(FieldViolation("metadata.size_bytes", f"0 to {max_bytes} bytes",
                                       "ATTACHMENT_TOO_LARGE"))
    if meta.sha256 and not _SHA256_HEX.match(meta.sha256.lower()):
        problems.append(FieldViolation("metadata.sha256", "64 lowercase hex digits"))
    if has_control(meta.content_type):
        problems.append(FieldViolation("metadata.content_type", "line breaks and control characters are not allowed",
                                       "HEADER_INJECTION"))
    elif meta.content_type and not _MEDIA_TYPE.match(meta.content_type):
        problems.append(FieldViolation("metadata.content_type", "not a media type (type/subtype)"))
    if problems:
        raise InvalidArgument("invalid attachment metadata", reason="INVALID_ATTACHMENT", field_violations=problems)
    content_type = meta.content_type or mimetypes.guess_type(meta.filename)[0] or "application/octet-stream"
    return UploadMetadata(meta.filename, content_type, meta.size_bytes, meta.sha256.lower(), meta.request_id)


class AttachmentStore:
    """Attachment rows in Postgres, bytes in S3."""

    def __init__(self, pool: AsyncConnectionPool, s3: Any, bucket: str, *,
                 max_bytes: int = MAX_ATTACHMENT_BYTES) -> None:
        self.pool = pool
        self.s3 = s3
        self.bucket = bucket
        self.max_bytes = max_bytes
        """The largest attachment taken (``MAX_ATTACHMENT_BYTES`` but in tests of the cap itself)."""
        # Parts upload on threads of their own: each thread gets a malloc arena that keeps freed part buffers,
        # so few threads keep the process small (the default executor would spread parts over many).
        self._part_uploader = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        # sha256 runs off the event loop, a part at a time (hashlib releases the GIL on large buffers), so the
        # next part is received while the last one is hashed; each upload hashes its parts in order.
        self._part_hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")

    async def upload(self, tenant_id: str, meta: UploadMetadata, chunks: AsyncIterator[bytes]) -> StoredAttachment:
        """Stream ``chunks`` into S3; refuse (and abort the multipart upload) past the size cap or on a bad hash."""
        meta = _check_metadata(meta, self.max_bytes)
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
            await self._abort_quietly(key, upload_id)
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

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload that will not be completed. The error that made us abort (a refusal, a lost
        client, a failed part) is the one the caller must hear: an abort that fails too (NoSuchUpload when S3
        already dropped it, S3 unreachable) is logged: an upload left incomplete costs storage until a bucket
        lifecycle rule (AbortIncompleteMultipartUpload) clears it, a wrong answer would cost the caller's retry."""
        try:
            await asyncio.shield(asyncio.to_thread(
                self.s3.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id))
        except Exception:
            log.warning("could not abort multipart upload %s of %s", upload_id, key, exc_info=True)

    async def _stream_parts(self, key: str, upload_id: str, meta: UploadMetadata,
                            chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        """Upload ``chunks`` as parts of ``PART_BYTES``; return the size and the sha256 of what was received."""
        loop = asyncio.get_running_loop()
        hasher = hashlib.sha256()
        size = 0
        # Bytes are copied into one part-sized buffer as they arrive (no list of chunks joined later: that join
        # would hold every part twice for a moment). Buffers are reused once their part is uploaded and hashed:
        # a fresh 8 MiB buffer is a fresh mapping whose pages cost more to fault in than the copy itself.
        spare: list[bytearray] = []
        buffer: bytearray | None = None
        filled = 0
        parts: list[dict[str, Any]] = []
        part_count = 0
        uploading: set[asyncio.Task[None]] = set()
        hashing: asyncio.Task[None] | None = None  # the latest part's hashing; each waits for the one before

        async def hash_after(previous: asyncio.Task[None] | None, data: bytearray) -> None:
            if previous is not None:
                await previous
            await loop.run_in_executor(self._part_hasher, hasher.update, data)

        async def put_part(number: int, data: bytearray, hashed: asyncio.Task[None]) -> None:
            result = await loop.run_in_executor(self._part_uploader, functools.partial(
                self.s3.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data))
            parts.append({"PartNumber": number, "ETag": result["ETag"]})
            await hashed
            if len(data) == PART_BYTES:
                spare.append(data)

        async def wait_for_room(limit: int) -> None:
            while len(uploading) > limit:
                done, _ = await asyncio.wait(uploading, return_when=asyncio.FIRST_COMPLETED)
                uploading.difference_update(done)
                for task in done:
                    task.result()  # a failed part fails the upload

        async def flush() -> None:
            nonlocal buffer, filled, part_count, hashing
            # Back-pressure: while the parts in flight are full, stop reading the stream, so gRPC flow control
            # slows the client down instead of the server buffering.
            await wait_for_room(PARTS_IN_FLIGHT - 1)
            if buffer is None:  # an empty upload: one empty part
                data = bytearray()
            else:  # the last part is usually short: it goes as a copy of its own size
                data = buffer if filled == PART_BYTES else buffer[:filled]
            buffer, filled = None, 0
            part_count += 1
            hashing = asyncio.create_task(hash_after(hashing, data))
            uploading.add(asyncio.create_task(put_part(part_count, data, hashing)))

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise InvalidArgument(
                        f"attachment larger than {self.max_bytes} bytes", reason="ATTACHMENT_TOO_LARGE",
                        metadata={"max_bytes": str(self.max_bytes)},
                        field_violations=[FieldViolation("chunk", f"more than {self.max_bytes} bytes",
                                                         "ATTACHMENT_TOO_LARGE")])
                view = memoryview(chunk)
                while view:
                    if buffer is None:
                        buffer = spare.pop() if spare else bytearray(PART_BYTES)
                    taken = min(len(view), PART_BYTES - filled)
                    buffer[filled:filled + taken] = view[:taken]
                    filled += taken
                    view = view[taken:]
                    if filled == PART_BYTES:
                        await flush()
            if filled or part_count == 0:
                await flush()
            await wait_for_room(0)
        except BaseException:
            if hashing is not None:
                hashing.cancel()
            # The parts in flight finish before the caller aborts the upload (their threads cannot be stopped
            # anyway): S3 may keep a part that completes after the abort, and an abort racing a part's write can
            # itself fail. At most PARTS_IN_FLIGHT parts, so the refusal waits for a few MiB at most.
            await asyncio.gather(*uploading, return_exceptions=True)
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
        """The tenant's attachments, in the order asked; NOT_FOUND naming every id that is unknown (or another
        tenant's: the two are indistinguishable)."""
        if not attachment_ids:
            return []
        ids = [a.removeprefix("attachments/") for a in attachment_ids]
        found = await self._select("tenant_id = %s AND id = ANY(%s) AND deleted_at IS NULL", (tenant_id, ids))
        require_known(found, attachment_ids)
        by_id = {a.id: a for a in found}
        return [by_id[i] for i in ids]

    async def delete(self, tenant_id: str, attachment_id: str) -> None:
        """Mark the tenant's attachment deleted (its id then answers NOT_FOUND); NOT_FOUND when it is unknown or another
        tenant's."""
        stored = await self.get(tenant_id, attachment_id)
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE ingest.attachments SET deleted_at = now() WHERE id = %s", (stored.id,))


def require_known(found: list[StoredAttachment], wanted: Sequence[str]) -> None:
    """Every wanted attachment id must be among ``found`` (the tenant's own), else NOT_FOUND with a field
    violation per missing id."""
    known = {a.id for a in found}
    missing = [(i, a) for i, a in enumerate(wanted) if a.removeprefix("attachments/") not in known]
    if missing:
        raise NotFound(
            f"attachment(s) not found: {', '.join(a for _, a in missing)}", reason="ATTACHMENT_NOT_FOUND",
            metadata={"attachment_ids": ",".join(a for _, a in missing)},
            field_violations=[FieldViolation(f"attachment_ids[{i}]", f"no attachment {a!r}", "ATTACHMENT_NOT_FOUND")
                              for i, a in missing])
