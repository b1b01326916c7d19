"""Accepted emails in Postgres: the message row and its outbox rows, committed together, many emails per
transaction (group commit).

After the commit the outbox rows go to ``on_commit`` (the publisher) to be published at once.

One transaction per email caps Postgres at a few thousand emails a second; concurrent accepts therefore queue
here and each free worker commits everything queued so far in one transaction of two statements. The unique key
``(tenant_id, request_id)`` is the truth of idempotency: a row that loses against it is reported as a conflict
and its outbox rows are not written.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from psycopg_pool import AsyncConnectionPool

from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.db import autocommit
from libs.common.outbox import CommittedRow, OutboxRow
from services.ingest.model import URGENT_CLASSES
from services.ingest.payloads import message_resource


@dataclass(frozen=True)
class NewMessage:
    """One accepted email, ready to commit."""

    id: uuid.UUID
    tenant_id: str
    request_id: str
    fingerprint: bytes
    message_class: str
    task: bytes
    credits: int
    created_at: datetime
    outbox: tuple[OutboxRow, ...]


@dataclass(frozen=True)
class StoredMessage:
    """A message as committed: enough to answer a repeated request exactly as the first time."""

    fingerprint: bytes
    message: messages_pb2.Message


class MessageStore:
    """Group-committed inserts and the lookups idempotency needs."""

    def __init__(self, pool: AsyncConnectionPool, *, batch_size: int = 500, workers: int = 2,
                 batch_interval_s: float = 0.0,
                 on_commit: Callable[[list[CommittedRow], bool], None] | None = None) -> None:
        self.pool = pool
        self.on_commit = on_commit
        """Receives the outbox rows of every commit (the publisher, which sends them at once), and whether they
        are urgent (the commit was of OTPs only)."""
        self._batcher: GroupCommitter[NewMessage, bool] = GroupCommitter(
            self._commit, BatchingOptions(max_batch_size=batch_size, workers=workers, shards=1,
                                          min_interval_s=batch_interval_s),
            urgent=lambda message: message.message_class in URGENT_CLASSES, name="ingest-postgres")

    async def insert_many(self, messages: Sequence[NewMessage]) -> list[bool | Exception]:
        """Commit each message and its outbox rows (in one submission): each one's answer — False (and nothing
        written) when its request_id is taken — or the error that failed it."""
        return await self._batcher.submit_many(messages)

    async def _commit(self, batch: Sequence[NewMessage]) -> list[bool]:
        # One statement (messages, then the outbox rows of the messages that were inserted), run in autocommit:
        # atomic, and one round trip to Postgres for the whole batch. Arrays go in binary (%b): bytea in text
        # arrays would be hex-escaped, twice the size and far slower to encode.
        rows = [(m.id, r) for m in batch for r in m.outbox]
        async with autocommit(self.pool) as conn:
            cur = await conn.execute(
                """WITH new AS (
                       INSERT INTO ingest.messages (id, tenant_id, request_id, request_sha256, message_class, task,
                           credits, created_at)
                       SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::bytea[], %b::text[], %b::bytea[],
                                            %b::bigint[], %b::timestamptz[])
                       ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
                       RETURNING id),
                   queued AS (
                       INSERT INTO ingest.outbox (subject, msg_id, payload)
                       SELECT o.subject, o.msg_id, o.payload
                       FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::bytea[]) AS o(message, subject, msg_id,
                                                                                         payload)
                       WHERE o.message IN (SELECT id FROM new)
                       RETURNING id, msg_id)
                   SELECT NULL::bigint, id::text FROM new UNION ALL SELECT id, msg_id FROM queued""",
                ([m.id for m in batch], [m.tenant_id for m in batch], [m.request_id or None for m in batch],
                 [m.fingerprint for m in batch], [m.message_class for m in batch], [m.task for m in batch],
                 [m.credits for m in batch], [m.created_at for m in batch],
                 [message for message, _ in rows], [r.subject for _, r in rows], [r.msg_id for _, r in rows],
                 [r.payload for _, r in rows]),
            )
            result = await cur.fetchall()
        inserted = {uuid.UUID(key) for row_id, key in result if row_id is None}
        outbox_ids = {key: row_id for row_id, key in result if row_id is not None}
        committed = [CommittedRow(outbox_ids[r.msg_id], r) for message, r in rows if message in inserted]
        if committed and self.on_commit is not None:
            self.on_commit(committed, all(m.message_class in URGENT_CLASSES for m in batch))
        return [m.id in inserted for m in batch]

    async def by_request_id(self, tenant_id: str, request_id: str) -> StoredMessage | None:
        """The message a request_id created in this tenant, if any."""
        return await self._one("tenant_id = %s AND request_id = %s", (tenant_id, request_id))

    async def by_id(self, tenant_id: str, message_id: str) -> StoredMessage | None:
        """One message of this tenant (another tenant's is None, as if it did not exist)."""
        try:
            key = uuid.UUID(message_id)
        except ValueError:
            return None
        return await self._one("tenant_id = %s AND id = %s", (tenant_id, key))

    async def _one(self, where: str, args: tuple[object, ...]) -> StoredMessage | None:
        async with autocommit(self.pool) as conn:
            cur = await conn.execute(
                f"SELECT request_id, request_sha256, task, credits FROM ingest.messages WHERE {where}",
                args)
            row = await cur.fetchone()
        if row is None:
            return None
        request_id, fingerprint, task_bytes, credits = row
        task = queue_pb2.SendTask.FromString(bytes(task_bytes))
        return StoredMessage(bytes(fingerprint), message_resource(task, request_id=request_id or "", credits=credits))

    async def close(self) -> None:
        """Flush the group commits still waiting and stop batching."""
        await self._batcher.close()
