"""gRPC wiring of the campaigns service: protobuf ↔ domain translation, and the service's parts.

Serves ``esp.v1.CampaignService``. The ingest edge authenticates callers and forwards these RPCs with the caller in
metadata; every call is confined to the caller's tenant (another tenant's campaign is NOT_FOUND). Expansion runs in
the expander worker (:mod:`services.campaigns.expander`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from esp.v1 import campaigns_pb2, campaigns_pb2_grpc, common_pb2
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common import db
from libs.common.auth import TrustedHeaderAuthenticator, current_tenant
from libs.common.campaign_halts import Halt, clear_halt, set_halt
from libs.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from libs.common.grpc_client import open_channel
from libs.common.grpc_server import BackgroundTask, ServiceApp
from libs.common.jetstream import Topology, connect
from libs.common.message_classes import MessageClass
from libs.common.outbox import OutboxPublisher
from libs.common.pagination import checked_page_token, page_size
from libs.common.recipient_lists import RecipientFormat, RowError
from libs.common.redis import create_redis
from libs.common.resource_names import MAX_ID_CHARS, checked_text, resource_id
from libs.common.s3 import create_s3_client, stream_object
from libs.common.sending_domains import SendingDomains
from libs.common.sending_domains import open_bucket as open_domains_bucket
from libs.common.suppressions import suppressed_among
from libs.common.timestamps import to_timestamp
from libs.common.verified_senders import VerifiedSenders
from libs.common.workers import WorkerSpec, start_or_inline, worker_env
from services.campaigns.clients import CampaignStats, LedgerHolds, ReportsStats
from services.campaigns.config import CampaignsSettings
from services.campaigns.expander import build_expander
from services.campaigns.model import Action, CampaignRecord, CampaignState, PauseReason, Progress
from services.campaigns.recipients import Recipient, parse_recipients, validate_recipient
from services.campaigns.requests import spec_from_proto
from services.campaigns.store import CampaignStore

__all__ = ["CampaignServicer", "build_app"]

SEND, READ = "send", "read"
MAX_ERRORS_SHOWN = 100
INSERT_BATCH = 1000
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
RATE_WINDOW_S = 30.0

_STATES = {
    CampaignState.DRAFT: campaigns_pb2.CAMPAIGN_STATE_DRAFT,
    CampaignState.SCHEDULED: campaigns_pb2.CAMPAIGN_STATE_SCHEDULED,
    CampaignState.RUNNING: campaigns_pb2.CAMPAIGN_STATE_RUNNING,
    CampaignState.PAUSED: campaigns_pb2.CAMPAIGN_STATE_PAUSED,
    CampaignState.COMPLETED: campaigns_pb2.CAMPAIGN_STATE_COMPLETED,
    CampaignState.CANCELLED: campaigns_pb2.CAMPAIGN_STATE_CANCELLED,
}
_STATE_OF = {v: k for k, v in _STATES.items()}
_REASONS = {
    PauseReason.NONE: campaigns_pb2.PAUSE_REASON_UNSPECIFIED,
    PauseReason.BY_CUSTOMER: campaigns_pb2.PAUSE_REASON_BY_CUSTOMER,
    PauseReason.INSUFFICIENT_CREDITS: campaigns_pb2.PAUSE_REASON_INSUFFICIENT_CREDITS,
    PauseReason.SEND_WINDOW_CLOSED: campaigns_pb2.PAUSE_REASON_SEND_WINDOW_CLOSED,
}


def _campaign_id(name: str, field: str = "name") -> str:
    return resource_id(name, "campaigns", field)


def _address(email: str, name: str) -> common_pb2.EmailAddress:
    return common_pb2.EmailAddress(email=email, name=name)


class RateMeter:
    """A campaign's current send rate from the sent counts this replica saw over the last ``RATE_WINDOW_S``."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, campaign_id: str, sent: int) -> float:
        """Emails sent per second lately (0 until two samples a second apart exist)."""
        now = time.monotonic()
        samples = self._samples.setdefault(campaign_id, deque())
        samples.append((now, sent))
        while samples and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        if len(self._samples) > 10_000:
            self._samples.pop(next(iter(self._samples)))
        first_t, first_sent = samples[0]
        return (sent - first_sent) / (now - first_t) if now - first_t >= 1.0 else 0.0


def progress_of(record: CampaignRecord, stats: CampaignStats, rate: float) -> Progress:
    """A campaign's progress: its own counts plus reports' counts of its emails."""
    counts = record.counts
    # Render failures are messages too (failed at expansion, with a FAILED event): reports counts them as final.
    queued = max(0, counts.get("queued", 0) + counts.get("render_failed", 0) - stats.final)
    pending = record.pending if record.state is not CampaignState.CANCELLED else 0
    eta = None
    if record.state is CampaignState.RUNNING and rate > 0:
        eta = datetime.now(UTC) + timedelta(seconds=(pending + queued) / rate)
    return Progress(
        recipients=counts.get("recipients", 0), duplicates=counts.get("duplicates", 0),
        invalid=counts.get("invalid", 0), pending=pending, queued=queued, sent=stats.sent,
        delivered=stats.delivered, bounced=stats.bounced, complained=stats.complained,
        failed=stats.failed, suppressed=counts.get("suppressed", 0),
        cancelled=counts.get("cancelled", 0) + stats.cancelled, send_rate=rate, estimated_end_time=eta)


def campaign_to_proto(record: CampaignRecord, progress: Progress) -> campaigns_pb2.Campaign:
    """The public Campaign."""
    s = record.spec
    c = campaigns_pb2.Campaign(
        name=record.name, id=record.id, display_name=s.display_name, state=_STATES[record.state],
        subject=s.subject, text_body=s.text_body, html_body=s.html_body, headers=dict(s.headers),
        tags=list(s.tags), attachment_ids=list(s.attachment_ids), metadata=dict(s.metadata),
        default_variables=dict(s.default_variables),
        missing_variable_policy=campaigns_pb2.MissingVariablePolicy.Value(
            f"MISSING_VARIABLE_POLICY_{s.missing_variable_policy}"),
        message_class=MessageClass(s.message_class).proto, send_rate=s.send_rate,
        pause_reason=_REASONS[record.pause_reason])
    getattr(c, "from").CopyFrom(_address(s.sender.email, s.sender.name))
    c.reply_to.extend(_address(b.email, b.name) for b in s.reply_to)
    if s.send_time is not None:
        c.send_time.CopyFrom(to_timestamp(s.send_time))
    if s.send_window is not None:
        c.send_window.CopyFrom(campaigns_pb2.SendWindow(start_minute=s.send_window.start_minute,
                                                        end_minute=s.send_window.end_minute,
                                                        time_zone=s.send_window.time_zone))
    mode = campaigns_pb2.UNSUBSCRIBE_MODE_ONE_CLICK if s.one_click_unsubscribe else campaigns_pb2.UNSUBSCRIBE_MODE_NONE
    c.unsubscribe.CopyFrom(campaigns_pb2.UnsubscribePolicy(mode=mode, mailto=s.unsubscribe_mailto,
                                                           topic=s.unsubscribe_topic))
    p = progress
    c.progress.CopyFrom(campaigns_pb2.CampaignProgress(
        recipients=p.recipients, duplicates=p.duplicates, invalid=p.invalid, pending=p.pending, queued=p.queued,
        sent=p.sent, delivered=p.delivered, bounced=p.bounced, complained=p.complained, failed=p.failed,
        suppressed=p.suppressed, cancelled=p.cancelled, send_rate=p.send_rate))
    if p.estimated_end_time is not None:
        c.progress.estimated_end_time.CopyFrom(to_timestamp(p.estimated_end_time))
    c.create_time.CopyFrom(to_timestamp(record.created_at))
    c.update_time.CopyFrom(to_timestamp(record.updated_at))
    if record.started_at is not None:
        c.start_time.CopyFrom(to_timestamp(record.started_at))
    if record.ended_at is not None:
        c.end_time.CopyFrom(to_timestamp(record.ended_at))
    return c


@dataclass
class _Upload:
    """Counts of one recipients upload (stream or import)."""

    added: int = 0
    rejected: int = 0
    duplicates: int = 0
    suppressed: int = 0

    def __post_init__(self) -> None:
        self.errors: list[campaigns_pb2.RecipientError] = []

    def reject(self, error: RowError, address: str = "") -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(campaigns_pb2.RecipientError(row=error.row_number, address=address,
                                                            reason=str(error)))

    def response(self) -> campaigns_pb2.AddCampaignRecipientsResponse:
        return campaigns_pb2.AddCampaignRecipientsResponse(
            added_count=self.added, rejected_count=self.rejected, duplicate_count=self.duplicates,
            suppressed_count=self.suppressed, errors=self.errors)


class CampaignServicer(campaigns_pb2_grpc.CampaignServiceServicer):
    """``esp.v1.CampaignService`` over the store."""

    def __init__(self, store: CampaignStore, redis: Redis, ledger: LedgerHolds, stats: ReportsStats, s3: Any,
                 bucket: str, *, namespace: str, one_click_ready: bool, max_import_bytes: int,
                 senders: VerifiedSenders) -> None:
        self.store = store
        self.redis = redis
        self.ledger = ledger
        self.stats = stats
        self.s3 = s3
        self.bucket = bucket
        self.namespace = namespace
        self.one_click_ready = one_click_ready
        self.max_import_bytes = max_import_bytes
        self.senders = senders
        """A campaign's sender must be on a verified domain of its tenant (or the sandbox), at create and start."""
        self.rates = RateMeter()

    async def _proto(self, record: CampaignRecord) -> campaigns_pb2.Campaign:
        stats = (await self.stats.of_campaign(record.tenant_id, record.id)
                 if record.counts.get("queued", 0) or record.counts.get("render_failed", 0) else CampaignStats())
        return campaign_to_proto(record, progress_of(record, stats, self.rates.rate(record.id, stats.sent)))

    async def CreateCampaign(self, request: campaigns_pb2.CreateCampaignRequest,
                             context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """A new draft (templates compiled now: a syntax error is INVALID_ARGUMENT with line and column)."""
        tenant_id = current_tenant(SEND)
        if not request.HasField("campaign"):
            raise InvalidArgument("campaign is required", field_violations=[FieldViolation("campaign", "required")])
        spec = spec_from_proto(request.campaign)
        if spec.one_click_unsubscribe and not self.one_click_ready:
            raise FailedPrecondition("one-click unsubscribe is not configured on this mesh (ESP_PUBLIC_BASE_URL and "
                                     "ESP_UNSUBSCRIBE_KEYS)", reason="UNSUBSCRIBE_NOT_CONFIGURED")
        await self._check_attachments(tenant_id, spec.attachment_ids)
        await self.senders.check(tenant_id, spec.sender.email)
        request_id = checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        record = await self.store.create(uuid.uuid4().hex, tenant_id, request_id, spec)
        return await self._proto(record)

    async def _check_attachments(self, tenant_id: str, attachment_ids: tuple[str, ...]) -> None:
        if not attachment_ids:
            return
        async with self.store.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM ingest.attachments WHERE tenant_id = %s AND id = ANY(%s)",
                                     (tenant_id, list(attachment_ids)))
            found = {r[0] for r in await cur.fetchall()}
        missing = [a for a in attachment_ids if a not in found]
        if missing:
            raise NotFound(f"unknown attachments: {', '.join(missing)}", reason="ATTACHMENT_NOT_FOUND",
                           metadata={"attachment_ids": ",".join(missing)})

    async def GetCampaign(self, request: campaigns_pb2.GetCampaignRequest,
                          context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """The campaign with its progress."""
        tenant_id = current_tenant(READ)
        return await self._proto(await self.store.get(tenant_id, _campaign_id(request.name)))

    async def ListCampaigns(self, request: campaigns_pb2.ListCampaignsRequest,
                            context: grpc.aio.ServicerContext) -> campaigns_pb2.ListCampaignsResponse:
        """A page of the tenant's campaigns, newest first, optionally in one state."""
        tenant_id = current_tenant(READ)
        size = page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        state = _STATE_OF.get(request.state) if request.state else None
        records, token = await self.store.list(tenant_id, state=state, page_size=size,
                                               page_token=checked_page_token(request.page_token))
        campaigns = await asyncio.gather(*(self._proto(r) for r in records))
        return campaigns_pb2.ListCampaignsResponse(campaigns=campaigns, next_page_token=token)

    async def _add(self, tenant_id: str, campaign_id: str, message_class: MessageClass, topic: str,
                   upload: _Upload, recipients: list[Recipient], invalid: int) -> None:
        added = await self.store.add_recipients(tenant_id, campaign_id, recipients, invalid=invalid)
        upload.added += added.added
        upload.duplicates += added.duplicates
        if recipients:
            suppressed = await suppressed_among(self.redis, self.namespace, tenant_id,
                                                [r.email for r in recipients], message_class, topic)
            upload.suppressed += len(suppressed)

    async def AddCampaignRecipients(self, request_iterator: AsyncIterator[campaigns_pb2.AddCampaignRecipientsRequest],
                                    context: grpc.aio.ServicerContext) -> campaigns_pb2.AddCampaignRecipientsResponse:
        """Recipients streamed in frames, inserted a thousand at a time (never all in memory)."""
        tenant_id = current_tenant(SEND)
        upload = _Upload()
        campaign_id = ""
        message_class = MessageClass.BULK
        topic = ""
        batch: list[Recipient] = []
        invalid = 0
        row = 0
        async for frame in request_iterator:
            if not campaign_id:
                campaign_id = _campaign_id(frame.campaign, "campaign")
                record = await self.store.get(tenant_id, campaign_id)
                message_class = MessageClass(record.spec.message_class)
                topic = record.spec.unsubscribe_topic
            elif frame.campaign and frame.campaign != f"campaigns/{campaign_id}":
                raise InvalidArgument("every frame must name the same campaign",
                                      field_violations=[FieldViolation("campaign", "differs from the first frame")])
            for r in frame.recipients:
                row += 1
                checked = validate_recipient(row, r.address.email, r.address.name, dict(r.variables))
                if isinstance(checked, RowError):
                    upload.reject(checked, r.address.email[:320])
                    invalid += 1
                else:
                    batch.append(checked)
                if len(batch) + invalid >= INSERT_BATCH:
                    await self._add(tenant_id, campaign_id, message_class, topic, upload, batch, invalid)
                    batch, invalid = [], 0
        if not campaign_id:
            raise InvalidArgument("the first frame must name the campaign",
                                  field_violations=[FieldViolation("campaign", "required")])
        if batch or invalid:
            await self._add(tenant_id, campaign_id, message_class, topic, upload, batch, invalid)
        return upload.response()

    async def ImportCampaignRecipients(self, request: campaigns_pb2.ImportCampaignRecipientsRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> campaigns_pb2.AddCampaignRecipientsResponse:
        """Recipients read from an uploaded CSV or JSON Lines object, streamed from S3."""
        tenant_id = current_tenant(SEND)
        campaign_id = _campaign_id(request.campaign, "campaign")
        record = await self.store.get(tenant_id, campaign_id)
        attachment_id = checked_text(request.attachment_id.removeprefix("attachments/"), "attachment_id",
                                     max_chars=MAX_ID_CHARS)
        async with self.store.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT s3_key, filename, content_type, size_bytes FROM ingest.attachments
                   WHERE tenant_id = %s AND id = %s""", (tenant_id, attachment_id))
            found = await cur.fetchone()
        if found is None:
            raise NotFound(f"attachments/{attachment_id} not found", reason="ATTACHMENT_NOT_FOUND")
        s3_key, filename, content_type, size = found
        if size > self.max_import_bytes:
            raise InvalidArgument(f"the file is larger than {self.max_import_bytes} bytes",
                                  field_violations=[FieldViolation("attachment_id", "too large", "TOO_LARGE")])
        fmt = _format(request.format, filename, content_type)
        upload = _Upload()
        message_class = MessageClass(record.spec.message_class)
        topic = record.spec.unsubscribe_topic
        async for batch in parse_recipients(stream_object(self.s3, self.bucket, s3_key), fmt,
                                            batch_size=INSERT_BATCH):
            for error in batch.errors:
                upload.reject(error)
            await self._add(tenant_id, campaign_id, message_class, topic, upload, list(batch.recipients),
                            len(batch.errors))
        return upload.response()

    async def _transition(self, name: str, action: Action, request_id: str,
                          halt: Callable[[str], Awaitable[None]] | None) -> campaigns_pb2.Campaign:
        tenant_id = current_tenant(SEND)
        campaign_id = _campaign_id(name)
        request_id = checked_text(request_id, "request_id", max_chars=MAX_ID_CHARS)
        record, _ = await self.store.transition(tenant_id, campaign_id, action, request_id)
        if halt is not None:
            # After the commit: senders see it within REFRESH_S. Repeated on a repeat (the earlier call may have
            # failed between the commit and this write); the expander's mirror sync is the backstop.
            await halt(campaign_id)
        return await self._proto(record)

    async def StartCampaign(self, request: campaigns_pb2.StartCampaignRequest,
                            context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """Draft → scheduled or running; refused without recipients or without credits."""
        tenant_id = current_tenant(SEND)
        record = await self.store.get(tenant_id, _campaign_id(request.name))
        if record.state is CampaignState.DRAFT:
            # Checked again: the domain may have stopped verifying (or been removed) since the create.
            await self.senders.check(tenant_id, record.spec.sender.email)
            if record.counts.get("recipients", 0) == 0:
                raise FailedPrecondition("the campaign has no recipients; add some first", reason="NO_RECIPIENTS",
                                         metadata={"state": record.state.value.upper()})
            if await self.ledger.available(tenant_id) <= 0:
                raise FailedPrecondition("no credits left to send with; top up first",
                                         reason="INSUFFICIENT_CREDITS", metadata={"state": "DRAFT"})
        return await self._transition(request.name, Action.START, request.request_id, None)

    async def PauseCampaign(self, request: campaigns_pb2.PauseCampaignRequest,
                            context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """Scheduled or running → paused by the customer; senders stop its emails within a second."""
        return await self._transition(request.name, Action.PAUSE, request.request_id,
                                      lambda c: set_halt(self.redis, c, Halt.PAUSED, namespace=self.namespace))

    async def ResumeCampaign(self, request: campaigns_pb2.ResumeCampaignRequest,
                             context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """Paused → running (or scheduled); parked emails go back to the send stream."""
        return await self._transition(request.name, Action.RESUME, request.request_id,
                                      lambda c: clear_halt(self.redis, c, namespace=self.namespace))

    async def CancelCampaign(self, request: campaigns_pb2.CancelCampaignRequest,
                             context: grpc.aio.ServicerContext) -> campaigns_pb2.Campaign:
        """→ cancelled: emails not yet handed to a provider are dropped and their credits released."""
        return await self._transition(request.name, Action.CANCEL, request.request_id,
                                      lambda c: set_halt(self.redis, c, Halt.CANCELLED, namespace=self.namespace))


def _format(fmt: int, filename: str, content_type: str) -> RecipientFormat:
    if fmt == campaigns_pb2.RECIPIENT_FORMAT_CSV:
        return RecipientFormat.CSV
    if fmt == campaigns_pb2.RECIPIENT_FORMAT_JSONL:
        return RecipientFormat.JSONL
    lowered = filename.lower()
    if lowered.endswith(".csv") or "csv" in content_type:
        return RecipientFormat.CSV
    if lowered.endswith((".jsonl", ".ndjson")) or "ndjson" in content_type or "jsonl" in content_type:
        return RecipientFormat.JSONL
    raise InvalidArgument("cannot tell the file's format from its name or content type; set format",
                          field_violations=[FieldViolation("format", "RECIPIENT_FORMAT_CSV or _JSONL", "REQUIRED")])


async def build_app(settings: CampaignsSettings) -> ServiceApp:
    """The campaigns service for ``serve()``: its RPCs, and the expander (a worker process unless configured
    otherwise)."""
    pool: AsyncConnectionPool = await db.create_pool(settings.postgres_dsn, min_size=1, max_size=8, name="campaigns")
    redis = create_redis(settings.redis_url)
    ledger, reports = open_channel(settings.ledger_addr), open_channel(settings.reports_addr)
    s3 = create_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key, settings.s3_secret_key)
    # Transitions write their notifications (campaign_paused) to the campaigns outbox: published from here after
    # each commit; rows left behind are taken by this publisher's or the expander's reconciling pass.
    nc = await connect(settings.nats_url, "esp-campaigns")
    outbox = OutboxPublisher(pool, nc, "campaigns.outbox")
    sending_domains = SendingDomains(await open_domains_bucket(nc.jetstream(), settings.namespace),
                                     sandbox_domains=settings.sandbox_domains)
    servicer = CampaignServicer(
        CampaignStore(pool, Topology(settings.namespace, replicas=settings.stream_replicas),
                      unpark_window_s=settings.unpark_window_s, on_commit=outbox.publish_soon),
        redis, LedgerHolds(ledger), ReportsStats(reports), s3, settings.s3_bucket, namespace=settings.namespace,
        one_click_ready=bool(settings.public_base_url and settings.unsubscribe_keys),
        max_import_bytes=settings.max_import_bytes, senders=VerifiedSenders(sending_domains))

    async def close_all() -> None:
        await ledger.close()
        await reports.close()
        await nc.drain()
        await redis.aclose()
        await pool.close()

    tasks: list[BackgroundTask] = [outbox.run, sending_domains.run]
    closers: list[Callable[[], Awaitable[None]]] = [close_all]
    expander = await start_or_inline(
        "campaigns", WorkerSpec("campaigns-expander", "services.campaigns.expander", worker_env(settings, 0)),
        lambda: build_expander(settings), in_process=not settings.expander_worker, grace_s=settings.shutdown_grace_s)
    tasks.extend(expander.tasks)
    closers.extend(expander.closers)
    return ServiceApp(
        name="campaigns", default_port=50056,
        servicers=[(campaigns_pb2_grpc.add_CampaignServiceServicer_to_server, servicer)],
        service_names=[campaigns_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name],
        tasks=tasks, closers=closers, authenticator=TrustedHeaderAuthenticator())
