"""Expansion: a running campaign's recipients become queued emails, one chunk per transaction.

A chunk: lock the campaign row → read the next ``chunk_size`` recipients behind the cursor → drop suppressed
addresses (one Redis round trip) → render each recipient's subject and bodies → hold credits for the rest (one
ledger call per 500; the hold id is the message id) → one transaction writes the outbox rows (the SendTask and
the ACCEPTED event of every queued email), the counters and the cursor past the chunk → publish.

Why a SIGKILL is harmless: the cursor moves in the same transaction as the outbox rows, so a chunk is either
wholly queued with the cursor past it or not at all. The message id is derived from (campaign, row), so a chunk
replayed after a crash re-uses the holds it had reserved (reserving an id again is a no-op) and JetStream's
duplicate window drops a publish that had landed; a hold left behind by a chunk that never committed expires.

Credits running out stops the chunk at the first refused email: the emails before it are queued, the cursor stops
there, and the campaign pauses with ``INSUFFICIENT_CREDITS``. The expander tries again every few seconds and
resumes it by itself once a chunk's credits can be held (after a top-up).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from opentelemetry import trace
from prometheus_client import Counter
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common.errors import EspError, FailedPrecondition
from libs.common.jetstream import Topology
from libs.common.message_classes import MessageClass
from libs.common.outbox import CommittedRow, OutboxRow
from libs.common.queued_messages import accepted_event, message_resource
from libs.common.suppressions import suppressed_among
from libs.common.telemetry import current_traceparent
from libs.common.timestamps import to_timestamp
from libs.common.unsubscribe import UnsubscribeTarget, UnsubscribeTokens, list_unsubscribe_headers, unsubscribe_url
from services.campaigns.model import CampaignSpec, Mailbox, PauseReason
from services.campaigns.notifications import paused_event, queue_event
from services.campaigns.substitution import UNSUBSCRIBE_PLACEHOLDER, Substitution
from services.campaigns.templates import CampaignTemplates, MissingVariablePolicy, RenderedContent, RenderFailure

__all__ = ["CAMPAIGN_MESSAGE_NAMESPACE", "ChunkResult", "CreditHolds", "Expansion", "UnsubscribeLinks",
           "campaign_message_id", "compile_spec"]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("esp.campaigns")

CAMPAIGN_MESSAGE_NAMESPACE = uuid.UUID("5b0e6a8e-4f47-4c3e-9d0c-6b1f3c2a9e71")
"""uuid5 namespace of campaign message ids."""
CREDIT_RETRY_S = 5.0
"""How often a campaign paused for lack of credits tries its next chunk again."""
TEMPLATE_CACHE = 64
"""Compiled campaigns kept per process."""
QUEUED = Counter("esp_campaigns_queued_total", "Campaign emails queued for sending (held and in the outbox), by class",
                 ["class"])


def campaign_message_id(campaign_id: str, row_number: int) -> str:
    """The message id of a campaign's recipient: the same on every replay of its chunk."""
    return str(uuid.uuid5(CAMPAIGN_MESSAGE_NAMESPACE, f"{campaign_id}:{row_number}"))


def compile_spec(spec: CampaignSpec, *, field_prefix: str = "campaign.") -> CampaignTemplates:
    """The campaign's templates, compiled (INVALID_ARGUMENT with line and column for a syntax error)."""
    return CampaignTemplates.compile(
        subject=spec.subject, text=spec.text_body or None, html=spec.html_body or None,
        defaults=spec.default_variables, on_missing=MissingVariablePolicy(spec.missing_variable_policy),
        field_prefix=field_prefix)


class CreditHolds(Protocol):
    """The ledger as expansion sees it."""

    async def reserve(self, tenant_id: str, message_class: MessageClass, holds: Sequence[tuple[str, int]],
                      ttl_s: int) -> list[int | Exception]:
        """Hold credits for each (hold id, attachment bytes): its amount or the error that refused it."""
        ...

    async def release(self, hold_id: str, reason: str) -> None:
        """Give a hold back."""
        ...


@dataclass(frozen=True)
class UnsubscribeLinks:
    """How one-click unsubscribe links are made: the tokens' keys and the public base URL reports serves."""

    tokens: UnsubscribeTokens
    base_url: str

    def url(self, tenant_id: str, campaign_id: str, email: str, topic: str = "") -> str:
        """The recipient's signed one-click URL (leaving ``topic``, or all the tenant's bulk mail)."""
        return unsubscribe_url(self.base_url, self.tokens.sign(UnsubscribeTarget(tenant_id, email, campaign_id,
                                                                                 topic)))


@dataclass(frozen=True)
class _Attachment:
    attachment_id: str
    s3_key: str
    filename: str
    content_type: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class _Ready:
    """A recipient rendered and ready to queue: its row, content, headers and, when it travels unrendered, its
    placeholder values."""

    row: dict[str, Any]
    content: RenderedContent
    headers: dict[str, str]
    values: dict[str, str] | None
    substitution: Substitution | None


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk did."""

    campaign_id: str
    queued: int
    suppressed: int
    render_failed: int
    paused_for_credits: bool = False
    message_class: str = ""
    """The class of the campaign's emails (empty when the chunk queued none)."""


def _render_failure_events(message_id: str, tenant_id: str, campaign_id: str, spec: CampaignSpec,
                           message_class: MessageClass, row: dict[str, Any], failure: RenderFailure,
                           at: Any) -> tuple[queue_pb2.EventEnvelope, queue_pb2.EventEnvelope]:
    """The ACCEPTED and final FAILED events of a recipient whose email could not be rendered: it holds no credit
    (the ledger finds no hold to release) and reports shows it failed, with the reason."""
    task = queue_pb2.SendTask(message_id=message_id, tenant_id=tenant_id, message_class=message_class.proto,
                              subject=spec.subject, campaign_id=campaign_id)
    _address(getattr(task, "from"), spec.sender)
    _address(task.to.add(), Mailbox(row["email"], row["name"]))
    if spec.tags:
        task.tags.extend(spec.tags)
    if spec.metadata:
        task.metadata.update(spec.metadata)
    task.accepted_time.CopyFrom(at)
    accepted = accepted_event(task, message_resource(task, credits=0, campaign_id=campaign_id))
    failed = queue_pb2.EventEnvelope(tenant_id=tenant_id, message_id=message_id, final=True,
                                     message_class=task.message_class, hold_id=message_id)
    event = failed.event
    event.event_id = f"{message_id}:failed"
    event.message = f"messages/{message_id}"
    event.type = messages_pb2.MESSAGE_EVENT_TYPE_FAILED
    event.reason = f"{failure.reason.value}: {failure.message}"
    event.event_time.CopyFrom(at)
    event.attributes["reason_code"] = failure.reason.value
    if failure.field:
        event.attributes["field"] = failure.field
    if failure.variable:
        event.attributes["variable"] = failure.variable
    return accepted, failed


def _address(field: Any, box: Mailbox) -> None:
    field.email = box.email
    if box.name:
        field.name = box.name


class Expansion:
    """Expands running campaigns, one chunk per call of :meth:`expand_next`."""

    def __init__(self, pool: AsyncConnectionPool, redis: Redis, holds: CreditHolds, topology: Topology, *,
                 namespace: str, on_commit: Any, unsubscribe: UnsubscribeLinks | None, chunk_size: int = 500,
                 hold_ttl_s: int = 7 * 86_400) -> None:
        self.pool = pool
        self.redis = redis
        self.holds = holds
        self.topology = topology
        self.namespace = namespace
        self.on_commit = on_commit
        """Receives the committed outbox rows (the outbox publisher's ``publish_soon``)."""
        self.unsubscribe = unsubscribe
        self.chunk_size = chunk_size
        self.hold_ttl_s = hold_ttl_s
        self._templates: OrderedDict[str, CampaignTemplates] = OrderedDict()
        self._substitutions: dict[str, Substitution | None] = {}
        self.substitute = True
        """Send plain-substitution campaigns unrendered (off: render every email, for comparison)."""

    def _compiled(self, campaign_id: str, spec: CampaignSpec) -> CampaignTemplates:
        templates = self._templates.get(campaign_id)
        if templates is None:
            templates = compile_spec(spec)
            self._templates[campaign_id] = templates
            while len(self._templates) > TEMPLATE_CACHE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(campaign_id)
        return templates

    def _substitution(self, campaign_id: str, templates: CampaignTemplates) -> Substitution | None:
        if not self.substitute:
            return None
        if campaign_id not in self._substitutions:
            if len(self._substitutions) > TEMPLATE_CACHE:
                self._substitutions.clear()
            self._substitutions[campaign_id] = Substitution.of(templates)
        return self._substitutions[campaign_id]

    async def expand_next(self) -> ChunkResult | None:
        """Expand one chunk of the campaign that waited longest; None when no campaign has work now."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, tenant_id, spec, state, next_row, last_row FROM campaigns.campaigns
                   WHERE (state = 'running' OR (state = 'paused' AND pause_reason = 'insufficient_credits'))
                     AND next_row <= last_row AND (not_before IS NULL OR not_before <= now())
                   ORDER BY updated_at LIMIT 1 FOR UPDATE SKIP LOCKED""")
            campaign = await cur.fetchone()
            if campaign is None:
                return None
            # A trace per chunk: its emails' outbox rows carry it, so their sends and events join it.
            with _tracer.start_as_current_span("expand campaign chunk",
                                               attributes={"esp.campaign_id": campaign["id"]}):
                result, committed = await self._expand(conn, campaign)
        if result.queued:  # counted once the transaction committed them
            QUEUED.labels(result.message_class).inc(result.queued)
        if committed:
            self.on_commit(committed)  # committed: publish now rather than at the outbox's next pass
        return result

    async def _expand(self, conn: AsyncConnection[Any],
                      campaign: dict[str, Any]) -> tuple[ChunkResult, list[CommittedRow]]:
        campaign_id, tenant_id = campaign["id"], campaign["tenant_id"]
        spec = CampaignSpec.from_json(campaign["spec"])
        message_class = MessageClass(spec.message_class)
        limit = self.chunk_size
        if spec.send_rate > 0:
            limit = max(1, min(limit, math.ceil(spec.send_rate)))
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            """SELECT row_number, email, name, variables FROM campaigns.recipients
               WHERE campaign_id = %s AND row_number >= %s ORDER BY row_number LIMIT %s""",
            (campaign_id, campaign["next_row"], limit))
        rows = await cur.fetchall()
        if not rows:  # only dropped duplicates were left behind the cursor
            await conn.execute("UPDATE campaigns.campaigns SET next_row = last_row + 1, updated_at = now() "
                               "WHERE id = %s", (campaign_id,))
            return ChunkResult(campaign_id, 0, 0, 0), []
        suppressed = await suppressed_among(self.redis, self.namespace, tenant_id, [r["email"] for r in rows],
                                            message_class, spec.unsubscribe_topic)
        templates = self._compiled(campaign_id, spec)
        attachments = await self._attachments(conn, tenant_id, spec.attachment_ids)
        attachment_bytes = sum(a.size_bytes for a in attachments)
        one_click = (self.unsubscribe is not None and spec.one_click_unsubscribe
                     and message_class is MessageClass.BULK)
        substitution = self._substitution(campaign_id, templates)
        to_queue: list[_Ready] = []
        failures: list[tuple[dict[str, Any], RenderFailure]] = []
        for row in rows:
            if row["email"] in suppressed:
                continue
            url: str | None = None
            headers: dict[str, str] = {}
            if one_click:
                assert self.unsubscribe is not None
                url = self.unsubscribe.url(tenant_id, campaign_id, row["email"], spec.unsubscribe_topic)
                headers = list_unsubscribe_headers(url, spec.unsubscribe_mailto)
            context = templates.context(row["variables"] or {}, unsubscribe_url=url)
            rendered = context if isinstance(context, RenderFailure) else templates.render_context(context)
            if isinstance(rendered, RenderFailure):
                failures.append((row, rendered))
                continue
            values = None
            if substitution is not None:
                assert not isinstance(context, RenderFailure)
                values = substitution.values(context, rendered, url)
            to_queue.append(_Ready(row, rendered, headers, values, substitution if values is not None else None))
        # Credits: one hold per email; stop at the first refusal.
        results = await self.holds.reserve(
            tenant_id, message_class,
            [(campaign_message_id(campaign_id, r.row["row_number"]), attachment_bytes) for r in to_queue],
            self.hold_ttl_s)
        held = len(results)
        refusal: EspError | None = None
        for i, result in enumerate(results):
            if isinstance(result, Exception):
                held = i
                refusal = result if isinstance(result, EspError) else None
                if not isinstance(result, FailedPrecondition):
                    raise result  # the ledger is unwell: the chunk is retried, nothing was written
                break
        for i in range(held + 1, len(results)):
            if not isinstance(results[i], Exception):  # held after an earlier refusal: not queued in this chunk
                await self.holds.release(campaign_message_id(campaign_id, to_queue[i].row["row_number"]),
                                         "campaign chunk stopped at a refused hold")
        queued = to_queue[:held]
        stop_row = to_queue[held].row["row_number"] if held < len(to_queue) else None
        # Everything before the stop row is done: queued, suppressed or failed to render.
        done_rows = [r for r in rows if stop_row is None or r["row_number"] < stop_row]
        done_numbers = {r["row_number"] for r in done_rows}
        n_suppressed = sum(1 for r in done_rows if r["email"] in suppressed)
        failed = [(row, failure) for row, failure in failures if row["row_number"] in done_numbers]
        amounts = [r for r in results[:held] if not isinstance(r, Exception)]
        committed = await self._queue(conn, campaign_id, tenant_id, spec, message_class, queued, attachments, amounts,
                                      failed)
        next_row = stop_row if stop_row is not None else rows[-1]["row_number"] + 1
        sets = ["next_row = %s", "expanded = expanded + %s", "queued = queued + %s", "suppressed = suppressed + %s",
                "render_failed = render_failed + %s", "updated_at = now()"]
        args: list[Any] = [next_row, len(done_rows), len(queued), n_suppressed, len(failed)]
        now = datetime.now(UTC)
        newly_paused = refusal is not None and campaign["state"] == "running"
        if refusal is not None:
            log.info("campaign %s paused: credits refused (%s)", campaign_id, refusal.reason)
            sets += ["state = 'paused'", "pause_reason = %s", "not_before = %s"]
            args += [PauseReason.INSUFFICIENT_CREDITS.value, now + timedelta(seconds=CREDIT_RETRY_S)]
            if newly_paused:  # not when a campaign paused for credits already is refused again
                sets.append("pauses = pauses + 1")
        else:
            if campaign["state"] == "paused":  # credits are back: resume by itself
                sets += ["state = 'running'", "pause_reason = ''"]
            if spec.send_rate > 0:
                sets.append("not_before = %s")
                args.append(now + timedelta(seconds=len(rows) / spec.send_rate))
        updated = await conn.execute(
            f"UPDATE campaigns.campaigns SET {', '.join(sets)} WHERE id = %s RETURNING pauses", (*args, campaign_id))
        if newly_paused:
            pauses = (await updated.fetchone() or (0,))[0]
            committed.append(await queue_event(conn, paused_event(
                self.topology, tenant_id, campaign_id, PauseReason.INSUFFICIENT_CREDITS, pauses, at=now)))
        return ChunkResult(campaign_id, len(queued), n_suppressed, len(failed),
                           paused_for_credits=refusal is not None, message_class=message_class), committed

    async def _attachments(self, conn: AsyncConnection[Any], tenant_id: str,
                           attachment_ids: Sequence[str]) -> list[_Attachment]:
        # The attachment catalog is ingest's table; campaigns only read it (the ids were checked at create).
        if not attachment_ids:
            return []
        cur = await conn.execute(
            """SELECT id, s3_key, filename, content_type, size_bytes FROM ingest.attachments
               WHERE tenant_id = %s AND id = ANY(%s)""", (tenant_id, list(attachment_ids)))
        found = {r[0]: _Attachment(*r) for r in await cur.fetchall()}
        return [found[a] for a in attachment_ids if a in found]

    async def _queue(self, conn: AsyncConnection[Any], campaign_id: str, tenant_id: str, spec: CampaignSpec,
                     message_class: MessageClass,
                     queued: Sequence[_Ready],
                     attachments: Sequence[_Attachment], credits: Sequence[int],
                     failed: Sequence[tuple[dict[str, Any], RenderFailure]]) -> list[CommittedRow]:
        if not queued and not failed:
            return []
        now_ts = to_timestamp(datetime.now(UTC))
        send_subject = self.topology.send_subject(message_class.value)
        events_subject = self.topology.events_subject(tenant_id)
        subjects: list[str] = []
        msg_ids: list[str] = []
        payloads: list[bytes] = []
        for ready, amount in zip(queued, credits, strict=True):
            message_id = campaign_message_id(campaign_id, ready.row["row_number"])
            task = self._send_task(message_id, tenant_id, campaign_id, spec, message_class, ready, attachments, now_ts)
            message = message_resource(task, credits=amount, campaign_id=campaign_id, subject=ready.content.subject)
            event = accepted_event(task, message)
            subjects += [send_subject, events_subject]
            msg_ids += [message_id, event.event.event_id]
            payloads += [task.SerializeToString(), event.SerializeToString()]
        for row, failure in failed:
            # Not queued: a message the customer can find (GetMessage, ListMessages) failed with its reason.
            for envelope in _render_failure_events(campaign_message_id(campaign_id, row["row_number"]), tenant_id,
                                                   campaign_id, spec, message_class, row, failure, now_ts):
                subjects.append(self.topology.events_subject(tenant_id, final=envelope.final))
                msg_ids.append(envelope.event.event_id)
                payloads.append(envelope.SerializeToString())
        # Ids taken first, then one binary COPY: adapting the payloads as array parameters cost more than all the
        # rendering (psycopg's array dumper, in Python).
        cur = await conn.execute("SELECT nextval('campaigns.outbox_id_seq') FROM generate_series(1, %s)",
                                 (len(subjects),))
        ids = [row[0] for row in await cur.fetchall()]
        traceparent = current_traceparent()
        async with conn.cursor().copy(
                "COPY campaigns.outbox (id, subject, msg_id, payload, traceparent) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "text", "bytea", "text"])
            for record in zip(ids, subjects, msg_ids, payloads, strict=True):
                await copy.write_row((*record, traceparent or None))
        return [CommittedRow(i, OutboxRow(s, m, p, traceparent=traceparent))
                for i, s, m, p in zip(ids, subjects, msg_ids, payloads, strict=True)]

    @staticmethod
    def _send_task(message_id: str, tenant_id: str, campaign_id: str, spec: CampaignSpec,
                   message_class: MessageClass, ready: _Ready, attachments: Sequence[_Attachment],
                   accepted: Any) -> queue_pb2.SendTask:
        content, headers, row = ready.content, ready.headers, ready.row
        task = queue_pb2.SendTask(message_id=message_id, tenant_id=tenant_id, message_class=message_class.proto,
                                  subject=content.subject, text_body=content.text or "",
                                  html_body=content.html or "", campaign_id=campaign_id,
                                  topic=spec.unsubscribe_topic)
        if ready.substitution is not None and ready.values is not None:
            # Unrendered: the provider (or the sender) fills the placeholders in, and the campaign's emails can
            # share a batch call. The message's summary (ACCEPTED event) keeps the rendered subject.
            task.subject = ready.substitution.subject
            task.text_body = ready.substitution.text or ""
            task.html_body = ready.substitution.html or ""
            task.recipient_variables.update(ready.values)
            url = ready.values.get("unsubscribe_url")
            if url is not None and "List-Unsubscribe" in headers:
                headers = {**headers, "List-Unsubscribe": headers["List-Unsubscribe"].replace(
                    f"<{url}>", f"<{UNSUBSCRIBE_PLACEHOLDER}>", 1)}
        _address(getattr(task, "from"), spec.sender)
        _address(task.to.add(), Mailbox(row["email"], row["name"]))
        for box in spec.reply_to:
            _address(task.reply_to.add(), box)
        if spec.headers or headers:
            task.headers.update({**spec.headers, **headers})
        if spec.tags:
            task.tags.extend(spec.tags)
        if spec.metadata:
            task.metadata.update(spec.metadata)
        # The size providers will see: the rendered email's, even when it travels unrendered.
        body = len(content.subject.encode()) + len((content.text or "").encode()) + len((content.html or "").encode())
        carried = 0
        for a in attachments:
            task.attachments.add(attachment_id=a.attachment_id, s3_key=a.s3_key, filename=a.filename,
                                 content_type=a.content_type, size_bytes=a.size_bytes)
            carried += (a.size_bytes + 2) // 3 * 4 * 78 // 76
        task.message_bytes = 2048 + body * 4 // 3 + carried
        task.accepted_time.CopyFrom(accepted)
        return task
