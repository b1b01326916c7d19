"""The accept path: from a send request to "accepted", as a readable list of named steps.

1. **authorise** — the key holds the ``send`` scope and its tenant is enabled;
2. **validate** — every field, all problems reported at once; addresses normalised (pure, nothing changes); then
   the **sender** — ``From`` on a verified domain of the tenant or a sandbox domain (``libs.common.verified_senders``,
   an in-memory view: no round trip), else FAILED_PRECONDITION ``UNVERIFIED_SENDER_DOMAIN`` (``Sender`` is a
   reserved header no request can set, so ``From`` is the one address to check);
3. **join a twin** — a concurrent request with the same request_id in this process: wait for its answer;
4. **attachments** — the tenant's own attachments (another tenant's look absent: NOT_FOUND);
5. **size policy** — attach, send as download links, or refuse (tenant setting) when no provider takes the size;
6. **admit** (Redis, one round trip) — claim the request_id (the claim names the message being created), refuse
   suppressed recipients, spend a rate token, count the daily quota; all or nothing. A request_id claimed already
   → the answer is that message, once committed (same request), or ALREADY_EXISTS (different request);
7. **reserve credits** (ledger; concurrent reserves coalesce into one batch call) — the hold id is the message id;
   an email whose ``send_time`` is ahead holds them until then and a day more;
8. **commit** (Postgres; concurrent emails share one transaction) — message row + outbox rows (SEND task and
   ACCEPTED event) together. The caller hears "accepted" only after this commit; the outbox publisher (and,
   after a crash, its reconciling pass) puts the rows on JetStream with ``Nats-Msg-Id`` = message/event id.
   A scheduled email (``send_time`` ahead: state SCHEDULED) has its ACCEPTED event published at once and its
   SEND task held in the outbox (``deliver_after``) until the publisher's due pass finds it due; until then
   ``CancelMessage`` withdraws it (``services.ingest.cancel``).

Steps 5-8 run in passes (``_accept_together``), each step once for all the emails of a pass. A single send is a
batch of one: concurrent single sends of one tenant and class pool into one pass (``_accept_pooled``, group
commit; a BatchSendEmails call's emails with a request_id or attachments go through ``send`` and join these pools),
and a BatchSendEmails call's other emails make one pass of their own (``send_many``). Each email still gets its own
answer or refusal. One whose request_id another request holds waits for that request's answer, and joins a pass
again if that request gave up. The emails of an urgent class (``ClassPolicy.urgent``: OTP) take the urgent lane of
every batching step, so a campaign being accepted never queues them.

A refusal at steps 1-6 changes nothing. A refusal after step 6 gives back what was taken (rate token, quota,
claim; the hold is released). A pass runs to its end even when its callers go away, so a cancelled call can neither
lose a committed email nor leak its credits.

A dependency failing (Redis, the ledger, Postgres) fails the emails it touched, not the others: a batch's emails may
be committed in different transactions (the pass with the others', its emails with a request_id in their pools), and
one may commit while another fails. So once any email of a BatchSendEmails call is accepted, the call answers each
email's outcome, and an email a dependency failed gets UNAVAILABLE (``DEPENDENCY_UNAVAILABLE``) as its own result:
failing the whole call would lose the answers of the committed ones, and a client retrying it would send those
again (without a request_id, twice). Only when none was accepted does the call fail as a whole.

Idempotency (AIP-155): a request_id is scoped to its tenant. The same id with the same request returns the first
response (the same message); with a different request it is refused with ALREADY_EXISTS (reason
``REQUEST_ID_REUSED``). Postgres' unique key ``(tenant_id, request_id)`` is the truth and keeps the id as long as
the message row exists; Redis remembers it for ``idempotency_cache_s`` (24 h by default) as the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from esp.v1 import messages_pb2
from prometheus_client import Counter
from redis.exceptions import RedisError

from libs.common.auth import Principal
from libs.common.dependency_errors import dependency_unavailable
from libs.common.errors import Aborted, AlreadyExists, EspError, FieldViolation, Internal, PermissionDenied
from libs.common.jetstream import Topology
from libs.common.message_classes import MessageClass
from libs.common.outbox import OutboxRow
from libs.common.queued_messages import accepted_event, message_resource
from libs.common.telemetry import current_traceparent
from libs.common.timestamps import to_timestamp
from libs.common.verified_senders import VerifiedSenders
from services.ingest.limits import AdmissionTicket, RedisGate
from services.ingest.model import YIELD_EVERY, EmailDraft, HoldRequest, StoredAttachment
from services.ingest.payloads import (
    accepted_now,
    build_send_task,
    queued_task,
    request_fingerprint,
)
from services.ingest.sizing import SizeDecision, SizePolicy
from services.ingest.store import MessageStore, NewMessage, StoredMessage
from services.ingest.tenants import Tenant, TenantStore
from services.ingest.validation import MAX_SEND_AHEAD_S, validate_draft

log = logging.getLogger(__name__)
T = TypeVar("T")

ACCEPTED = Counter("esp_ingest_accepted_total", "Emails accepted through the API (stored with their outbox rows), "
                   "by class; a campaign's emails are counted by esp_campaigns_queued_total", ["class"])

ADMISSION_ROUNDS = 5
"""How often a request joins a pass again after the request holding its request_id gave up."""
ONE_BY_ONE_IN_FLIGHT = 256
"""Emails of batches that go through ``send`` (those with a request_id or attachments) at once."""
BATCH_PASSES_IN_FLIGHT = 4
"""The default of ``IngestSettings.batch_passes_in_flight``: BatchSendEmails calls whose emails go through the steps
at once (in this process); later calls wait their turn. Every pass runs a slice of its CPU-bound work per turn of
the event loop, and each step of an OTP accepted meanwhile waits a turn. Sixteen campaign calls of 250 at once, on
the e2e bench: unlimited, the campaign was in after 5.9-7.1 s and OTPs sent meanwhile had a p99 of 1.0-1.2 s; four
passes, 7.0-7.5 s and 0.44-0.49 s; two, 9.4-10.7 s and 0.29-0.39 s."""
HOLD_TTL_AFTER_SEND_S = 86_400.0
"""The default of ``IngestSettings.hold_ttl_after_send_s``: how long a scheduled email's hold outlives its send
time (the ledger's default life of a hold, which covers a send's retries)."""


class CreditReserver(Protocol):
    """The ledger as the accept path sees it."""

    async def reserve_many(self, tenant_id: str, holds: Sequence[HoldRequest]) -> list[int | Exception]:
        """Hold credits for one email per hold: each one's amount, or the error that refused it."""
        ...

    async def release(self, hold_id: str, reason: str) -> None:
        """Release the hold of an email refused after its credits were reserved (``reason`` is recorded)."""
        ...


class AttachmentLookup(Protocol):
    """The attachment store as the accept path sees it."""

    async def get_many(self, tenant_id: str, attachment_ids: Sequence[str]) -> list[StoredAttachment]:
        """The tenant's attachments, in the order asked; NOT_FOUND naming every id that is unknown or another
        tenant's."""
        ...


@dataclass(frozen=True)
class Accepted:
    """The outcome of a send: the message as stored (new, or the first one for a repeated request_id)."""

    message: messages_pb2.Message
    created: bool


@dataclass(frozen=True)
class Claimed:
    """An email's request_id is held by another request (its claim, as Redis holds it)."""

    holder: bytes


@dataclass(frozen=True)
class DuplicateWait:
    """How a request waits for another request holding its request_id (in another replica) to finish."""

    first_delay_s: float = 0.005
    max_delay_s: float = 0.1
    give_up_after_s: float = 10.0


@dataclass
class _Pool:
    """Single sends of one tenant and class waiting to be accepted together; ``fingerprints``, ``attachments`` and
    ``answers`` in the order of ``drafts``."""

    tenant: Tenant
    drafts: list[EmailDraft] = field(default_factory=list)
    fingerprints: list[bytes] = field(default_factory=list)
    attachments: list[list[StoredAttachment]] = field(default_factory=list)
    answers: list[asyncio.Future[Accepted | Claimed]] = field(default_factory=list)
    started: bool = False

    def answer(self, task: asyncio.Future[list[Accepted | Claimed | Exception]]) -> None:
        """Hand each waiting call its email's outcome: its message, or the error that refused it or failed the
        whole pass. Errors go to the calls as their futures' exceptions, not as results each call raises: one
        error object often stands for many emails (a failed round trip), and raising it again and again would
        append every caller's frames to the traceback they share, while a future re-raises it with the
        traceback it was set with."""
        if task.cancelled():
            outcomes: list[Accepted | Claimed | Exception] = [
                Aborted("not accepted; retry", reason="INTERNAL")] * len(self.answers)
        elif (error := task.exception()) is not None:
            outcomes = [error if isinstance(error, Exception) else Aborted("not accepted; retry",
                                                                            reason="INTERNAL")] * len(self.answers)
        else:
            outcomes = task.result()
        for answer, outcome in zip(self.answers, outcomes, strict=True):
            if answer.done():
                continue
            if isinstance(outcome, Exception):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)


@dataclass
class _Flight:
    """A request being accepted in this process; twins wait on ``answer``."""

    fingerprint: bytes
    answer: asyncio.Future[Accepted] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Acceptor:
    """Runs the accept steps for send requests."""

    def __init__(self, *, tenants: TenantStore, gate: RedisGate, credits: CreditReserver,
                 attachments: AttachmentLookup, store: MessageStore, topology: Topology,
                 sizes: SizePolicy, senders: VerifiedSenders, duplicate_wait: DuplicateWait | None = None,
                 batch_passes: int = BATCH_PASSES_IN_FLIGHT, max_send_ahead_s: float = MAX_SEND_AHEAD_S,
                 hold_ttl_after_send_s: float = HOLD_TTL_AFTER_SEND_S) -> None:
        self.tenants = tenants
        self.gate = gate
        self.credits = credits
        self.attachments = attachments
        self.store = store
        self.topology = topology
        self.sizes = sizes
        self.senders = senders
        self.duplicate_wait = duplicate_wait or DuplicateWait()
        self.max_send_ahead_s = max_send_ahead_s
        self.hold_ttl_after_send_s = hold_ttl_after_send_s
        self._in_flight: dict[tuple[str, str], _Flight] = {}
        self._running: set[asyncio.Task[Any]] = set()
        self._one_by_one = asyncio.Semaphore(ONE_BY_ONE_IN_FLIGHT)
        self._batch_passes = asyncio.Semaphore(batch_passes)
        self._pooled: dict[tuple[str, str], _Pool] = {}
        self._pools_running: dict[tuple[str, str], int] = {}

    async def send(self, principal: Principal, draft: EmailDraft) -> Accepted:
        """Accept one email for ``principal``'s tenant (see the module docstring for the steps)."""
        tenant = await self._authorise(principal)
        draft = validate_draft(draft, extra_allowed_headers=tenant.policy.allowed_headers,
                               max_send_ahead_s=self.max_send_ahead_s)
        await self.senders.check(tenant.id, draft.sender.email)
        fingerprint = request_fingerprint(draft)
        if not draft.request_id:
            return await self._accept(tenant, draft, fingerprint)
        return await self._accept_once(tenant, draft, fingerprint)

    async def _accept_pooled(self, tenant: Tenant, draft: EmailDraft, fingerprint: bytes,
                             attachments: list[StoredAttachment]) -> Accepted | Claimed:
        """Steps 5-8 for a single send, together with the other single sends of its tenant and class (group
        commit); ``Claimed`` when another request holds its request_id.

        Concurrent single sends then cost what a batch's emails cost: one submission per step for all of them and
        one task resuming once per step, instead of a task per email resuming at every step. gRPC hands the calls
        over one or two per turn of the event loop, so a pool starts at once only while fewer than its class's
        ``accept_passes_in_flight`` passes run for its key; otherwise it gathers sends until one of them ends."""
        key = (tenant.id, draft.message_class)
        pool = self._pooled.get(key)
        if pool is None:
            pool = self._pooled[key] = _Pool(tenant)
            passes = MessageClass(draft.message_class).policy.accept_passes_in_flight
            if self._pools_running.get(key, 0) < passes:
                self._pools_running[key] = self._pools_running.get(key, 0) + 1
                pool.started = True
                asyncio.get_running_loop().call_soon(self._start_pool, key, pool)
            # else: started by _pool_done when a running pass of its key ends
        answer: asyncio.Future[Accepted | Claimed] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_consume_exception)  # its caller may have gone away (it re-raises it otherwise)
        pool.drafts.append(draft)
        pool.fingerprints.append(fingerprint)
        pool.attachments.append(attachments)
        pool.answers.append(answer)
        # The pass runs to its end whatever happens to this call; shield keeps a cancelled caller from cancelling
        # the answer the pass will set.
        return await asyncio.shield(answer)

    def _start_pool(self, key: tuple[str, str], pool: _Pool) -> None:
        """Run ``pool``'s pass (its slot in ``_pools_running`` is already counted)."""
        if self._pooled.get(key) is pool:
            del self._pooled[key]
        task = asyncio.ensure_future(self._accept_together(pool.tenant, pool.drafts, pool.fingerprints,
                                                           pool.attachments))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(pool.answer)
        task.add_done_callback(lambda _: self._pool_done(key))

    def _pool_done(self, key: tuple[str, str]) -> None:
        waiting = self._pooled.get(key)
        if waiting is not None and not waiting.started:
            waiting.started = True
            self._start_pool(key, waiting)  # takes over the slot of the pass that ended
            return
        running = self._pools_running[key] - 1
        if running:
            self._pools_running[key] = running
        else:
            del self._pools_running[key]

    async def send_many(self, principal: Principal, drafts: Sequence[EmailDraft]) -> list[Accepted | EspError]:
        """Accept a batch (BatchSendEmails): each email's answer or the error that refused it, in order. An email a
        dependency failed is answered UNAVAILABLE (see the module docstring); when no email was accepted, that
        dependency's error is raised instead, for the whole call.

        Emails with neither a request_id nor attachments — a campaign's — go through the steps together: each
        batching step gets them in one submission and this one task resumes once per step, instead of a task per
        email resuming at every step. asyncio runs ready tasks first come, first served, so a campaign's thousands
        of tasks made an OTP accepted meanwhile wait seconds between its own steps. The other emails go one by one
        through ``send`` (and join its pools), at most ``ONE_BY_ONE_IN_FLIGHT`` at once over all batches. At most
        ``batch_passes`` calls run at once; the others wait their turn."""
        async with self._batch_passes:
            return _batch_answers(await self._send_many(principal, drafts))

    async def _send_many(self, principal: Principal,
                         drafts: Sequence[EmailDraft]) -> list[Accepted | Exception | None]:
        """Each email's outcome (None: it has none, which is a bug); errors as raised, dependencies' included."""
        results: list[Accepted | Exception | None] = [None] * len(drafts)
        try:
            tenant = await self._authorise(principal)
        except EspError as exc:
            return [exc] * len(drafts)
        together: list[tuple[int, EmailDraft]] = []
        one_by_one: list[int] = []
        for index, draft in enumerate(drafts):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if draft.request_id or draft.attachment_ids:
                one_by_one.append(index)
                continue
            try:
                valid = validate_draft(draft, extra_allowed_headers=tenant.policy.allowed_headers,
                                       max_send_ahead_s=self.max_send_ahead_s)
                await self.senders.check(tenant.id, valid.sender.email)
                together.append((index, valid))
            except EspError as exc:
                results[index] = exc

        async def alone(index: int) -> None:
            async with self._one_by_one:
                try:
                    results[index] = await self.send(principal, drafts[index])
                except Exception as exc:  # a refusal, or a dependency failing this email (not its batch)
                    results[index] = exc

        singles = asyncio.gather(*(alone(index) for index in one_by_one))
        try:
            if together:
                accepted: list[Accepted | Claimed | Exception]
                try:
                    accepted = await self._run_to_end(self._accept_together(
                        tenant, [d for _, d in together], [request_fingerprint(d) for _, d in together],
                        [[] for _ in together]))
                except Exception as exc:  # the pass failed before committing any of them (Redis, the ledger)
                    accepted = [exc] * len(together)
                for (index, _), outcome in zip(together, accepted, strict=True):
                    if isinstance(outcome, Claimed):
                        raise _claimed_without_request_id()
                    results[index] = outcome
        finally:
            await singles
        return results

    async def _accept_together(self, tenant: Tenant, drafts: list[EmailDraft], fingerprints: list[bytes],
                               attachments: list[list[StoredAttachment]]) -> list[Accepted | Claimed | Exception]:
        """Steps 5-8 for validated emails (``attachments[i]``: email i's, as step 4 found them), each step once for
        all of them. An email whose request_id another request holds is answered ``Claimed`` (its caller waits for
        that request); one whose request_id Postgres already has, with the first request's answer."""
        results: list[Accepted | Claimed | Exception | None] = [None] * len(drafts)
        message_ids = [uuid.uuid4() for _ in drafts]
        now = datetime.now(UTC)
        # Decided once: a send_time that passes while the pass runs still holds the email back (for a few ms).
        send_at = {i: d.send_time for i, d in enumerate(drafts) if d.send_time is not None and d.send_time > now}
        sizings: dict[int, SizeDecision] = {}
        for index, draft in enumerate(drafts):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            try:
                sizings[index] = self.sizes.decide(draft, attachments[index], tenant.policy.large_attachment_policy)
            except EspError as exc:
                results[index] = exc
        by_class: dict[str, list[int]] = {}
        for index in sorted(sizings):
            by_class.setdefault(drafts[index].message_class, []).append(index)
        ticket_of: dict[int, AdmissionTicket] = {}
        try:
            for message_class, indexes in by_class.items():
                answers = await self.gate.admit_many(
                    tenant.id, [drafts[i] for i in indexes],
                    rate_per_second=tenant.policy.rate_per_second[message_class],
                    daily_quota=tenant.policy.daily_quota,
                    claims=[_claim(fingerprints[i], message_ids[i]) if drafts[i].request_id else "" for i in indexes])
                for index, answer in zip(indexes, answers, strict=True):
                    if isinstance(answer, AdmissionTicket):
                        ticket_of[index] = answer
                    elif isinstance(answer, bytes):
                        results[index] = Claimed(answer)
                    else:
                        results[index] = answer
        except BaseException:
            # A later class's round trip failed: the classes admitted before it give back their tokens and claims.
            await asyncio.gather(*(self._undo_quietly(ticket) for ticket in ticket_of.values()))
            raise
        admitted_indexes = sorted(ticket_of)
        try:
            amounts = await self.credits.reserve_many(tenant.id, [
                HoldRequest(str(message_ids[i]), drafts[i].message_class, sum(a.size_bytes for a in attachments[i]),
                            self._hold_ttl_s(send_at.get(i), now))
                for i in admitted_indexes])
        except BaseException:
            await asyncio.gather(*(self._undo_quietly(ticket_of[i]) for i in admitted_indexes))
            raise
        held: dict[int, int] = {}  # index -> credits held
        for index, amount in zip(admitted_indexes, amounts, strict=True):
            if isinstance(amount, Exception):
                results[index] = amount
            else:
                held[index] = amount
        await asyncio.gather(*(self._undo_quietly(ticket_of[i]) for i in admitted_indexes if i not in held))
        new_messages: list[NewMessage] = []
        resources: list[messages_pb2.Message] = []
        for count, index in enumerate(held):  # (dicts keep insertion order: the order of the batch)
            if count % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            new_message, message = self._new_message(tenant.id, drafts[index], fingerprints[index],
                                                     message_ids[index], attachments[index], sizings[index],
                                                     held[index], send_at.get(index))
            new_messages.append(new_message)
            resources.append(message)
        try:
            stored = await self.store.insert_many(new_messages)
        except BaseException as exc:
            await self._give_back([(message_ids[i], ticket_of[i]) for i in held], exc)
            raise
        created: dict[str, int] = {}
        for index, message, stored_one in zip(held, resources, stored, strict=True):
            if stored_one is True:
                results[index] = Accepted(message, created=True)
                created[drafts[index].message_class] = created.get(drafts[index].message_class, 0) + 1
            elif stored_one is False:  # Postgres already has this request_id (Redis had forgotten it)
                try:
                    results[index] = await self._answer_as_first(tenant.id, drafts[index], fingerprints[index],
                                                                 str(message_ids[index]), ticket_of[index])
                except Exception as exc:  # this email's answer alone: others of the pass may be committed
                    results[index] = exc
            else:  # failed alone (its batch did not)
                await self._give_back([(message_ids[index], ticket_of[index])], stored_one)
                results[index] = stored_one
        for message_class, count in created.items():  # one label lookup per class, not per email
            ACCEPTED.labels(message_class).inc(count)
        return [r if r is not None else Aborted("not accepted; retry", reason="INTERNAL") for r in results]

    def _hold_ttl_s(self, send_at: datetime | None, now: datetime) -> int:
        """Step 7: how long an email's hold lives: the ledger's default (0) for an email sent at once; until its send
        time and ``hold_ttl_after_send_s`` more for a scheduled one."""
        if send_at is None:
            return 0
        return math.ceil((send_at - now).total_seconds() + self.hold_ttl_after_send_s)

    def _new_message(self, tenant_id: str, draft: EmailDraft, fingerprint: bytes, message_id: uuid.UUID,
                     attachments: list[StoredAttachment], sizing: SizeDecision, credits: int,
                     send_at: datetime | None = None) -> tuple[NewMessage, messages_pb2.Message]:
        """Step 8's rows for one email (the message with its SEND task and ACCEPTED event for the outbox), and the
        Message its caller is answered with. With ``send_at`` (its send_time, ahead), the SEND task is held in the
        outbox until then."""
        message_key = str(message_id)
        now, accepted_time = accepted_now()
        task = build_send_task(message_key, tenant_id, draft, attachments, accepted_time,
                               attachments_as_links=sizing.attachments_as_links)
        send_time = to_timestamp(send_at) if send_at is not None else None
        message = message_resource(task, request_id=draft.request_id, credits=credits, send_time=send_time)
        event = accepted_event(task, message, sizing.event_attributes())
        task_bytes = task.SerializeToString()
        queued = task_bytes if send_time is None else queued_task(task, send_time)
        traceparent = current_traceparent()
        return NewMessage(
            id=message_id, tenant_id=tenant_id, request_id=draft.request_id, fingerprint=fingerprint,
            message_class=draft.message_class, task=task_bytes, credits=credits, created_at=now, send_time=send_at,
            outbox=(OutboxRow(self.topology.send_subject(draft.message_class), message_key, queued,
                              deliver_after=send_at, traceparent=traceparent),
                    OutboxRow(self.topology.events_subject(tenant_id), event.event.event_id,
                              event.SerializeToString(), traceparent=traceparent))), message

    async def _give_back(self, taken: Sequence[tuple[uuid.UUID, AdmissionTicket]], exc: BaseException) -> None:
        """The holds and admission of emails that were not stored go back: a hold without a message gives its credits
        back now rather than at its expiry."""
        reason = f"accept failed: {type(exc).__name__}"
        await asyncio.gather(*(self._release_quietly(str(message_id), reason) for message_id, _ in taken),
                             *(self._undo_quietly(ticket) for _, ticket in taken))

    # -- steps -----------------------------------------------------------------------------------------------
    async def _authorise(self, principal: Principal) -> Tenant:
        principal.require("send")
        if not principal.tenant_id:
            raise PermissionDenied("sending acts for a tenant: use one of the tenant's API keys",
                                   reason="TENANT_KEY_REQUIRED")
        tenant = await self.tenants.get_tenant(principal.tenant_id)
        if tenant.policy.disabled:
            raise PermissionDenied("this tenant is disabled", reason="TENANT_DISABLED")
        return tenant

    async def _accept_once(self, tenant: Tenant, draft: EmailDraft, fingerprint: bytes) -> Accepted:
        """Step 3: concurrent twins in this process share one accept (the others never reach Redis)."""
        key = (tenant.id, draft.request_id)
        twin = self._in_flight.get(key)
        if twin is not None:
            if twin.fingerprint != fingerprint:
                raise request_id_reused(draft.request_id)
            first = await asyncio.shield(twin.answer)
            return Accepted(first.message, created=False)
        flight = _Flight(fingerprint)
        flight.answer.add_done_callback(_consume_exception)
        self._in_flight[key] = flight
        try:
            accepted = await self._accept(tenant, draft, fingerprint)
        except asyncio.CancelledError:
            flight.answer.set_exception(Aborted("the first request with this request_id was cancelled; retry",
                                                reason="REQUEST_IN_PROGRESS", retry_after_s=0.1))
            raise
        except BaseException as exc:
            flight.answer.set_exception(exc)
            raise
        else:
            flight.answer.set_result(accepted)
            return accepted
        finally:
            del self._in_flight[key]

    async def _accept(self, tenant: Tenant, draft: EmailDraft, fingerprint: bytes) -> Accepted:
        """Step 4, then steps 5-8 as a batch of one in its pool; while another request holds its request_id, that
        request's answer (and another pass when that request gave up)."""
        attachments: list[StoredAttachment] = []
        if draft.attachment_ids:
            if draft.request_id:
                # What steps 4-5 check may have changed since a first request (attachment deleted, providers
                # changed): a retry must still get the first response, so look for it before checking.
                earlier = await self.store.by_request_id(tenant.id, draft.request_id)
                if earlier is not None:
                    return _repeat(earlier, fingerprint, draft.request_id)
            attachments = await self.attachments.get_many(tenant.id, draft.attachment_ids)
        for _ in range(1 + ADMISSION_ROUNDS):
            outcome = await self._accept_pooled(tenant, draft, fingerprint, attachments)
            if isinstance(outcome, Accepted):
                return outcome
            if not draft.request_id:
                raise _claimed_without_request_id()
            earlier_accepted = await self._wait_for_holder(tenant.id, draft.request_id, fingerprint, outcome.holder)
            if earlier_accepted is not None:
                return earlier_accepted
        raise Aborted("a request with this request_id keeps failing elsewhere; retry", reason="REQUEST_IN_PROGRESS",
                      retry_after_s=1.0)

    async def _answer_as_first(self, tenant_id: str, draft: EmailDraft, fingerprint: bytes, message_key: str,
                               ticket: AdmissionTicket) -> Accepted:
        """A request_id Postgres already has: give back what this request took and answer as the first time."""
        await self._release_quietly(message_key, "duplicate request_id")
        await self._undo_quietly(ticket)
        earlier = await self.store.by_request_id(tenant_id, draft.request_id)
        if earlier is None:
            raise Aborted("request_id conflict; retry", reason="REQUEST_IN_PROGRESS", retry_after_s=0.1)
        repeated = _repeat(earlier, fingerprint, draft.request_id)
        await self._remember_quietly(tenant_id, draft.request_id,
                                     _claim(earlier.fingerprint, uuid.UUID(earlier.message.id)))
        return repeated

    async def _wait_for_holder(self, tenant_id: str, request_id: str, fingerprint: bytes,
                               holder: bytes) -> Accepted | None:
        """Another request holds this request_id: its answer once its message is committed; None when that
        request gave up (the caller then tries the gate again)."""
        wait = self.duplicate_wait
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait.give_up_after_s
        delay = wait.first_delay_s
        value: bytes | None = holder
        while value is not None:
            holder_fingerprint, _, holder_message = value.decode().partition("|")
            if holder_fingerprint != fingerprint.hex():
                raise request_id_reused(request_id)
            # The claim names the message its request is creating: committed means answered.
            stored = await self.store.by_id(tenant_id, holder_message)
            if stored is not None:
                return _repeat(stored, fingerprint, request_id)
            if loop.time() >= deadline:
                raise Aborted("a request with this request_id is still being processed; retry",
                              reason="REQUEST_IN_PROGRESS", retry_after_s=1.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, wait.max_delay_s)
            value = await self.gate.holder(tenant_id, request_id)
        # The claim is gone: its request was refused (or Redis forgot it). Postgres knows if it had succeeded.
        stored = await self.store.by_request_id(tenant_id, request_id)
        return None if stored is None else _repeat(stored, fingerprint, request_id)

    # -- compensation ----------------------------------------------------------------------------------------
    async def _run_to_end(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(_consume_exception)
        return await asyncio.shield(task)

    async def _release_quietly(self, hold_id: str, reason: str) -> None:
        try:
            await self.credits.release(hold_id, reason)
        except Exception:
            log.warning("could not release hold %s; it will expire", hold_id, exc_info=True)

    async def _undo_quietly(self, ticket: AdmissionTicket) -> None:
        try:
            await self.gate.undo(ticket)
        except Exception:
            log.warning("could not give back the rate token and quota of a refused email", exc_info=True)

    async def _remember_quietly(self, tenant_id: str, request_id: str, value: str) -> None:
        try:
            await self.gate.remember(tenant_id, request_id, value)
        except RedisError:
            # The claim stays "pending" until it expires; retries then find the message in Postgres.
            log.warning("could not record request_id %s in Redis", request_id, exc_info=True)

    async def drain(self) -> None:
        """Wait for accepts whose callers went away to finish (called at shutdown)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def _batch_answers(results: Sequence[Accepted | Exception | None]) -> list[Accepted | EspError]:
    """A batch's answers: each email's message or refusal, and UNAVAILABLE for an email a dependency failed (INTERNAL
    for one a bug failed). When no email was accepted and one failed that way, its error is raised instead: the
    call fails as a whole, and a retry of it duplicates nothing."""
    any_accepted = any(isinstance(result, Accepted) for result in results)
    answers: list[Accepted | EspError] = []
    failures: dict[int, EspError] = {}  # one error often failed many emails (a round trip): logged once
    for result in results:
        if result is None:
            answers.append(Aborted("not accepted; retry", reason="INTERNAL"))
        elif isinstance(result, Accepted | EspError):
            answers.append(result)
        elif any_accepted:
            if id(result) not in failures:
                failures[id(result)] = _email_failure(result)
            answers.append(failures[id(result)])
        else:
            raise result
    return answers


def _email_failure(exc: Exception) -> EspError:
    """The error one email of a batch answers when something other than a refusal failed it."""
    unavailable = dependency_unavailable(exc)
    if unavailable is not None:
        log.warning("batch email not accepted: %s (%r)", unavailable.message, exc)
        return unavailable
    log.error("batch email not accepted", exc_info=exc)
    return Internal("internal error", reason="INTERNAL")


def _claim(fingerprint: bytes, message_id: uuid.UUID) -> str:
    """What a request_id's Redis key holds: the request's fingerprint and the message it creates (or created)."""
    return f"{fingerprint.hex()}|{message_id}"


def _repeat(stored: StoredMessage, fingerprint: bytes, request_id: str) -> Accepted:
    if stored.fingerprint != fingerprint:
        raise request_id_reused(request_id)
    return Accepted(stored.message, created=False)


def _claimed_without_request_id() -> AssertionError:
    """An email without a request_id has nothing to claim: being answered ``Claimed`` is a bug."""
    return AssertionError("an email without a request_id was answered as claimed")


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its owner re-raises it, so asyncio need not log it again."""
    if not future.cancelled():
        future.exception()


def request_id_reused(request_id: str) -> AlreadyExists:
    """The error for a request_id reused with a different request."""
    return AlreadyExists(
        "request_id was already used for a different request", reason="REQUEST_ID_REUSED",
        metadata={"request_id": request_id},
        field_violations=[FieldViolation("request_id", "already used with different content", "REQUEST_ID_REUSED")])
