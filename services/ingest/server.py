"""Ingest's gRPC wiring: protobuf ↔ domain for the RPCs ingest answers, plus the public edge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import redis.asyncio as aioredis
from esp.v1 import (
    attachments_pb2,
    campaigns_pb2,
    common_pb2,
    credits_pb2,
    domains_pb2,
    events_pb2,
    messages_pb2,
    providers_pb2,
    reports_pb2,
    tenants_pb2,
    webhooks_pb2,
)
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool

from libs.common import db
from libs.common.auth import Principal, current_principal
from libs.common.errors import EspError, FieldViolation, InvalidArgument, NotFound, PermissionDenied, error_parts
from libs.common.field_masks import update_paths
from libs.common.grpc_client import open_channel
from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.message_classes import class_name_of
from libs.common.outbox import OutboxPublisher
from libs.common.pagination import checked_page_token, page_size
from libs.common.public_edge import EDGE_METHODS
from libs.common.redis import create_redis
from libs.common.resource_names import MAX_ID_CHARS, checked_text, resource_id
from libs.common.s3 import create_s3_client, ensure_bucket
from libs.common.sending_domains import SendingDomains
from libs.common.sending_domains import open_bucket as open_domains_bucket
from libs.common.timestamps import to_timestamp
from libs.common.verified_senders import VerifiedSenders
from libs.routing.catalog import ProviderCatalog, open_bucket
from services.ingest.accept import Acceptor
from services.ingest.attachments import AttachmentStore, UploadMetadata
from services.ingest.cancel import Canceller
from services.ingest.clients import LedgerCreditReserver, ReportsMessageStates
from services.ingest.config import IngestSettings
from services.ingest.edge import ApiKeyAuthenticator, build_handler
from services.ingest.limits import RateDefaults, RedisGate
from services.ingest.memory import return_large_buffers_to_the_os
from services.ingest.model import YIELD_EVERY, EmailDraft, Mailbox
from services.ingest.sizing import SizePolicy
from services.ingest.store import MessageStore
from services.ingest.tenants import ApiKeyRecord, Tenant, TenantStore

_FILES = (messages_pb2, attachments_pb2, tenants_pb2, credits_pb2, providers_pb2, reports_pb2, campaigns_pb2,
          webhooks_pb2, events_pb2, domains_pb2)
_SCOPE_TO_PROTO = {"send": tenants_pb2.API_KEY_SCOPE_SEND, "read": tenants_pb2.API_KEY_SCOPE_READ,
                   "admin": tenants_pb2.API_KEY_SCOPE_ADMIN}
_PROTO_TO_SCOPE = {v: k for k, v in _SCOPE_TO_PROTO.items()}


def _boxes(items: Any) -> tuple[Mailbox, ...]:
    return tuple(Mailbox(a.email, a.name) for a in items)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)
"""What a Timestamp's seconds may be: 0001-01-01 to 9999-12-31 (google/protobuf/timestamp.proto)."""


def _send_time(stamp: Timestamp) -> datetime:
    """A request's send_time as a datetime; INVALID_ARGUMENT for a Timestamp no valid one could be."""
    if stamp.seconds not in _TIMESTAMP_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument("send_time is not a valid timestamp", reason="INVALID_EMAIL_REQUEST", field_violations=[
            FieldViolation("send_time", "not a valid timestamp (0001-01-01 to 9999-12-31, nanos 0 to 999,999,999)")])
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def draft_from_proto(req: messages_pb2.SendEmailRequest) -> EmailDraft:
    """The domain draft of a SendEmail request, before validation (unset fields read as their defaults);
    INVALID_ARGUMENT for a send_time that is no valid Timestamp."""
    # Only the fields the request sets are read: reading an unset repeated or map field still builds an empty
    # container (≈ 2 µs each, and a request has nine of them).
    present = {f.name: v for f, v in req.ListFields()}
    sender = present.get("from")
    return EmailDraft(
        message_class=class_name_of(present.get("message_class", 0)),
        sender=Mailbox(sender.email, sender.name) if sender is not None else Mailbox(""),
        to=_boxes(present.get("to", ())), cc=_boxes(present.get("cc", ())), bcc=_boxes(present.get("bcc", ())),
        reply_to=_boxes(present.get("reply_to", ())), subject=present.get("subject", ""),
        text_body=present.get("text_body", ""), html_body=present.get("html_body", ""),
        headers=dict(present.get("headers", {})), tags=tuple(present.get("tags", ())),
        metadata=dict(present.get("metadata", {})), attachment_ids=tuple(present.get("attachment_ids", ())),
        request_id=present.get("request_id", ""),
        send_time=_send_time(present["send_time"]) if "send_time" in present else None,
    )


def _tenant_id_from(name: str, field: str) -> str:
    return resource_id(name, "tenants", field)


def _attachment_id(name: str) -> str:
    """The id of ``attachments/{id}`` (a bare id is taken as well, as it always was)."""
    return resource_id(name if name.startswith("attachments/") else f"attachments/{name}", "attachments", "name")


def _acting_tenant(principal: Principal) -> str:
    """The tenant a tenant-scoped call acts for: the key's own. The platform admin's token belongs to no tenant."""
    if not principal.tenant_id:
        raise PermissionDenied("this call acts for a tenant: use one of the tenant's API keys",
                               reason="TENANT_KEY_REQUIRED")
    return principal.tenant_id


def _own_tenant(principal: Principal, tenant_id: str) -> None:
    """Another tenant's resources look absent, never forbidden (no information leaks)."""
    if not principal.is_platform_admin and principal.tenant_id != tenant_id:
        raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")


def _tenant_proto(t: Tenant) -> tenants_pb2.Tenant:
    p = t.policy
    return tenants_pb2.Tenant(
        name=f"tenants/{t.id}", display_name=t.display_name, otp_rate_per_second=p.rate_per_second["otp"],
        transactional_rate_per_second=p.rate_per_second["transactional"],
        bulk_rate_per_second=p.rate_per_second["bulk"], daily_quota=p.daily_quota,
        large_attachment_policy=(
            tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT
            if p.large_attachment_policy == "reject" else tenants_pb2.LARGE_ATTACHMENT_POLICY_LINK),
        allowed_headers=sorted(p.allowed_headers), disabled=p.disabled, create_time=to_timestamp(t.created_at))


def _key_proto(k: ApiKeyRecord) -> tenants_pb2.ApiKey:
    key = tenants_pb2.ApiKey(
        name=f"tenants/{k.tenant_id}/apiKeys/{k.id}", display_name=k.display_name, prefix=k.prefix,
        scopes=[_SCOPE_TO_PROTO[s] for s in k.scopes], revoked=k.revoked, create_time=to_timestamp(k.created_at))
    if k.last_used_at:
        key.last_used_time.CopyFrom(to_timestamp(k.last_used_at))
    return key


def _attachment_proto(a: Any) -> attachments_pb2.Attachment:
    return attachments_pb2.Attachment(name=f"attachments/{a.id}", id=a.id, filename=a.filename,
                                      content_type=a.content_type, size_bytes=a.size_bytes, sha256=a.sha256)


class IngestServicer:
    """The RPCs ingest answers itself (methods named as in the protos)."""

    def __init__(self, acceptor: Acceptor, canceller: Canceller, attachments: AttachmentStore, tenants: TenantStore,
                 *, max_batch_send: int = 500) -> None:
        self.acceptor = acceptor
        self.attachments = attachments
        self.tenants = tenants
        self.max_batch_send = max_batch_send
        self.canceller = canceller

    # -- MessageService ----------------------------------------------------------------------------------------
    async def SendEmail(self, request: messages_pb2.SendEmailRequest, context: Any) -> messages_pb2.SendEmailResponse:
        """Accept one email for the caller's tenant (scope ``send``, a tenant's key); the steps are in
        :mod:`services.ingest.accept`. Errors: PERMISSION_DENIED (the platform admin's token, a disabled tenant),
        INVALID_ARGUMENT (every validation problem at once), NOT_FOUND (an attachment that is not the tenant's),
        FAILED_PRECONDITION (a suppressed recipient, attachments too large under policy reject, credits short),
        RESOURCE_EXHAUSTED (rate or daily quota), ALREADY_EXISTS (a request_id reused for a different request).
        With a send_time ahead, the message is SCHEDULED: handed to a sender at that time."""
        accepted = await self.acceptor.send(current_principal(), draft_from_proto(request))
        return messages_pb2.SendEmailResponse(message=accepted.message)

    async def CancelMessage(self, request: messages_pb2.CancelMessageRequest, context: Any) -> messages_pb2.Message:
        """Cancel one of the caller's tenant's messages until a provider has it (scope ``send``; the steps are in
        :mod:`services.ingest.cancel`). Errors: NOT_FOUND (no such message, or another tenant's),
        FAILED_PRECONDITION (sent, failed or cancelled already; ErrorInfo metadata ``state``)."""
        resource_id(request.name, "messages", "name")
        checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        return await self.canceller.cancel(current_principal(), request.name, request.request_id)

    async def BatchSendEmails(self, request: messages_pb2.BatchSendEmailsRequest,
                              context: Any) -> messages_pb2.BatchSendEmailsResponse:
        """Accept 1 to ``max_batch_send`` emails for the caller's tenant (scope ``send``). Each email gets its own
        result: its message, or the error that refused it alone (as SendEmail would raise it), UNAVAILABLE
        (``DEPENDENCY_UNAVAILABLE``) for one a dependency failed while others were accepted. The call itself fails
        for an empty or oversized batch (INVALID_ARGUMENT), or when a dependency failed and no email was accepted
        (UNAVAILABLE)."""
        if not request.requests or len(request.requests) > self.max_batch_send:
            raise InvalidArgument(f"1 to {self.max_batch_send} emails per batch", field_violations=[
                FieldViolation("requests", f"1 to {self.max_batch_send} emails")])
        drafts: list[EmailDraft] = []
        unreadable: dict[int, EspError] = {}  # index -> why its request could not even be read
        for index, req in enumerate(request.requests):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # see YIELD_EVERY
            try:
                drafts.append(draft_from_proto(req))
            except EspError as exc:
                unreadable[index] = exc
        accepted = iter(await self.acceptor.send_many(current_principal(), drafts))
        outcomes = [unreadable[i] if i in unreadable else next(accepted) for i in range(len(request.requests))]
        results = []
        for index, outcome in enumerate(outcomes):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if isinstance(outcome, EspError):
                code, message, reason, metadata, fields = error_parts(outcome)
                results.append(messages_pb2.BatchSendEmailsResponse.Result(error=common_pb2.BatchError(
                    code=code, message=message, reason=reason, metadata=metadata, fields=fields)))
            else:
                results.append(messages_pb2.BatchSendEmailsResponse.Result(message=outcome.message))
        return messages_pb2.BatchSendEmailsResponse(results=results)

    # -- AttachmentService -------------------------------------------------------------------------------------
    async def UploadAttachment(self, request_iterator: AsyncIterator[attachments_pb2.UploadAttachmentRequest],
                               context: Any) -> attachments_pb2.Attachment:
        """Stream an attachment into S3 for the caller's tenant (scope ``send``): the first frame carries the metadata
        and only it, every frame at most 1 MiB of bytes. A retry with the same request_id returns the stored attachment;
        bad metadata, the size cap, a wrong size or a sha256 mismatch is INVALID_ARGUMENT."""
        principal = current_principal()
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument("the first frame must carry the metadata", reason="METADATA_FIRST",
                                  field_violations=[FieldViolation("metadata", "required in the first frame")])
        m = first.metadata

        async def chunks() -> AsyncIterator[bytes]:
            async for frame in request_iterator:
                if frame.HasField("metadata"):
                    raise InvalidArgument("metadata may only be sent once",
                                          field_violations=[FieldViolation("metadata", "only in the first frame")])
                if len(frame.chunk) > 1024 * 1024 + 1024:
                    raise InvalidArgument("chunks are at most 1 MiB",
                                          field_violations=[FieldViolation("chunk", "at most 1 MiB")])
                yield frame.chunk

        stored = await self.attachments.upload(
            _acting_tenant(principal), UploadMetadata(m.filename, m.content_type, m.size_bytes, m.sha256, m.request_id),
            chunks())
        return _attachment_proto(stored)

    async def GetAttachment(self, request: attachments_pb2.GetAttachmentRequest,
                            context: Any) -> attachments_pb2.Attachment:
        """One of the caller's tenant's attachments (scope ``read``); another tenant's is NOT_FOUND, like an id that
        does not exist."""
        stored = await self.attachments.get(_acting_tenant(current_principal()), _attachment_id(request.name))
        return _attachment_proto(stored)

    async def DeleteAttachment(self, request: attachments_pb2.DeleteAttachmentRequest,
                               context: Any) -> empty_pb2.Empty:
        """Mark one of the caller's tenant's attachments deleted (scope ``send``): its id answers NOT_FOUND from then
        on, to reads and to sends naming it. Another tenant's is NOT_FOUND."""
        await self.attachments.delete(_acting_tenant(current_principal()), _attachment_id(request.name))
        return empty_pb2.Empty()

    # -- TenantService -----------------------------------------------------------------------------------------
    async def CreateTenant(self, request: tenants_pb2.CreateTenantRequest, context: Any) -> tenants_pb2.Tenant:
        """Create a tenant (platform admin). ALREADY_EXISTS for a taken id; INVALID_ARGUMENT for a bad id or policy
        (rates, quota, large-attachment policy, allowed headers)."""
        t = request.tenant
        tenant = await self.tenants.create_tenant(
            request.tenant_id, t.display_name, daily_quota=t.daily_quota,
            rates={"otp": t.otp_rate_per_second, "transactional": t.transactional_rate_per_second,
                   "bulk": t.bulk_rate_per_second},
            large_attachment_policy="reject" if t.large_attachment_policy == tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT
            else "link", allowed_headers=tuple(t.allowed_headers))
        return _tenant_proto(tenant)

    async def GetTenant(self, request: tenants_pb2.GetTenantRequest, context: Any) -> tenants_pb2.Tenant:
        """A tenant, read from Postgres (scope ``admin``): a tenant admin sees only its own tenant, any other is
        NOT_FOUND; the platform admin sees every tenant."""
        tenant_id = _tenant_id_from(request.name, "name")
        _own_tenant(current_principal(), tenant_id)
        return _tenant_proto(await self.tenants.get_tenant(tenant_id, fresh=True))

    async def ListTenants(self, request: tenants_pb2.ListTenantsRequest,
                          context: Any) -> tenants_pb2.ListTenantsResponse:
        """Tenants in id order, a page at a time (platform admin; ``page_size`` 50 by default, at most 1,000; the page
        token is the last id of a full page)."""
        size = page_size(request.page_size)
        tenants = await self.tenants.list_tenants(size, checked_page_token(request.page_token))
        token = tenants[-1].id if len(tenants) == size else ""
        return tenants_pb2.ListTenantsResponse(tenants=[_tenant_proto(t) for t in tenants], next_page_token=token)

    async def UpdateTenant(self, request: tenants_pb2.UpdateTenantRequest, context: Any) -> tenants_pb2.Tenant:
        """Change a tenant's settings (platform admin) as ``update_mask`` says (AIP-134,
        :mod:`libs.common.field_masks`): the fields it names, ``*`` for every field, and with no mask the fields the
        request sets to a value other than the default (so disabling a tenant keeps its quota and rates; putting a
        quota or rate back to 0 takes a mask naming it). INVALID_ARGUMENT for a mask path that is not a tenant field
        or cannot change (``name``, ``create_time``) and for a bad policy; NOT_FOUND for an unknown tenant. Other
        replicas apply it within ``api_key_cache_s``."""
        t = request.tenant
        tenant_id = _tenant_id_from(t.name, "tenant.name")
        values: dict[str, object] = {
            "display_name": t.display_name, "daily_quota": t.daily_quota, "otp_rate_per_second": t.otp_rate_per_second,
            "transactional_rate_per_second": t.transactional_rate_per_second,
            "bulk_rate_per_second": t.bulk_rate_per_second, "allowed_headers": list(t.allowed_headers),
            "disabled": t.disabled, "large_attachment_policy": "reject"
            if t.large_attachment_policy == tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT else "link"}
        changes = {path: values[path] for path in update_paths(request.update_mask, t)}
        return _tenant_proto(await self.tenants.update_tenant(tenant_id, **changes))

    async def CreateApiKey(self, request: tenants_pb2.CreateApiKeyRequest,
                           context: Any) -> tenants_pb2.CreateApiKeyResponse:
        """Create an API key for a tenant (scope ``admin``, own tenant only, else NOT_FOUND). The response carries the
        full key, which is never available again; INVALID_ARGUMENT unless the scopes are one or more of ``send``,
        ``read``, ``admin``."""
        tenant_id = _tenant_id_from(request.parent, "parent")
        _own_tenant(current_principal(), tenant_id)
        scopes = tuple(_PROTO_TO_SCOPE[s] for s in request.api_key.scopes if s in _PROTO_TO_SCOPE)
        record, secret = await self.tenants.create_key(tenant_id, scopes, request.api_key.display_name)
        return tenants_pb2.CreateApiKeyResponse(api_key=_key_proto(record), secret=secret)

    async def ListApiKeys(self, request: tenants_pb2.ListApiKeysRequest,
                          context: Any) -> tenants_pb2.ListApiKeysResponse:
        """A tenant's API keys in id order, revoked ones included, without secrets (scope ``admin``, own tenant only,
        else NOT_FOUND; paged like ListTenants)."""
        tenant_id = _tenant_id_from(request.parent, "parent")
        _own_tenant(current_principal(), tenant_id)
        size = page_size(request.page_size)
        keys = await self.tenants.list_keys(tenant_id, size, checked_page_token(request.page_token))
        token = keys[-1].id if len(keys) == size else ""
        return tenants_pb2.ListApiKeysResponse(api_keys=[_key_proto(k) for k in keys], next_page_token=token)

    async def RevokeApiKey(self, request: tenants_pb2.RevokeApiKeyRequest, context: Any) -> tenants_pb2.ApiKey:
        """Revoke an API key (scope ``admin``, own tenant only, else NOT_FOUND; revoking twice keeps the first
        revocation time). It stops working at once on this replica and within ``api_key_cache_s`` on the others."""
        parts = request.name.split("/")
        if len(parts) != 4 or parts[0] != "tenants" or parts[2] != "apiKeys":
            raise InvalidArgument("name must look like tenants/{tenant}/apiKeys/{key}",
                                  field_violations=[FieldViolation("name", "expected tenants/{t}/apiKeys/{k}")])
        tenant_id = resource_id(f"tenants/{parts[1]}", "tenants", "name")
        key_id = resource_id(request.name, f"tenants/{tenant_id}/apiKeys", "name")
        _own_tenant(current_principal(), tenant_id)
        return _key_proto(await self.tenants.revoke_key(tenant_id, key_id))


def _message_classes() -> dict[str, Any]:
    from google.protobuf import symbol_database

    db_ = symbol_database.Default()
    classes: dict[str, Any] = {}
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for desc in (method.input_type, method.output_type):
                    classes[desc.full_name] = db_.GetSymbol(desc.full_name)
    return classes


@dataclass
class IngestComponents:
    """Everything ingest is made of, built from settings; tests build it to reach the parts."""

    settings: IngestSettings
    topology: Topology
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    nc: NATS
    js: JetStreamContext
    s3: Any
    channels: dict[str, grpc.aio.Channel]
    tenants: TenantStore
    credits: LedgerCreditReserver
    outbox: OutboxPublisher
    attachments: AttachmentStore
    gate: RedisGate
    store: MessageStore
    catalog: ProviderCatalog
    acceptor: Acceptor
    servicer: IngestServicer

    async def close(self) -> None:
        """Finish accepts in progress, then close every client (reverse order of creation)."""
        await self.acceptor.drain()
        await self.store.close()
        await self.gate.close()
        await self.credits.close()
        for channel in self.channels.values():
            await channel.close()
        await self.nc.drain()
        await self.redis.aclose()
        await self.pool.close()


async def build_components(settings: IngestSettings) -> IngestComponents:
    """Connect to Postgres, Redis, NATS (streams and the provider catalog), S3 and the ledger; wire the parts."""
    return_large_buffers_to_the_os()
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    pool = await db.create_pool(settings.postgres_dsn, min_size=2, max_size=settings.accept_batch_workers + 12,
                                name="ingest")
    redis = create_redis(settings.redis_url)
    nc = await connect(settings.nats_url, "esp-ingest")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    catalog = ProviderCatalog(await open_bucket(js, settings.namespace))
    sending_domains = SendingDomains(await open_domains_bucket(js, settings.namespace),
                                     sandbox_domains=settings.sandbox_domains)
    s3 = create_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key, settings.s3_secret_key)
    await asyncio.to_thread(ensure_bucket, s3, settings.s3_bucket)
    channels = {"reports": open_channel(settings.reports_addr), "ledger": open_channel(settings.ledger_addr),
                "router": open_channel(settings.router_addr), "campaigns": open_channel(settings.campaigns_addr),
                "webhooks": open_channel(settings.webhooks_addr)}
    tenants = TenantStore(pool, cache_ttl_s=settings.api_key_cache_s, admin_token=settings.admin_token)
    credits = LedgerCreditReserver(channels["ledger"], timeout_s=settings.upstream_timeout_s,
                                   batch_interval_s=settings.batch_interval_s)
    outbox = OutboxPublisher(pool, nc, "ingest.outbox", scheduled=True)
    attachments = AttachmentStore(pool, s3, settings.s3_bucket)
    gate = RedisGate(redis, settings.namespace, RateDefaults(
        settings.default_otp_rate, settings.default_transactional_rate, settings.default_bulk_rate,
        settings.rate_burst_s), claim_ttl_s=settings.idempotency_cache_s, batch_interval_s=settings.batch_interval_s)
    store = MessageStore(pool, batch_size=settings.accept_batch_size, workers=settings.accept_batch_workers,
                         batch_interval_s=settings.batch_interval_s, on_commit=outbox.publish_soon)
    acceptor = Acceptor(tenants=tenants, gate=gate, credits=credits, attachments=attachments, store=store,
                        topology=topology, sizes=SizePolicy(lambda: catalog.providers.values()),
                        senders=VerifiedSenders(sending_domains),
                        batch_passes=settings.batch_passes_in_flight, max_send_ahead_s=settings.max_send_ahead_s,
                        hold_ttl_after_send_s=settings.hold_ttl_after_send_s)
    canceller = Canceller(store=store, redis=redis, topology=topology,
                          states=ReportsMessageStates(channels["reports"], timeout_s=settings.upstream_timeout_s))
    servicer = IngestServicer(acceptor, canceller, attachments, tenants, max_batch_send=settings.max_batch_send)
    return IngestComponents(settings, topology, pool, redis, nc, js, s3, channels, tenants, credits, outbox,
                            attachments, gate, store, catalog, acceptor, servicer)


def service_app(parts: IngestComponents) -> ServiceApp:
    """The gRPC service over ``parts``: the public edge methods, the outbox publisher and the catalog watcher."""
    classes = _message_classes()
    handlers: list[grpc.GenericRpcHandler] = []
    names: list[str] = []
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            methods = EDGE_METHODS.get(service.full_name)
            if methods:
                handlers.append(build_handler(service, methods, parts.servicer, parts.channels, classes,
                                              parts.settings.upstream_timeout_s))
                names.append(service.full_name)
    return ServiceApp(name="ingest", default_port=50051, generic_handlers=handlers, service_names=names,
                      tasks=[parts.outbox.run, parts.catalog.run, parts.acceptor.senders.view.run],
                      closers=[parts.close],
                      authenticator=ApiKeyAuthenticator(parts.tenants),
                      # Uploads stream into S3 slower than loopback can deliver; with BDP probing the transport
                      # grows its receive window and buffers megabytes ahead of us. A fixed window keeps memory
                      # bounded per upload (the client simply waits).
                      server_options=[("grpc.http2.bdp_probe", 0)])


async def build_app(settings: IngestSettings) -> ServiceApp:
    """The ingest service for ``serve()``."""
    return service_app(await build_components(settings))
