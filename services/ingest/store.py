"""Accepted emails in Postgres: the message row and its outbox rows, committed together, many emails per
transaction (group commit).

One transaction per email caps Postgres at a few thousand emails a second; concurrent accepts therefore queue
here and each free worker commits everything queued so far in one transaction of two statements. The unique key
``(tenant_id, request_id)`` is the truth of idempotency: a row that loses against it is reported as a conflict
and its outbox rows are not written.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from psycopg_pool import AsyncConnectionPool

from services.ingest.batching import MicroBatcher
from services.ingest.outbox import OutboxRow
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

    def __init__(self, pool: AsyncConnectionPool, *, batch_size: int = 500, workers: int = 3) -> None:
        self.pool = pool
        self._batcher: MicroBatcher[NewMessage, bool] = MicroBatcher(
            self._commit, max_batch_size=batch_size, workers=workers)

    async def insert(self, message: NewMessage) -> bool:
        """Commit the message and its outbox rows; False (and nothing written) when its request_id is taken."""
        return await self._batcher.submit(message)

    async def _commit(self, batch: Sequence[NewMessage]) -> list[bool]:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """INSERT INTO ingest.messages (id, tenant_id, request_id, request_sha256, message_class, task,
                       credits, created_at)
                   SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::bytea[], %s::text[], %s::bytea[],
                                        %s::bigint[], %s::timestamptz[])
                   ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
                   RETURNING id""",
                ([m.id for m in batch], [m.tenant_id for m in batch], [m.request_id or None for m in batch],
                 [m.fingerprint for m in batch], [m.message_class for m in batch], [m.task for m in batch],
                 [m.credits for m in batch], [m.created_at for m in batch]),
            )
            inserted = {row[0] for row in await cur.fetchall()}
            rows = [r for m in batch if m.id in inserted for r in m.outbox]
            if rows:
                await conn.execute(
                    """INSERT INTO ingest.outbox (subject, msg_id, payload)
                       SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[])""",
                    ([r.subject for r in rows], [r.msg_id for r in rows], [r.payload for r in rows]),
                )
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
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT request_id, request_sha256, task, credits, created_at FROM ingest.messages WHERE {where}",
                args)
            row = await cur.fetchone()
        if row is None:
            return None
        request_id, fingerprint, task_bytes, credits, created_at = row
        task = queue_pb2.SendTask.FromString(bytes(task_bytes))
        return StoredMessage(bytes(fingerprint), message_resource(task, request_id=request_id or "",
                                                                  credits=credits, created_at=created_at))

    async def close(self) -> None:
        await self._batcher.close()
