"""gRPC wiring of the reports service: protobuf ↔ domain translation only.

Serves the read side of ``esp.v1.MessageService`` (GetMessage, ListMessages, ListMessageEvents; SendEmail and
BatchSendEmails belong to ingest and answer UNIMPLEMENTED here), ``esp.v1.StatsService`` and
``esp.v1.SuppressionService``. The ingest edge authenticates callers and forwards these RPCs with the caller in
metadata; every call is confined to the caller's tenant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from esp.v1 import (
    common_pb2,
    events_pb2,
    events_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
)
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.auth import current_principal, current_tenant
from libs.common.errors import EspError, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from libs.common.message_classes import class_name_of, proto_of
from libs.common.pagination import checked_page_token, page_size
from libs.common.resource_names import checked_text, resource_id
from services.reports.customer_events import customer_event
from services.reports.envelopes import event_type_name
from services.reports.event_listing import EventFilter, EventReader
from services.reports.exports import CSV_CONTENT_TYPE, csv_chunks, events_csv, export_filename, neutralise
from services.reports.models import (
    Mailbox,
    MessageEventRecord,
    MessageState,
    MessageStatus,
    Suppression,
    SuppressionReason,
)
from services.reports.provider_comparison import ProviderComparer
from services.reports.queries import MessageReader
from services.reports.rollups import Resolution
from services.reports.stats import (
    COMPLAINT_RATE_CRITICAL,
    COMPLAINT_RATE_WARNING,
    MAX_RANGE,
    METRICS,
    ComplaintRateStatus,
    StatsFigures,
    StatsQuery,
    StatsReader,
)
from services.reports.suppressions import SuppressionStore, split_suppression_id, suppression_id

READ_SCOPE = "read"
"""Scope needed to read messages, events, stats and suppressions."""
MANAGE_SUPPRESSIONS_SCOPE = "admin"
"""Scope needed to add or lift suppressions."""
DEFAULT_STATS_RANGE = timedelta(days=1)


class Unimplemented(EspError):
    """The method is served by another service."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _address(mailbox: Mailbox) -> common_pb2.EmailAddress:
    return common_pb2.EmailAddress(email=mailbox.email, name=mailbox.name)


def message_to_proto(message: MessageStatus) -> messages_pb2.Message:
    """The API view of a message."""
    proto = messages_pb2.Message(
        name=f"messages/{message.message_id}",
        id=message.message_id,
        message_class=proto_of(message.message_class),
        state=messages_pb2.MessageState.Value(f"MESSAGE_STATE_{message.state.value.upper()}"),
        to=[_address(m) for m in message.to],
        cc=[_address(m) for m in message.cc],
        bcc=[_address(m) for m in message.bcc],
        subject=message.subject,
        tags=list(message.tags),
        metadata=dict(message.metadata),
        attachment_ids=list(message.attachment_ids),
        request_id=message.request_id,
        credits=message.credits,
        provider=message.provider,
        provider_message_id=message.provider_message_id,
        attempts=message.attempts,
        create_time=_timestamp(message.create_time),
        update_time=_timestamp(message.update_time),
        campaign=message.campaign,
    )
    if message.send_time is not None:
        proto.send_time.CopyFrom(_timestamp(message.send_time))
    if message.sender.email:
        getattr(proto, "from").CopyFrom(_address(message.sender))
    return proto


def event_to_proto(event: MessageEventRecord) -> messages_pb2.MessageEvent:
    """The API view of a timeline event."""
    outcome = (messages_pb2.AttemptOutcome.Value(f"ATTEMPT_OUTCOME_{event.outcome.upper()}")
               if event.outcome else messages_pb2.ATTEMPT_OUTCOME_UNSPECIFIED)
    return messages_pb2.MessageEvent(
        event_id=event.event_id,
        message=f"messages/{event.message_id}",
        type=event_type_name(event.event_type),
        event_time=_timestamp(event.event_time),
        provider=event.provider,
        provider_message_id=event.provider_message_id,
        recipient=event.recipient,
        reason=event.reason,
        attempt=event.attempt,
        outcome=outcome,
        latency_ms=event.latency_ms,
        bounce_type=event.bounce_type,
        url=event.url,
        attributes=dict(event.attributes),
    )


class MessageReadServicer(messages_pb2_grpc.MessageServiceServicer):
    """The read RPCs of MessageService."""

    def __init__(self, reader: MessageReader) -> None:
        self._reader = reader

    async def SendEmail(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Served by ingest."""
        raise Unimplemented("SendEmail is served by the ingest service")

    async def BatchSendEmails(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Served by ingest."""
        raise Unimplemented("BatchSendEmails is served by the ingest service")

    async def GetMessage(self, request: messages_pb2.GetMessageRequest,
                         context: grpc.aio.ServicerContext) -> messages_pb2.Message:
        """One message of the caller's tenant."""
        tenant_id = current_tenant(READ_SCOPE)
        message = await self._reader.get(tenant_id, resource_id(request.name, "messages", "name"))
        return message_to_proto(message)

    async def ListMessages(self, request: messages_pb2.ListMessagesRequest,
                           context: grpc.aio.ServicerContext) -> messages_pb2.ListMessagesResponse:
        """The caller's messages, newest first."""
        tenant_id = current_tenant(READ_SCOPE)
        state = None
        if request.state != messages_pb2.MESSAGE_STATE_UNSPECIFIED:
            try:
                name = messages_pb2.MessageState.Name(request.state)
            except ValueError as exc:
                raise InvalidArgument("unknown state", field_violations=[FieldViolation("state", "unknown")]) from exc
            state = MessageState(name.removeprefix("MESSAGE_STATE_").lower())
        page = await self._reader.list(tenant_id, page_size(request.page_size), checked_page_token(request.page_token),
                                       state=state, tag=checked_text(request.tag, "tag"))
        return messages_pb2.ListMessagesResponse(
            messages=[message_to_proto(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def ListMessageEvents(self, request: messages_pb2.ListMessageEventsRequest,
                                context: grpc.aio.ServicerContext) -> messages_pb2.ListMessageEventsResponse:
        """A message's timeline, oldest first."""
        tenant_id = current_tenant(READ_SCOPE)
        message_id = resource_id(request.parent, "messages", "parent")
        page = await self._reader.events(tenant_id, message_id, page_size(request.page_size),
                                         checked_page_token(request.page_token))
        return messages_pb2.ListMessageEventsResponse(
            events=[event_to_proto(e) for e in page.items], next_page_token=page.next_page_token
        )


# The first API's single grouping → (dimension, bucket).
_GROUPINGS: dict[int, tuple[str | None, Resolution | None]] = {
    reports_pb2.STATS_GROUPING_UNSPECIFIED: (None, None),
    reports_pb2.STATS_GROUPING_DAY: (None, Resolution.DAY),
    reports_pb2.STATS_GROUPING_HOUR: (None, Resolution.HOUR),
    reports_pb2.STATS_GROUPING_PROVIDER: ("provider", None),
    reports_pb2.STATS_GROUPING_MESSAGE_CLASS: ("message_class", None),
    reports_pb2.STATS_GROUPING_TAG: ("tag", None),
    reports_pb2.STATS_GROUPING_CAMPAIGN: ("campaign", None),
}
_COMPLAINT_STATUSES = {
    ComplaintRateStatus.OK: reports_pb2.COMPLAINT_RATE_STATUS_OK,
    ComplaintRateStatus.WARNING: reports_pb2.COMPLAINT_RATE_STATUS_WARNING,
    ComplaintRateStatus.CRITICAL: reports_pb2.COMPLAINT_RATE_STATUS_CRITICAL,
}
_COUNT_FIELDS = ("accepted", "sent", "delivered", "deferred", "bounced", "bounced_hard", "bounced_soft", "failed",
                 "complained", "opened", "clicked", "unsubscribed", "cancelled", "suppressed", "provider_calls",
                 "provider_errors", "provider_throttled", "credits_charged", "provider_cost_micros")
_RATE_FIELDS = ("delivery_rate", "bounce_rate", "complaint_rate", "provider_error_rate", "provider_throttle_rate",
                "credits_per_delivered", "credits_per_thousand_delivered", "provider_cost_micros_per_delivered",
                "provider_cost_micros_per_thousand_delivered")
_LATENCY_FIELDS = ("send_latency", "delivery_latency", "provider_call_latency")


def _latency(figures: StatsFigures, name: str) -> reports_pb2.LatencyPercentiles:
    value = figures.latency(name)
    return reports_pb2.LatencyPercentiles(p50_ms=value.p50_ms, p95_ms=value.p95_ms, p99_ms=value.p99_ms,
                                          count=value.count)


def _stats_row(figures: StatsFigures, metrics: Sequence[str], key: str | None = None) -> reports_pb2.StatsRow:
    """The API view of one group: the metrics asked for set, the others left at zero."""
    row = reports_pb2.StatsRow(key=figures.key if key is None else key, dimensions=figures.dimensions)
    wanted = set(metrics)
    for name in _COUNT_FIELDS:
        if name in wanted:
            setattr(row, name, figures.count(name))
    for name in _RATE_FIELDS:
        if name in wanted:
            setattr(row, name, figures.rate(name))
    if "complaint_rate" in wanted:
        row.complaint_rate_status = _COMPLAINT_STATUSES[figures.complaint_rate_status()]
    for name in _LATENCY_FIELDS:
        if name in wanted:
            getattr(row, name).CopyFrom(_latency(figures, name))
    if "provider_call_latency" in wanted:
        row.latency_ms_p50, row.latency_ms_p99 = row.provider_call_latency.p50_ms, row.provider_call_latency.p99_ms
    return row


def _range(request: Any, *, default_length: timedelta) -> tuple[datetime, datetime]:
    end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else datetime.now(UTC)
    start = (request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time")
             else end - default_length)
    return start, end


class StatsServicer(reports_pb2_grpc.StatsServiceServicer):
    """StatsService."""

    def __init__(self, reader: StatsReader, comparer: ProviderComparer) -> None:
        self._reader = reader
        self._comparer = comparer

    def _query(self, request: reports_pb2.GetStatsRequest) -> StatsQuery:
        """The domain query of a request, confined to the caller's tenant (platform admins: any or all).

        The range defaults to the last day, or for one campaign's figures to the longest range allowed
        (``MAX_RANGE``), so that a campaign's totals need no start time: they read only its own rows.
        """
        principal = current_principal()
        principal.require(READ_SCOPE)
        tenant_id = principal.tenant_id
        if request.tenant:
            named = resource_id(request.tenant, "tenants", "tenant")
            if not principal.is_platform_admin and named != tenant_id:
                raise NotFound(f"tenant {named!r} not found", reason="TENANT_NOT_FOUND")
            tenant_id = named
        elif principal.is_platform_admin:
            tenant_id = ""  # every tenant: the platform view
        grouping = _GROUPINGS.get(request.group_by)
        if grouping is None:
            raise InvalidArgument("unknown group_by", field_violations=[FieldViolation("group_by", "unknown")])
        dimension, bucket = grouping
        if (dimension or bucket) and (request.dimensions or request.bucket):
            raise InvalidArgument("group_by cannot be combined with dimensions or bucket",
                                  field_violations=[FieldViolation("group_by", "use dimensions and bucket instead")])
        if request.bucket:
            try:
                bucket = Resolution(request.bucket)
            except ValueError:
                raise InvalidArgument(
                    f"unknown bucket {request.bucket!r}; known: {', '.join(r.value for r in Resolution)}",
                    field_violations=[FieldViolation("bucket", "minute, hour, day or empty")]) from None
        campaign_id = resource_id(request.campaign, "campaigns", "campaign") if request.campaign else ""
        start, end = _range(request, default_length=MAX_RANGE if campaign_id else DEFAULT_STATS_RANGE)
        return StatsQuery(
            tenant_id=tenant_id, start=start, end=end,
            dimensions=(dimension,) if dimension else tuple(request.dimensions), bucket=bucket,
            metrics=tuple(request.metrics), platform_admin=principal.is_platform_admin,
            message_class=class_name_of(request.message_class), campaign_id=campaign_id,
            provider=checked_text(request.provider, "provider"), tag=checked_text(request.tag, "tag"),
            mailbox_provider=checked_text(request.mailbox_provider, "mailbox_provider"),
        )

    async def GetStats(self, request: reports_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> reports_pb2.GetStatsResponse:
        """Figures over a time range, cut by the dimensions and bucket asked for."""
        report = await self._reader.get(self._query(request))
        rows = report.rows
        if request.group_by == reports_pb2.STATS_GROUPING_CAMPAIGN:
            rows = tuple(r for r in rows if r.dimensions["campaign"])  # the first API left out mail of no campaign
        day_keys = request.group_by == reports_pb2.STATS_GROUPING_DAY  # the first API keyed days as YYYY-MM-DD
        return reports_pb2.GetStatsResponse(
            rows=[_stats_row(r, report.metrics, r.key[:10] if day_keys else None) for r in rows],
            total=_stats_row(report.total, report.metrics),
            dimensions=report.dimensions, metrics=report.metrics,
            complaint_rate_warning=COMPLAINT_RATE_WARNING, complaint_rate_critical=COMPLAINT_RATE_CRITICAL,
        )

    async def ExportStats(self, request: reports_pb2.ExportStatsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[HttpBody]:
        """GetStats' rows as CSV."""
        query = self._query(request.query)
        report = await self._reader.get(query)  # every check passed before the first byte goes out
        filename = export_filename("stats", query.start, query.end)
        await context.send_initial_metadata((("content-disposition", f'attachment; filename="{filename}"'),))
        rows = ([neutralise(cell) if isinstance(cell, str) else cell for cell in row] for row in report.table_rows())
        async for chunk in csv_chunks(report.table_header(), rows):
            yield HttpBody(content_type=CSV_CONTENT_TYPE, data=chunk)

    async def CompareProviders(self, request: reports_pb2.CompareProvidersRequest,
                               context: grpc.aio.ServicerContext) -> reports_pb2.CompareProvidersResponse:
        """Every provider's figures over the range and its health now (platform admins only)."""
        principal = current_principal()
        if not principal.is_platform_admin:
            raise PermissionDenied("provider comparison is for platform admins", reason="PLATFORM_ADMIN_ONLY")
        start, end = _range(request, default_length=DEFAULT_STATS_RANGE)
        standings = await self._comparer.compare(start, end, class_name_of(request.message_class))
        metrics = tuple(METRICS)
        return reports_pb2.CompareProvidersResponse(providers=[
            reports_pb2.ProviderComparison(
                provider=s.provider, provider_type=s.provider_type, enabled=s.enabled,
                figures=_stats_row(s.figures, metrics), breaker_state=s.breaker_state,
                daily_quota_used=s.daily_quota_used, daily_quota_limit=s.daily_quota_limit,
                monthly_quota_used=s.monthly_quota_used, monthly_quota_limit=s.monthly_quota_limit,
                price_per_email_micros=s.price_per_email_micros,
            ) for s in standings
        ])


_REASONS_TO_PROTO: dict[SuppressionReason, int] = {
    SuppressionReason.HARD_BOUNCE: reports_pb2.SUPPRESSION_REASON_HARD_BOUNCE,
    SuppressionReason.COMPLAINT: reports_pb2.SUPPRESSION_REASON_COMPLAINT,
    SuppressionReason.UNSUBSCRIBE: reports_pb2.SUPPRESSION_REASON_UNSUBSCRIBE,
    SuppressionReason.MANUAL: reports_pb2.SUPPRESSION_REASON_MANUAL,
}
_REASONS_FROM_PROTO = {value: reason for reason, value in _REASONS_TO_PROTO.items()}


def suppression_to_proto(suppression: Suppression) -> reports_pb2.Suppression:
    """The API view of a suppression: ``suppressions/{email}`` for every topic, ``suppressions/{email}~{topic}``
    for one."""
    return reports_pb2.Suppression(
        name=f"suppressions/{suppression_id(suppression.email, suppression.topic)}",
        email=suppression.email,
        reason=_REASONS_TO_PROTO[suppression.reason],
        note=suppression.note,
        create_time=_timestamp(suppression.create_time),
        topic=suppression.topic,
    )


class SuppressionServicer(reports_pb2_grpc.SuppressionServiceServicer):
    """SuppressionService (writes keep the Redis mirror that ingest checks in step)."""

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def ListSuppressions(self, request: reports_pb2.ListSuppressionsRequest,
                               context: grpc.aio.ServicerContext) -> reports_pb2.ListSuppressionsResponse:
        """The tenant's suppressions in address order (an address's one for every topic before its topics'); only
        those of ``topic`` when it is given."""
        tenant_id = current_tenant(READ_SCOPE)
        page = await self._store.list(tenant_id, page_size(request.page_size), checked_page_token(request.page_token),
                                      checked_text(request.topic, "topic"))
        return reports_pb2.ListSuppressionsResponse(
            suppressions=[suppression_to_proto(s) for s in page.items], next_page_token=page.next_page_token
        )

    async def GetSuppression(self, request: reports_pb2.GetSuppressionRequest,
                             context: grpc.aio.ServicerContext) -> reports_pb2.Suppression:
        """One suppression, for every topic (``suppressions/{email}``) or one (``suppressions/{email}~{topic}``)."""
        tenant_id = current_tenant(READ_SCOPE)
        email, topic = split_suppression_id(resource_id(request.name, "suppressions", "name"))
        return suppression_to_proto(await self._store.get(tenant_id, email, topic))

    async def CreateSuppression(self, request: reports_pb2.CreateSuppressionRequest,
                                context: grpc.aio.ServicerContext) -> reports_pb2.Suppression:
        """Suppress an address (reason MANUAL unless given), for every topic or for ``suppression.topic`` only."""
        tenant_id = current_tenant(MANAGE_SUPPRESSIONS_SCOPE)
        given = request.suppression
        reason = _REASONS_FROM_PROTO.get(given.reason, SuppressionReason.MANUAL)
        created = await self._store.create(tenant_id, checked_text(given.email, "suppression.email"), reason,
                                           given.note, checked_text(given.topic, "suppression.topic"))
        return suppression_to_proto(created)

    async def DeleteSuppression(self, request: reports_pb2.DeleteSuppressionRequest,
                                context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        """Lift a suppression: ``suppressions/{email}`` the one for every topic, ``suppressions/{email}~{topic}``
        the one scoped to that topic (each leaves the other)."""
        tenant_id = current_tenant(MANAGE_SUPPRESSIONS_SCOPE)
        email, topic = split_suppression_id(resource_id(request.name, "suppressions", "name"))
        await self._store.delete(tenant_id, email, topic)
        return empty_pb2.Empty()


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """The events API: what webhooks push, to pull."""

    def __init__(self, reader: EventReader) -> None:
        self._reader = reader

    async def ListEvents(self, request: events_pb2.ListEventsRequest,
                         context: grpc.aio.ServicerContext) -> events_pb2.ListEventsResponse:
        """The caller's message events, oldest first."""
        tenant_id = current_tenant(READ_SCOPE)
        page = await self._reader.list(tenant_id, _event_filter(request), page_size(request.page_size),
                                       checked_page_token(request.page_token))
        return events_pb2.ListEventsResponse(
            events=[customer_event(**e._asdict()) for e in page.items], next_page_token=page.next_page_token)

    async def ExportEvents(self, request: events_pb2.ExportEventsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[HttpBody]:
        """The caller's message events over a range as CSV, in chunks of about 64 KiB (``exports.py``)."""
        tenant_id = current_tenant(READ_SCOPE)
        query = _event_filter(request)
        chunks = events_csv(self._reader, tenant_id, query)
        # The first chunk (the header at least) is made before anything is sent, so that a bad request fails as a
        # status alone, and the download is named once the request is known to be good.
        first = await anext(chunks)
        if query.start_time and query.end_time:  # always, once events_csv accepted the request
            filename = export_filename("events", query.start_time, query.end_time)
            await context.send_initial_metadata((("content-disposition", f'attachment; filename="{filename}"'),))
        yield HttpBody(content_type=CSV_CONTENT_TYPE, data=first)
        async for chunk in chunks:
            yield HttpBody(content_type=CSV_CONTENT_TYPE, data=chunk)


def _event_filter(request: events_pb2.ListEventsRequest | events_pb2.ExportEventsRequest) -> EventFilter:
    """The filters ListEvents and ExportEvents share; INVALID_ARGUMENT for a malformed message or campaign name."""
    return EventFilter(
        types=tuple(checked_text(t, "types") for t in request.types),
        message_id=resource_id(request.message, "messages", "message") if request.message else "",
        recipient=checked_text(request.recipient, "recipient"), tag=checked_text(request.tag, "tag"),
        campaign=f"campaigns/{resource_id(request.campaign, 'campaigns', 'campaign')}" if request.campaign else "",
        start_time=request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
        end_time=request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
    )
