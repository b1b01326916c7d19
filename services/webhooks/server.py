"""gRPC wiring of the webhooks service: protobuf ↔ domain translation, and the service's parts.

Serves ``esp.v1.WebhookService`` (forwarded by the ingest edge, caller in metadata; another tenant's endpoint is
NOT_FOUND) and runs the intake (EVENTS stream → queued deliveries), the dispatcher and the log's retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from esp.v1 import events_pb2, events_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from google.protobuf import empty_pb2
from psycopg_pool import AsyncConnectionPool

from libs.common import db
from libs.common.auth import Principal, TrustedHeaderAuthenticator, current_tenant
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.event_types import TEST_EVENT
from libs.common.field_masks import update_paths
from libs.common.grpc_client import domain_errors, open_channel
from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.pagination import checked_page_token, page_size
from libs.common.resource_names import MAX_ID_CHARS, checked_text, resource_id
from libs.common.secret_box import SecretBox
from libs.common.stopping import pause_unless_stopped
from libs.common.timestamps import to_timestamp
from services.webhooks.backlog import watch_backlog
from services.webhooks.config import DEFAULT_GRPC_PORT, WebhooksSettings
from services.webhooks.destinations import DestinationPolicy
from services.webhooks.dispatcher import Dispatcher
from services.webhooks.endpoints import UPDATABLE, Endpoint, EndpointSpec, EndpointStore, SigningKeys
from services.webhooks.intake import EventIntake
from services.webhooks.log import AttemptLog, retention_pass
from services.webhooks.queueing import Route, queue_events
from services.webhooks.transport import WebhookTransport

__all__ = ["WebhookServicer", "build_app"]

log = logging.getLogger(__name__)

READ, ADMIN = "read", "admin"
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
MAX_REPLAY_EVENTS = 100_000
_PREFIX = "webhookEndpoints/"


def _endpoint_id(name: str, field: str = "name") -> str:
    return resource_id(name, _PREFIX.rstrip("/"), field)


def _page_size(requested: int) -> int:
    return page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


def _spec(message: webhooks_pb2.WebhookEndpoint) -> EndpointSpec:
    return EndpointSpec(url=message.url, description=message.description, event_types=tuple(message.event_types),
                        tags=tuple(message.tags), enabled=message.enabled if message.HasField("enabled") else True,
                        max_batch_size=max(1, message.max_batch_size))


def _to_proto(endpoint: Endpoint) -> webhooks_pb2.WebhookEndpoint:
    spec = endpoint.spec
    message = webhooks_pb2.WebhookEndpoint(
        name=f"{_PREFIX}{endpoint.id}", url=spec.url, description=spec.description, event_types=spec.event_types,
        tags=spec.tags, enabled=spec.enabled, disabled_reason=endpoint.disabled_reason,
        max_batch_size=spec.max_batch_size, signing_secret=endpoint.signing_secret,
        create_time=to_timestamp(endpoint.create_time), update_time=to_timestamp(endpoint.update_time),
        pending_deliveries=endpoint.pending_deliveries)
    if endpoint.last_success_time:
        message.last_success_time.CopyFrom(to_timestamp(endpoint.last_success_time))
    if endpoint.failing_since:
        message.failing_since.CopyFrom(to_timestamp(endpoint.failing_since))
    return message


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    """The tenant-facing RPCs."""

    def __init__(self, store: EndpointStore, attempts: AttemptLog, pool: AsyncConnectionPool,
                 events: events_pb2_grpc.EventServiceStub, wake: Callable[[], None]) -> None:
        self._store = store
        self._attempts = attempts
        self._pool = pool
        self._events = events
        self._wake = wake

    async def CreateWebhookEndpoint(self, request: webhooks_pb2.CreateWebhookEndpointRequest,
                                    context: grpc.aio.ServicerContext) -> webhooks_pb2.WebhookEndpoint:
        """A new endpoint, with its signing secret this once."""
        tenant_id = current_tenant(ADMIN)
        request_id = checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        return _to_proto(await self._store.create(tenant_id, _spec(request.webhook_endpoint), request_id))

    async def GetWebhookEndpoint(self, request: webhooks_pb2.GetWebhookEndpointRequest,
                                 context: grpc.aio.ServicerContext) -> webhooks_pb2.WebhookEndpoint:
        """One endpoint (never its secret)."""
        return _to_proto(await self._store.get(current_tenant(READ), _endpoint_id(request.name)))

    async def ListWebhookEndpoints(self, request: webhooks_pb2.ListWebhookEndpointsRequest,
                                   context: grpc.aio.ServicerContext) -> webhooks_pb2.ListWebhookEndpointsResponse:
        """The tenant's endpoints in id order; the page token is the last id."""
        size = _page_size(request.page_size)
        found = await self._store.list(current_tenant(READ), size + 1, checked_page_token(request.page_token))
        return webhooks_pb2.ListWebhookEndpointsResponse(
            webhook_endpoints=[_to_proto(e) for e in found[:size]],
            next_page_token=found[size - 1].id if len(found) > size else "")

    async def UpdateWebhookEndpoint(self, request: webhooks_pb2.UpdateWebhookEndpointRequest,
                                    context: grpc.aio.ServicerContext) -> webhooks_pb2.WebhookEndpoint:
        """Change the fields ``update_mask`` names, as every Update RPC reads a mask (AIP-134,
        :mod:`libs.common.field_masks`): ``*`` for every field; with no mask, the fields the request sets (a value
        other than the default, or ``enabled`` given: clearing a filter list takes a mask naming it).
        INVALID_ARGUMENT for a path that is no endpoint field or cannot change (``name``, output-only fields)."""
        tenant_id = current_tenant(ADMIN)
        given = request.webhook_endpoint
        paths = update_paths(request.update_mask, given)
        if not set(paths) <= set(UPDATABLE):  # a field the proto gained that the store does not know yet
            raise InvalidArgument("update_mask names fields that cannot be updated", field_violations=[
                FieldViolation("update_mask", f"{p!r} is not updatable") for p in paths if p not in UPDATABLE])
        spec = _spec(given)
        changes: dict[str, Any] = {p: getattr(spec, p) for p in paths}
        endpoint_id = _endpoint_id(given.name, "webhook_endpoint.name")
        return _to_proto(await self._store.update(tenant_id, endpoint_id, changes))

    async def DeleteWebhookEndpoint(self, request: webhooks_pb2.DeleteWebhookEndpointRequest,
                                    context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        """Delete an endpoint with its queue and log."""
        await self._store.delete(current_tenant(ADMIN), _endpoint_id(request.name))
        return empty_pb2.Empty()

    async def RotateWebhookSecret(self, request: webhooks_pb2.RotateWebhookSecretRequest,
                                  context: grpc.aio.ServicerContext) -> webhooks_pb2.WebhookEndpoint:
        """A new secret, this once; the old ones sign until the overlap ends."""
        overlap = request.overlap.ToTimedelta() if request.HasField("overlap") else None
        return _to_proto(await self._store.rotate(current_tenant(ADMIN), _endpoint_id(request.name), overlap))

    async def ListWebhookAttempts(self, request: webhooks_pb2.ListWebhookAttemptsRequest,
                                  context: grpc.aio.ServicerContext) -> webhooks_pb2.ListWebhookAttemptsResponse:
        """The endpoint's delivery log, newest first."""
        tenant_id = current_tenant(READ)
        endpoint_id = _endpoint_id(request.parent, "parent")
        await self._store.get(tenant_id, endpoint_id)
        size = _page_size(request.page_size)
        before = 0
        if request.page_token:
            # An attempt's id: ASCII digits that fit a bigint (str.isdigit alone admits "²", which int() refuses).
            if not (request.page_token.isascii() and request.page_token.isdigit() and len(request.page_token) <= 18):
                raise InvalidArgument("page_token is malformed",
                                      field_violations=[FieldViolation("page_token", "malformed")])
            before = int(request.page_token)
        rows = await self._attempts.list(endpoint_id, size + 1, before)
        response = webhooks_pb2.ListWebhookAttemptsResponse(next_page_token=str(rows[size - 1].id)
                                                            if len(rows) > size else "")
        for row in rows[:size]:
            attempt = response.attempts.add(
                webhook_id=row.webhook_id, attempt_time=to_timestamp(row.attempt_time), attempt=row.attempt,
                status_code=row.status_code, latency_ms=row.latency_ms, response_excerpt=row.response_excerpt,
                error=row.error, success=row.success, event_types=row.event_types)
            if row.next_attempt_time:
                attempt.next_attempt_time.CopyFrom(to_timestamp(row.next_attempt_time))
        return response

    async def ReplayWebhookEvents(self, request: webhooks_pb2.ReplayWebhookEventsRequest,
                                  context: grpc.aio.ServicerContext) -> webhooks_pb2.ReplayWebhookEventsResponse:
        """Queue one message's events, or a time range's, to the endpoint again (its filters apply)."""
        tenant_id = current_tenant(ADMIN)
        endpoint = await self._store.get(tenant_id, _endpoint_id(request.name))
        query = events_pb2.ListEventsRequest(message=request.message, page_size=1000)
        if not request.message:
            if not (request.HasField("start_time") and request.HasField("end_time")):
                raise InvalidArgument("name a message, or both start_time and end_time",
                                      field_violations=[FieldViolation("message", "or start_time and end_time")])
            query.start_time.CopyFrom(request.start_time)
            query.end_time.CopyFrom(request.end_time)
        route = _route(endpoint)
        replay_key = f"replay:{datetime.now(UTC).isoformat()}:"
        metadata = Principal(tenant_id=tenant_id, scopes=frozenset({READ})).as_metadata()
        queued = 0
        while queued < MAX_REPLAY_EVENTS:
            async with domain_errors():
                page = await self._events.ListEvents(query, metadata=metadata, timeout=30)
            async with self._pool.connection() as conn, conn.transaction():
                queued += await queue_events(conn, {tenant_id: [route]}, [(tenant_id, list(page.events))],
                                             replay_key=replay_key)
            if not page.next_page_token:
                break
            query.page_token = page.next_page_token
        self._wake()
        return webhooks_pb2.ReplayWebhookEventsResponse(queued_events=queued)

    async def SendTestWebhookEvent(self, request: webhooks_pb2.SendTestWebhookEventRequest,
                                   context: grpc.aio.ServicerContext) -> webhooks_pb2.SendTestWebhookEventResponse:
        """Queue a ``test`` event to the endpoint, enabled or not."""
        tenant_id = current_tenant(ADMIN)
        endpoint = await self._store.get(tenant_id, _endpoint_id(request.name))
        now = datetime.now(UTC)
        event = events_pb2.Event(name=f"events/test-{now.strftime('%Y%m%dT%H%M%S%f')}-{endpoint.id[:8]}",
                                 type=TEST_EVENT, event_time=to_timestamp(now),
                                 attributes={"webhook_endpoint": f"{_PREFIX}{endpoint.id}"})
        route = Route(endpoint.id, tenant_id, frozenset(), frozenset(), 1)
        async with self._pool.connection() as conn, conn.transaction():
            await queue_events(conn, {tenant_id: [route]}, [(tenant_id, [event])], replay_key="test:", forced=True)
        self._wake()
        return webhooks_pb2.SendTestWebhookEventResponse(webhook_id=f"msg_{event.name.removeprefix('events/')}")


def _route(endpoint: Endpoint) -> Route:
    return Route(endpoint.id, endpoint.tenant_id, frozenset(endpoint.spec.event_types), frozenset(endpoint.spec.tags),
                 endpoint.spec.max_batch_size)


async def build_app(settings: WebhooksSettings) -> ServiceApp:
    """The webhooks service for ``serve()``."""
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        box = SecretBox.from_setting(settings.secrets_keys)
        pool: AsyncConnectionPool = await db.create_pool(settings.postgres_dsn, min_size=2, max_size=10,
                                                         name="webhooks")
        closers.append(pool.close)
        nc = await connect(settings.nats_url, "esp-webhooks")
        closers.append(nc.close)
        topology = Topology(settings.namespace, replicas=settings.stream_replicas)
        await ensure_streams(nc.jetstream(), topology)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        raise
    policy = DestinationPolicy(allow_internal=settings.webhook_allow_internal)
    transport = WebhookTransport(policy, timeout_s=settings.webhook_timeout_s,
                                 max_connections=settings.webhook_endpoint_concurrency)
    closers.insert(0, transport.close)
    reports = open_channel(settings.reports_addr)
    closers.insert(0, reports.close)
    keys = SigningKeys(pool, box)
    dispatcher = Dispatcher(pool, transport, keys, settings)
    intake = EventIntake(pool, nc, topology, batch=settings.webhook_consumer_batch, on_queued=dispatcher.wake)
    servicer = WebhookServicer(EndpointStore(pool, box, policy, keys), AttemptLog(pool), pool,
                               events_pb2_grpc.EventServiceStub(reports), dispatcher.wake)

    async def backlog(stop: asyncio.Event) -> None:
        await watch_backlog(pool, stop)

    async def retention(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await retention_pass(pool, timedelta(days=settings.webhook_log_retention_days))
            except Exception:
                log.exception("webhook log retention pass failed")
            await pause_unless_stopped(stop, 3600)

    return ServiceApp(
        name="webhooks", default_port=DEFAULT_GRPC_PORT,
        servicers=[(webhooks_pb2_grpc.add_WebhookServiceServicer_to_server, servicer)],
        service_names=[webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name],
        tasks=[intake.run, dispatcher.run, retention, backlog], closers=closers,
        authenticator=TrustedHeaderAuthenticator())
