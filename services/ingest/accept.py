"""The accept path: a readable list of named steps from a send request to "accepted".

accept = message row + outbox rows committed in one transaction, after the ledger holds the credits (the hold
is keyed by the message id, so a retry of this path re-uses it, and a hold whose message never commits expires
and returns its credits). The caller hears "accepted" only after that commit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from psycopg_pool import AsyncConnectionPool

from libs.common.auth import Principal
from libs.common.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied
from libs.common.jetstream import Topology
from libs.common.suppressions import suppressed_among
from services.ingest.limits import SendLimiter
from services.ingest.model import EmailDraft, StoredAttachment
from services.ingest.outbox import OutboxPublisher, OutboxRow, write_outbox
from services.ingest.payloads import (
    accepted_event,
    build_send_task,
    message_resource,
    request_fingerprint,
)
from services.ingest.tenants import TenantStore
from services.ingest.validation import validate_draft

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S = 48 * 3600
"""How long a request_id is remembered in Redis; Postgres keeps it as long as the message exists."""


class CreditReserver(Protocol):
    """The ledger as the accept path sees it."""

    async def reserve(self, tenant_id: str, hold_id: str, message_class: str, emails: int,
                      attachment_bytes: int) -> int: ...

    async def release(self, hold_id: str, reason: str) -> None: ...


class AttachmentLookup(Protocol):
    async def get_many(self, tenant_id: str, attachment_ids: Sequence[str]) -> list[StoredAttachment]: ...


@dataclass(frozen=True)
class Accepted:
    """The outcome of a send: the message as stored (new, or the first one for a repeated request_id)."""

    message: messages_pb2.Message
    created: bool


class Acceptor:
    """Runs the accept steps for one send request."""

    def __init__(self, *, pool: AsyncConnectionPool, redis: aioredis.Redis, topology: Topology,
                 tenants: TenantStore, limiter: SendLimiter, credits: CreditReserver,
                 attachments: AttachmentLookup, outbox: OutboxPublisher) -> None:
        self.pool = pool
        self.redis = redis
        self.topology = topology
        self.tenants = tenants
        self.limiter = limiter
        self.credits = credits
        self.attachments = attachments
        self.outbox = outbox

    async def send(self, principal: Principal, draft: EmailDraft) -> Accepted:
        principal.require("send")
        tenant = await self.tenants.get_tenant(principal.tenant_id)
        if tenant.policy.disabled:
            raise PermissionDenied("this tenant is disabled", reason="TENANT_DISABLED")
        draft = validate_draft(draft, extra_allowed_headers=tenant.policy.allowed_headers)
        fingerprint = request_fingerprint(draft)
        message_id = uuid.uuid4()
        if draft.request_id:
            earlier = await self._claim_request_id(tenant.id, draft.request_id, message_id, fingerprint)
            if earlier is not None:
                return Accepted(earlier, created=False)
        try:
            return await self._accept_new(tenant.id, tenant.policy.rate_per_second[draft.message_class],
                                          tenant.policy.daily_quota, draft, message_id, fingerprint)
        except BaseException:
            if draft.request_id:
                await self._unclaim(tenant.id, draft.request_id, message_id)
            raise

    # -- steps -----------------------------------------------------------------------------------------------
    async def _accept_new(self, tenant_id: str, rate: float, daily_quota: int, draft: EmailDraft,
                          message_id: uuid.UUID, fingerprint: bytes) -> Accepted:
        await self._refuse_suppressed(tenant_id, draft)
        await self.limiter.check_rate(tenant_id, draft.message_class, rate)
        attachments = await self.attachments.get_many(tenant_id, draft.attachment_ids)
        await self.limiter.count_daily(tenant_id, daily_quota)
        try:
            credits = await self.credits.reserve(tenant_id, str(message_id), draft.message_class, 1,
                                                 sum(a.size_bytes for a in attachments))
        except BaseException:
            await self.limiter.refund_daily(tenant_id)
            raise
        try:
            return await self._persist(tenant_id, draft, message_id, fingerprint, attachments, credits)
        except BaseException as exc:
            # The hold has no message: give the credits back now rather than at expiry.
            await asyncio.shield(self._release_quietly(str(message_id), f"accept failed: {type(exc).__name__}"))
            await self.limiter.refund_daily(tenant_id)
            raise

    async def _refuse_suppressed(self, tenant_id: str, draft: EmailDraft) -> None:
        suppressed = sorted(await suppressed_among(self.redis, self.topology.namespace, tenant_id,
                                                   [box.email for box in draft.recipients]))
        if suppressed:
            raise FailedPrecondition(
                "recipients are on the suppression list", reason="SUPPRESSED_RECIPIENT",
                metadata={"recipients": ",".join(suppressed)},
                field_violations=[FieldViolation("to", f"{a} is suppressed", "SUPPRESSED_RECIPIENT")
                                  for a in suppressed],
            )

    async def _persist(self, tenant_id: str, draft: EmailDraft, message_id: uuid.UUID, fingerprint: bytes,
                       attachments: list[StoredAttachment], credits: int) -> Accepted:
        now = datetime.now(UTC)
        task = build_send_task(message_id, tenant_id, draft, attachments, now)
        message = message_resource(task, request_id=draft.request_id, credits=credits, created_at=now)
        event = accepted_event(task, message)
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """INSERT INTO ingest.messages (id, tenant_id, request_id, request_sha256, message_class, task,
                       credits, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id""",
                (message_id, tenant_id, draft.request_id or None, fingerprint, draft.message_class,
                 task.SerializeToString(), credits, now),
            )
            if await cur.fetchone() is None:
                conflict = True
            else:
                conflict = False
                await write_outbox(conn, [
                    OutboxRow(self.topology.send_subject(draft.message_class), str(message_id),
                              task.SerializeToString()),
                    OutboxRow(self.topology.events_subject(tenant_id), event.event.event_id,
                              event.SerializeToString()),
                ])
        if conflict:
            # A concurrent request with the same request_id won in Postgres (Redis fast path lost or bypassed).
            await self._release_quietly(str(message_id), "duplicate request_id")
            earlier = await self._load_by_request_id(tenant_id, draft.request_id, fingerprint)
            if earlier is None:
                raise AlreadyExists("request_id is in use", reason="REQUEST_ID_IN_USE")
            return Accepted(earlier, created=False)
        self.outbox.notify()
        return Accepted(message, created=True)

    async def _release_quietly(self, hold_id: str, reason: str) -> None:
        try:
            await self.credits.release(hold_id, reason)
        except Exception:
            log.warning("could not release hold %s; it will expire", hold_id, exc_info=True)

    # -- idempotency -----------------------------------------------------------------------------------------
    def _idem_key(self, tenant_id: str, request_id: str) -> str:
        return f"{self.topology.namespace}:idem:{tenant_id}:{request_id}"

    async def _claim_request_id(self, tenant_id: str, request_id: str, message_id: uuid.UUID,
                                fingerprint: bytes) -> messages_pb2.Message | None:
        """Claim the request_id for this request, or return the message an equal earlier request created.

        Redis SET NX elects one winner among concurrent duplicates cheaply; the others wait for its row.
        Postgres' unique key stays the truth when Redis forgot (restart, failover).
        """
        key = self._idem_key(tenant_id, request_id)
        claim = f"{message_id}|{fingerprint.hex()}"
        for _ in range(200):
            earlier = await self._load_by_request_id(tenant_id, request_id, fingerprint)
            if earlier is not None:
                return earlier
            try:
                if await self.redis.set(key, claim, nx=True, ex=IDEMPOTENCY_TTL_S):
                    return None
                holder = await self.redis.get(key)
            except aioredis.RedisError:
                log.warning("Redis unavailable for idempotency; relying on Postgres", exc_info=True)
                return None
            if holder is None:
                continue
            _holder_id, _, holder_fp = holder.decode().partition("|")
            if holder_fp != fingerprint.hex():
                raise _mismatch(request_id)
            await asyncio.sleep(0.025)  # the winner is committing; its row appears shortly
        raise FailedPrecondition("a request with this request_id is still being processed; retry",
                                 reason="REQUEST_IN_PROGRESS", retry_after_s=1.0)

    async def _unclaim(self, tenant_id: str, request_id: str, message_id: uuid.UUID) -> None:
        key = self._idem_key(tenant_id, request_id)
        try:
            holder = await self.redis.get(key)
            if holder is not None and holder.decode().startswith(f"{message_id}|"):
                await self.redis.delete(key)
        except aioredis.RedisError:
            log.warning("could not drop idempotency claim %s", key, exc_info=True)

    async def _load_by_request_id(self, tenant_id: str, request_id: str,
                                  fingerprint: bytes) -> messages_pb2.Message | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT request_sha256, task, credits, created_at FROM ingest.messages
                   WHERE tenant_id = %s AND request_id = %s""",
                (tenant_id, request_id),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        stored_fp, task_bytes, credits, created_at = row
        if bytes(stored_fp) != fingerprint:
            raise _mismatch(request_id)
        task = queue_pb2.SendTask.FromString(bytes(task_bytes))
        return message_resource(task, request_id=request_id, credits=credits, created_at=created_at)


def _mismatch(request_id: str) -> AlreadyExists:
    return AlreadyExists(
        "request_id was already used for a different request", reason="REQUEST_ID_REUSED",
        metadata={"request_id": request_id},
        field_violations=[FieldViolation("request_id", "already used with different content")],
    )


def require_known(found: list[StoredAttachment], wanted: Sequence[str]) -> None:
    """Every wanted attachment id must be among ``found`` (tenant-scoped), else INVALID_ARGUMENT."""
    known = {a.id for a in found}
    missing = [(i, a) for i, a in enumerate(wanted) if a.removeprefix("attachments/") not in known]
    if missing:
        raise InvalidArgument("unknown attachment ids", reason="UNKNOWN_ATTACHMENT", field_violations=[
            FieldViolation(f"attachment_ids[{i}]", f"no attachment {a!r}", "UNKNOWN_ATTACHMENT") for i, a in missing])
