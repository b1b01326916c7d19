"""Accepted emails in Postgres: the message row and its outbox rows, committed together, many emails per
transaction (group commit).

After the commit the outbox rows go to ``on_commit`` (the publisher) to be published at once.

One transaction per email caps Postgres at a few thousand emails a second; concurrent accepts therefore queue
here and each free worker commits everything queued so far in one transaction of two statements. The unique key
``(tenant_id, request_id)`` is the truth of idempotency: a row that loses against it is reported as a conflict
and its outbox rows are not written.

A scheduled email's SEND task is an outbox row held back until its send time (``deliver_after``); ``withdraw``
deletes it before then (CancelMessage), queuing the final CANCELLED event in the same transaction.
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
from libs.common.queued_messages import message_resource
from libs.common.timestamps import to_timestamp
from services.ingest.model import URGENT_CLASSES

_CANCELLED = messages_pb2.MESSAGE_STATE_CANCELLED


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
    send_time: datetime | None = None
    """When its SEND task is handed to the senders, when that is ahead (its outbox row is held back until then)."""


@dataclass(frozen=True)
class StoredMessage:
    """A message as committed: enough to answer a repeated request exactly as the first time."""

    fingerprint: bytes
    message: messages_pb2.Message


@dataclass(frozen=True)
class CancelTarget:
    """A message as CancelMessage found it, with what an earlier cancel left on it."""

    message: messages_pb2.Message
    """As accepted (state ACCEPTED, or SCHEDULED with its send_time)."""
    task: queue_pb2.SendTask
    cancel_request_id: str
    """The request_id of the last cancel that recorded its answer ('' for none)."""
    cancel_state: int | None
    """The state that cancel answered (``MESSAGE_STATE_CANCELLED`` once its SEND task was withdrawn)."""

    def answer(self, state: int) -> messages_pb2.Message:
        """The message in ``state``, as CancelMessage answers it."""
        answered = messages_pb2.Message()
        answered.CopyFrom(self.message)
        answered.state = state
        return answered


@dataclass(frozen=True)
class Withdrawal:
    """What ``withdraw`` did."""

    target: CancelTarget
    withdrawn: bool
    """Its SEND task was taken out of the outbox before any sender had it, and the CANCELLED event queued."""


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
                           credits, created_at, send_time)
                       SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::bytea[], %b::text[], %b::bytea[],
                                            %b::bigint[], %b::timestamptz[], %b::timestamptz[])
                       ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
                       RETURNING id),
                   queued AS (
                       INSERT INTO ingest.outbox (subject, msg_id, payload, deliver_after, traceparent)
                       SELECT o.subject, o.msg_id, o.payload, o.deliver_after, o.traceparent
                       FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::bytea[], %b::timestamptz[], %b::text[])
                           AS o(message, subject, msg_id, payload, deliver_after, traceparent)
                       WHERE o.message IN (SELECT id FROM new)
                       RETURNING id, msg_id)
                   SELECT NULL::bigint, id::text FROM new UNION ALL SELECT id, msg_id FROM queued""",
                ([m.id for m in batch], [m.tenant_id for m in batch], [m.request_id or None for m in batch],
                 [m.fingerprint for m in batch], [m.message_class for m in batch], [m.task for m in batch],
                 [m.credits for m in batch], [m.created_at for m in batch], [m.send_time for m in batch],
                 [message for message, _ in rows], [r.subject for _, r in rows], [r.msg_id for _, r in rows],
                 [r.payload for _, r in rows], [r.deliver_after for _, r in rows],
                 [r.traceparent or None for _, r in rows]),
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
                f"SELECT request_id, request_sha256, task, credits, send_time FROM ingest.messages WHERE {where}",
                args)
            row = await cur.fetchone()
        if row is None:
            return None
        request_id, fingerprint, task_bytes, credits, send_time = row
        return StoredMessage(bytes(fingerprint), _message(bytes(task_bytes), request_id, credits, send_time)[1])

    async def withdraw(self, tenant_id: str, message_id: str, request_id: str,
                       cancelled_event: Callable[[queue_pb2.SendTask], OutboxRow]) -> Withdrawal | None:
        """CancelMessage's transaction: lock the tenant's message (None: it has no such message) and, unless an
        earlier cancel withdrew it or answered this ``request_id`` already, take its SEND task out of the outbox
        if it is still held back there, queuing the outbox row ``cancelled_event`` makes for it. The publisher
        gets that row once committed.

        A held-back row is published only by a due pass holding its lock, and deleted in that pass' transaction:
        if one is publishing it now, the DELETE waits for that pass and then finds nothing (too late)."""
        try:
            key = uuid.UUID(message_id)
        except ValueError:
            return None
        committed: list[CommittedRow] = []
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """SELECT request_id, task, credits, send_time, cancel_request_id, cancel_state FROM ingest.messages
                   WHERE tenant_id = %s AND id = %s FOR UPDATE""", (tenant_id, key))
            row = await cur.fetchone()
            if row is None:
                return None
            first_request_id, task_bytes, credits, send_time, cancel_request_id, cancel_state = row
            task, message = _message(bytes(task_bytes), first_request_id, credits, send_time)
            target = CancelTarget(message, task, cancel_request_id or "", cancel_state)
            if (request_id and target.cancel_request_id == request_id) or cancel_state == _CANCELLED:
                return Withdrawal(target, withdrawn=False)
            cur = await conn.execute(
                "DELETE FROM ingest.outbox WHERE msg_id = %s AND deliver_after IS NOT NULL RETURNING id",
                (message_id,))
            if await cur.fetchone() is None:
                return Withdrawal(target, withdrawn=False)
            event = cancelled_event(task)
            cur = await conn.execute(
                "INSERT INTO ingest.outbox (subject, msg_id, payload, traceparent) VALUES (%s, %s, %s, %s) "
                "RETURNING id", (event.subject, event.msg_id, event.payload, event.traceparent or None))
            inserted = await cur.fetchone()
            assert inserted is not None
            committed.append(CommittedRow(inserted[0], event))
            await conn.execute(
                "UPDATE ingest.messages SET cancel_request_id = %s, cancel_state = %s WHERE id = %s",
                (request_id or None, _CANCELLED, key))
        if self.on_commit is not None:
            self.on_commit(committed, False)
        return Withdrawal(target, withdrawn=True)

    async def record_cancel(self, tenant_id: str, message_id: str, request_id: str, state: int) -> None:
        """Remember what a cancel with ``request_id`` answered (``state``), for its retries."""
        async with autocommit(self.pool) as conn:
            await conn.execute(
                """UPDATE ingest.messages SET cancel_request_id = %s, cancel_state = %s
                   WHERE tenant_id = %s AND id = %s""", (request_id, state, tenant_id, uuid.UUID(message_id)))

    async def close(self) -> None:
        """Flush the group commits still waiting and stop batching."""
        await self._batcher.close()


def _message(task_bytes: bytes, request_id: str | None, credits: int,
             send_time: datetime | None) -> tuple[queue_pb2.SendTask, messages_pb2.Message]:
    """A stored message row's task, and the Message it was accepted as."""
    task = queue_pb2.SendTask.FromString(task_bytes)
    return task, message_resource(task, request_id=request_id or "", credits=credits,
                                  send_time=to_timestamp(send_time) if send_time is not None else None)
