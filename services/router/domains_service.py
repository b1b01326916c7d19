"""``esp.v1.DomainService`` on the router: protobuf ↔ :mod:`services.router.domains`, and the parts the service
needs (the registry, the outbox that carries its notifications, the re-check loop, a view of the bucket for
per-provider readiness).

Tenant-facing: every method acts for the caller's tenant (the principal the edge forwards), so another tenant's
domain is never seen — it is NOT_FOUND like a domain nobody added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esp.v1 import domains_pb2, domains_pb2_grpc
from google.protobuf import empty_pb2
from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool

from libs.common.auth import current_tenant
from libs.common.domain_records import DnsUnavailable, Purpose, RecordState, resolver_at
from libs.common.errors import FieldViolation, InvalidArgument, Unavailable
from libs.common.grpc_server import BackgroundTask
from libs.common.jetstream import Topology, ensure_streams
from libs.common.outbox import OutboxPublisher
from libs.common.pagination import checked_page_token, page_size
from libs.common.public_edge import ADMIN, READ
from libs.common.resource_names import MAX_ID_CHARS, checked_text
from libs.common.secret_box import SecretBox
from libs.common.sending_domains import DomainState, SendingDomains
from libs.common.sending_domains import open_bucket as open_domains_bucket
from libs.common.timestamps import to_timestamp
from services.router.config import RouterSettings
from services.router.domain_checks import DomainChecks
from services.router.domains import DomainRegistry, DomainView, KeyStatus, checked_domain

__all__ = ["DomainParts", "DomainServicer", "build_domain_parts"]

_STATES = {DomainState.PENDING: domains_pb2.DOMAIN_STATE_PENDING,
           DomainState.VERIFIED: domains_pb2.DOMAIN_STATE_VERIFIED,
           DomainState.FAILED: domains_pb2.DOMAIN_STATE_FAILED}
_PURPOSES = {Purpose.OWNERSHIP: domains_pb2.DOMAIN_RECORD_PURPOSE_OWNERSHIP,
             Purpose.DKIM: domains_pb2.DOMAIN_RECORD_PURPOSE_DKIM,
             Purpose.SPF: domains_pb2.DOMAIN_RECORD_PURPOSE_SPF,
             Purpose.DMARC: domains_pb2.DOMAIN_RECORD_PURPOSE_DMARC}
_RECORD_STATES = {RecordState.FOUND: domains_pb2.DOMAIN_RECORD_STATE_FOUND,
                  RecordState.MISSING: domains_pb2.DOMAIN_RECORD_STATE_MISSING,
                  RecordState.WRONG: domains_pb2.DOMAIN_RECORD_STATE_WRONG}
_KEY_STATUSES = {KeyStatus.ACTIVE: domains_pb2.DKIM_KEY_STATUS_ACTIVE,
                 KeyStatus.AHEAD: domains_pb2.DKIM_KEY_STATUS_PUBLISHED_AHEAD,
                 KeyStatus.RETIRED: domains_pb2.DKIM_KEY_STATUS_RETIRED}


def _domain_of(name: str, field: str = "name") -> str:
    """The domain a ``domains/{domain}`` name names; INVALID_ARGUMENT for another shape or a bad domain."""
    if not name.startswith("domains/") or "/" in name.removeprefix("domains/"):
        raise InvalidArgument(f"{field} must be domains/{{domain}}", reason="INVALID_ARGUMENT",
                              field_violations=[FieldViolation(field, "domains/{domain}")])
    return checked_domain(name.removeprefix("domains/"), field)


class DomainServicer(domains_pb2_grpc.DomainServiceServicer):  # type: ignore[misc]
    """The tenant's sending domains over :class:`DomainRegistry`; readiness from the bucket's view."""

    def __init__(self, registry: DomainRegistry, view: SendingDomains) -> None:
        self.registry = registry
        self.view = view

    def _proto(self, d: DomainView) -> domains_pb2.Domain:
        records = [domains_pb2.DomainRecord(
            purpose=_PURPOSES[r.record.purpose], type="TXT", name=r.record.name, value=r.record.value,
            required=r.record.required, selector=r.selector, algorithm=r.algorithm,
            key_status=_KEY_STATUSES.get(r.key_status, domains_pb2.DKIM_KEY_STATUS_UNSPECIFIED),
            state=_RECORD_STATES[r.state] if r.state else domains_pb2.DOMAIN_RECORD_STATE_UNSPECIFIED,
            seen_values=list(r.seen)) for r in d.records]
        readiness = [domains_pb2.DomainProviderReadiness(provider=f"providers/{pid}", state=ready.state.value,
                                                         detail=ready.detail, records=[
                                                             domains_pb2.ProviderDnsRecord(type=t, name=n, value=v)
                                                             for t, n, v in ready.records])
                     for (pid, tenant_id, domain), ready in sorted(self.view.readiness_entries().items())
                     if tenant_id == d.tenant_id and domain == d.domain]
        return domains_pb2.Domain(
            name=f"domains/{d.domain}", domain=d.domain, state=_STATES[d.state], ed25519=d.ed25519, records=records,
            create_time=to_timestamp(d.created_at), verify_time=to_timestamp(d.verified_at),
            check_time=to_timestamp(d.checked_at), provider_readiness=readiness)

    async def CreateDomain(self, request: domains_pb2.CreateDomainRequest, context: Any) -> domains_pb2.Domain:
        """Add a domain (or return the tenant's existing one of that name)."""
        tenant_id = current_tenant(ADMIN)
        checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        if not request.domain.domain:
            raise InvalidArgument("domain.domain is required", reason="INVALID_DOMAIN",
                                  field_violations=[FieldViolation("domain.domain", "required")])
        domain = checked_domain(request.domain.domain)
        return self._proto(await self.registry.create(tenant_id, domain, ed25519=request.domain.ed25519))

    async def GetDomain(self, request: domains_pb2.GetDomainRequest, context: Any) -> domains_pb2.Domain:
        """One of the tenant's domains; NOT_FOUND when it has none such."""
        return self._proto(await self.registry.get(current_tenant(READ), _domain_of(request.name)))

    async def ListDomains(self, request: domains_pb2.ListDomainsRequest,
                          context: Any) -> domains_pb2.ListDomainsResponse:
        """The tenant's domains in name order; the page token is the last name of a full page."""
        tenant_id = current_tenant(READ)
        size = page_size(request.page_size)
        views = await self.registry.page(tenant_id, size, checked_page_token(request.page_token))
        token = views[-1].domain if len(views) == size else ""
        return domains_pb2.ListDomainsResponse(domains=[self._proto(v) for v in views], next_page_token=token)

    async def VerifyDomain(self, request: domains_pb2.VerifyDomainRequest, context: Any) -> domains_pb2.Domain:
        """Look the records up now; UNAVAILABLE (DNS_UNAVAILABLE) when DNS did not answer."""
        tenant_id = current_tenant(ADMIN)
        try:
            return self._proto(await self.registry.verify(tenant_id, _domain_of(request.name)))
        except DnsUnavailable as exc:
            raise Unavailable(f"DNS did not answer; the domain's state is unchanged ({exc})",
                              reason="DNS_UNAVAILABLE") from None

    async def DeleteDomain(self, request: domains_pb2.DeleteDomainRequest, context: Any) -> empty_pb2.Empty:
        """Remove the domain and its keys."""
        await self.registry.delete(current_tenant(ADMIN), _domain_of(request.name))
        return empty_pb2.Empty()

    async def RotateDomainKey(self, request: domains_pb2.RotateDomainKeyRequest,
                              context: Any) -> domains_pb2.Domain:
        """Start a DKIM key rotation."""
        return self._proto(await self.registry.rotate(current_tenant(ADMIN), _domain_of(request.name)))


@dataclass(frozen=True)
class DomainParts:
    """What the router adds for sending domains: the servicer and its background tasks."""

    registry: DomainRegistry
    view: SendingDomains
    servicer: DomainServicer
    tasks: tuple[BackgroundTask, ...]


async def build_domain_parts(settings: RouterSettings, pool: AsyncConnectionPool, nc: NATS,
                             secrets: SecretBox) -> DomainParts:
    """The registry over Postgres and the sending-domains bucket (resynced), its outbox publisher, the re-check
    loop and the bucket's watcher."""
    js = nc.jetstream()
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    await ensure_streams(js, topology)  # the notifications go to the EVENTS stream
    kv = await open_domains_bucket(js, settings.namespace)
    outbox = OutboxPublisher(pool, nc, "router.outbox")
    registry = DomainRegistry(pool, kv, secrets, topology,
                              resolver=lambda: resolver_at(settings.dns_resolver), spf_include=settings.spf_include,
                              on_commit=outbox.publish_soon)
    await registry.resync()
    view = SendingDomains(kv, sandbox_domains=settings.sandbox_domains)
    checks = DomainChecks(registry, view, verified_interval_s=settings.domain_check_interval_s,
                          pending_interval_s=settings.pending_domain_check_interval_s,
                          poll_s=settings.domain_check_poll_s)
    return DomainParts(registry, view, DomainServicer(registry, view), (outbox.run, view.run, checks.run))
