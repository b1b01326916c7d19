"""The router's gRPC wiring: ProviderService (admin CRUD and RouteEmail) over the registry and the scorer.

Besides serving, the router repairs the broadcast every ``ESP_REGISTRY_RESYNC_S``: whatever the KV bucket lacks
compared with Postgres (a change committed while NATS was down) is put again, so every replica converges.

The router needs ``ESP_SECRETS_KEYS``: it seals the providers' credentials and webhook secrets (write-only fields,
never returned: the admin view shows ``credentials_ref`` and ``webhook_secret_names`` instead) before they reach
Postgres or the KV bucket, and at start it seals what an earlier version left in plain text.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import Any

from esp.v1 import domains_pb2, domains_pb2_grpc, providers_pb2, providers_pb2_grpc
from google.protobuf import empty_pb2

from libs.common import db
from libs.common.auth import TrustedHeaderAuthenticator
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.field_masks import update_paths
from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import connect
from libs.common.message_classes import class_name_of, proto_of
from libs.common.pagination import checked_page_token, page_size
from libs.common.redis import create_redis
from libs.common.resource_names import MAX_ID_CHARS, checked_text, resource_id
from libs.common.secret_box import optional_secret_box
from libs.common.sending_domains import SendingDomains
from libs.common.settings import SettingsError
from libs.common.stopping import pause_unless_stopped
from libs.common.timestamps import to_timestamp
from libs.routing.catalog import ProviderCatalog, ProviderSpec, open_bucket
from libs.routing.health import HealthBoard
from libs.routing.readiness import address_domain
from libs.routing.scoring import EmailFacts, ProviderScore, rank
from services.router.config import RouterSettings
from services.router.domain_readiness import DomainReadinessWorker
from services.router.domains_service import build_domain_parts
from services.router.provider_metrics import ProviderGauges
from services.router.registry import ProviderRecord, ProviderRegistry

log = logging.getLogger(__name__)

_SECRET_PATHS = ("credentials", "webhook_secrets")
"""Write-only fields: an update changes them only when its mask names them or, with no mask, when it gives some
(never with ``*``: a client cannot read them back to send them again)."""
_NOT_UPDATABLE = ("etag",)
"""Provider fields an update reads but never writes (the etag is its condition)."""


_ETAG = re.compile("[0-9]{1,19}")
"""The shape of an etag the router gives out: a provider's version in ASCII decimal (``str.isdigit`` also takes
``²`` and other digits ``int`` cannot read)."""
_MAX_VERSION = 2**63 - 1
"""The largest version Postgres stores (a ``bigint``): a longer number names no provider and would overflow it."""


def _expected_version(etag: str, field: str) -> int | None:
    """The version an update or delete is conditional on (AIP-154): None for no etag; INVALID_ARGUMENT naming
    ``field`` for a value that is no etag the router gives out, which no version could ever match."""
    if not etag:
        return None
    if _ETAG.fullmatch(etag) is None or int(etag) > _MAX_VERSION:
        raise InvalidArgument(f"{field} is not an etag of a provider", reason="INVALID_ARGUMENT",
                              field_violations=[FieldViolation(field, "the etag a read of the provider gave")])
    return int(etag)


def _id(name: str, field: str = "name") -> str:
    return resource_id(name, "providers", field)


def _class_names(values: Iterable[int]) -> tuple[str, ...]:
    """The names of the known classes among ``values`` (unknown ones are dropped)."""
    return tuple(name for name in map(class_name_of, values) if name)


def _spec_values(p: providers_pb2.Provider) -> dict[str, Any]:
    return {
        "type": p.type, "display_name": p.display_name, "endpoint": p.endpoint, "region": p.region,
        "price_per_email_micros": p.price_per_email_micros, "price_per_mb_micros": p.price_per_mb_micros,
        "max_message_bytes": p.max_message_bytes, "batch_size": p.batch_size,
        "rate_limit_per_second": p.rate_limit_per_second, "daily_quota": p.daily_quota,
        "monthly_quota": p.monthly_quota, "allowed_classes": _class_names(p.allowed_classes),
        "weight": p.weight or 1.0, "disabled": p.disabled, "options": dict(p.options),
    }


def _proto(record: ProviderRecord) -> providers_pb2.Provider:
    s = record.spec
    return providers_pb2.Provider(
        name=f"providers/{s.id}", type=s.type, display_name=s.display_name, endpoint=s.endpoint, region=s.region,
        credentials_ref=record.credentials_ref, price_per_email_micros=s.price_per_email_micros,
        price_per_mb_micros=s.price_per_mb_micros, max_message_bytes=s.max_message_bytes, batch_size=s.batch_size,
        rate_limit_per_second=s.rate_limit_per_second, daily_quota=s.daily_quota, monthly_quota=s.monthly_quota,
        allowed_classes=[proto_of(c) for c in s.allowed_classes], weight=s.weight, disabled=s.disabled,
        options=dict(s.options), create_time=to_timestamp(record.created_at),
        update_time=to_timestamp(record.updated_at),
        etag=str(s.version), webhook_secret_names=list(record.webhook_secret_names))


UNLIMITED_AS_NUMBER = 1e18
"""How "no limit" (an infinite quota or rate budget) is written in the breakdown."""


def _score(s: ProviderScore) -> providers_pb2.ProviderScore:
    return providers_pb2.ProviderScore(
        provider=f"providers/{s.provider_id}", type=s.type, score=s.score,
        expected_cost_micros=s.expected_cost_micros, latency_ms_ewma=s.latency_ms, error_rate=s.error_rate,
        breaker_state=s.breaker, remaining_daily_quota=min(s.remaining_daily_quota, UNLIMITED_AS_NUMBER),
        rate_budget_per_second=min(s.rate_budget_per_second, UNLIMITED_AS_NUMBER),
        excluded_reason=s.excluded_reason, below_floor_reason=s.below_floor,
        latency_p99_estimate_ms=s.latency_p99_ms)


def _sender(request: providers_pb2.RouteEmailRequest) -> tuple[str, str]:
    """The tenant id and the From domain a RouteEmail request names (empty when it names no From address)."""
    if not request.from_address:
        return "", ""
    from_domain = address_domain(request.from_address)
    if not from_domain or not request.from_address.partition("@")[0]:
        raise InvalidArgument("from_address is not an email address",
                              field_violations=[FieldViolation("from_address", "an address such as news@example.com")])
    if not request.tenant:
        raise InvalidArgument("tenant is required with from_address",
                              field_violations=[FieldViolation("tenant", "tenants/{id} whose domain sends")])
    return resource_id(request.tenant, "tenants", "tenant"), from_domain


class ProviderServicer(providers_pb2_grpc.ProviderServiceServicer):
    """``esp.v1.ProviderService`` over the registry (CRUD), the catalog and shared health (RouteEmail).

    It checks no scope itself: it trusts the principal the edge sends along, and ingest forwards these methods for
    the platform admin only.
    """

    def __init__(self, registry: ProviderRegistry, catalog: ProviderCatalog, health: HealthBoard,
                 domains: SendingDomains | None = None) -> None:
        self.registry = registry
        self.catalog = catalog
        self.health = health
        self.domains = domains
        """Which providers are ready for which tenant domains (None: RouteEmail does not judge readiness)."""

    async def CreateProvider(self, request: providers_pb2.CreateProviderRequest,
                             context: Any) -> providers_pb2.Provider:
        """Create a provider (``provider_id`` is its id); it reaches every replica through the KV bucket. With a
        request_id a retry returns the provider it created; INVALID_ARGUMENT for a bad id, field or configuration the
        adapter refuses, ALREADY_EXISTS for a taken id or a request_id used before for a different request (another
        body, or another provider_id)."""
        checked_text(request.provider_id, "provider_id", max_chars=MAX_ID_CHARS)
        checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        spec = ProviderSpec(id=request.provider_id, credentials=dict(request.provider.credentials),
                            webhook_secrets=dict(request.provider.webhook_secrets), **_spec_values(request.provider))
        return _proto(await self.registry.create(spec, request_id=request.request_id))

    async def GetProvider(self, request: providers_pb2.GetProviderRequest, context: Any) -> providers_pb2.Provider:
        """One provider (``providers/{id}``), without its credentials; NOT_FOUND when there is none."""
        return _proto(await self.registry.get(_id(request.name)))

    async def ListProviders(self, request: providers_pb2.ListProvidersRequest,
                            context: Any) -> providers_pb2.ListProvidersResponse:
        """Providers in id order, a page at a time (``page_size`` 50 by default, at most 1,000; the page token is the
        last id of a full page); disabled ones only with ``show_disabled``."""
        size = page_size(request.page_size)
        records = await self.registry.list(size, checked_page_token(request.page_token),
                                           show_disabled=request.show_disabled)
        token = records[-1].spec.id if len(records) == size else ""
        return providers_pb2.ListProvidersResponse(providers=[_proto(r) for r in records], next_page_token=token)

    async def UpdateProvider(self, request: providers_pb2.UpdateProviderRequest,
                             context: Any) -> providers_pb2.Provider:
        """Update the fields ``update_mask`` names, as every Update RPC reads a mask (AIP-134,
        :mod:`libs.common.field_masks`): ``*`` replaces every field but the write-only credentials and webhook
        secrets, which change only when named; no mask changes the fields the request sets to a value other than the
        default (the credentials and webhook secrets when some are given). Secrets are replaced whole, never merged.
        An ``etag`` makes it conditional: ABORTED when the provider changed since. INVALID_ARGUMENT for an etag the
        router never gives out, for a mask path that is no provider field or cannot change (``name``, ``etag``,
        output-only fields) and for an invalid result; NOT_FOUND for an unknown provider."""
        provider_id = _id(request.provider.name, "provider.name")
        values = _spec_values(request.provider)
        paths = update_paths(request.update_mask, request.provider, immutable=_NOT_UPDATABLE,
                             not_in_full_replacement=_SECRET_PATHS)
        changes = {p: values[p] for p in paths if p not in _SECRET_PATHS}
        expected = _expected_version(request.provider.etag, "provider.etag")
        credentials = dict(request.provider.credentials) if "credentials" in paths else None
        webhook_secrets = dict(request.provider.webhook_secrets) if "webhook_secrets" in paths else None
        return _proto(await self.registry.update(provider_id, changes, expected_version=expected,
                                                 credentials=credentials, webhook_secrets=webhook_secrets))

    async def DeleteProvider(self, request: providers_pb2.DeleteProviderRequest, context: Any) -> empty_pb2.Empty:
        """Delete a provider (conditional on ``etag`` when given: ABORTED when it changed since, INVALID_ARGUMENT for
        an etag the router never gives out); NOT_FOUND when there is none."""
        expected = _expected_version(request.etag, "etag")
        await self.registry.delete(_id(request.name), expected_version=expected)
        return empty_pb2.Empty()

    async def RouteEmail(self, request: providers_pb2.RouteEmailRequest,
                         context: Any) -> providers_pb2.RouteEmailResponse:
        """The fallback chain for an email as senders compute it (same catalog, fresh health, same sending
        domains), with each provider's breakdown: expected cost, latency, error rate, breaker, quota and rate budget
        left, or why it was left out — "not ready for <domain>: <the provider's status>" for a provider not ready
        for the tenant's domain of ``from_address``. Senders rank locally (no RPC per email); this answers "why
        this provider?". INVALID_ARGUMENT without a class, for a ``from_address`` that is no address, or one
        without ``tenant``."""
        message_class = class_name_of(request.message_class)
        if not message_class:
            raise InvalidArgument("message_class is required",
                                  field_violations=[FieldViolation("message_class", "otp, transactional or bulk")])
        tenant_id, from_domain = _sender(request)
        providers = list(self.catalog.providers.values())
        health = await self.health.refresh(p.id for p in providers)
        decision = rank(providers, health, EmailFacts(
            message_class, request.message_bytes, max(1, request.recipient_count),
            frozenset(e.removeprefix("providers/") for e in request.excluded_providers), request.region,
            tenant_id=tenant_id, from_domain=from_domain), domains=self.domains)
        return providers_pb2.RouteEmailResponse(ranked=[_score(s) for s in decision.ranked],
                                                excluded=[_score(s) for s in decision.excluded])


async def build_app(settings: RouterSettings) -> ServiceApp:
    """The router service for ``serve()``: registry, catalog and health, the catalog watcher and the broadcast repair
    loop."""
    secrets = optional_secret_box(settings.secrets_keys)
    if secrets is None:
        raise SettingsError(["ESP_SECRETS_KEYS: required by the router (it seals the providers' secrets)"])
    pool = await db.create_pool(settings.postgres_dsn, min_size=1, max_size=5, name="router")
    nc = await connect(settings.nats_url, "esp-router")
    js = nc.jetstream()
    kv = await open_bucket(js, settings.namespace)
    registry = ProviderRegistry(pool, kv, secrets)
    await registry.seal_stored_secrets()
    await registry.resync()
    catalog = ProviderCatalog(kv, secrets)
    redis = create_redis(settings.redis_url)
    health = HealthBoard(redis, settings.namespace, settings.breaker_policy(), refresh_s=settings.health_refresh_s,
                         demand=settings.demand())
    domains = await build_domain_parts(settings, pool, nc, secrets)

    async def close_all() -> None:
        await nc.drain()
        await redis.aclose()
        await pool.close()

    async def watch(stop: asyncio.Event) -> None:
        await catalog.run(stop)

    async def export_health(stop: asyncio.Event) -> None:
        await catalog.wait_loaded(timeout_s=60)
        await ProviderGauges(health, lambda: catalog.providers).run(stop)

    readiness = DomainReadinessWorker(pool, domains.view.kv, catalog, domains.view,
                                      poll_s=settings.domain_readiness_poll_s,
                                      ready_recheck_s=settings.domain_readiness_recheck_s)

    async def repair(stop: asyncio.Event) -> None:
        await catalog.wait_loaded(timeout_s=60)
        while not stop.is_set():
            await pause_unless_stopped(stop, settings.registry_resync_s)
            if stop.is_set():
                break
            try:
                await registry.repair(catalog.providers)
            except Exception:
                log.warning("provider broadcast repair failed", exc_info=True)

    return ServiceApp(
        name="router", default_port=50052,
        servicers=[(providers_pb2_grpc.add_ProviderServiceServicer_to_server,
                    ProviderServicer(registry, catalog, health, domains.view)),
                   (domains_pb2_grpc.add_DomainServiceServicer_to_server, domains.servicer)],
        service_names=[providers_pb2.DESCRIPTOR.services_by_name["ProviderService"].full_name,
                       domains_pb2.DESCRIPTOR.services_by_name["DomainService"].full_name],
        tasks=[watch, repair, export_health, *domains.tasks, readiness.run], closers=[close_all],
        authenticator=TrustedHeaderAuthenticator())
