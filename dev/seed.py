"""Seeding a mesh through its public API: a tenant with credits, an API key, providers, a verified sending
domain."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from esp.v1 import (
    credits_pb2,
    credits_pb2_grpc,
    domains_pb2,
    domains_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

from dev.dns_server import Record
from libs.common.message_classes import MessageClass


@dataclass(frozen=True)
class ProviderSeed:
    """A provider to create (see esp.v1.Provider)."""

    id: str
    type: str
    endpoint: str
    credentials: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    price_per_email_micros: int = 100
    rate_limit_per_second: float = 0.0
    daily_quota: int = 0
    allowed_classes: Sequence[str] = ()
    region: str = ""
    webhook_secrets: Mapping[str, str] = field(default_factory=dict)
    """What verifies the provider's delivery webhooks (write-only, sealed by the router)."""


def _admin(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def ensure_tenant(channel: grpc.Channel, admin_token: str, tenant_id: str, display_name: str = "") -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(channel)
    try:
        stub.CreateTenant(tenants_pb2.CreateTenantRequest(tenant_id=tenant_id, tenant=tenants_pb2.Tenant(
            display_name=display_name or tenant_id)), metadata=_admin(admin_token), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def create_api_key(channel: grpc.Channel, admin_token: str, tenant_id: str,
                   scopes: Sequence[str] = ("send", "read", "admin"), name: str = "demo") -> str:
    stub = tenants_pb2_grpc.TenantServiceStub(channel)
    scope_values = {"send": tenants_pb2.API_KEY_SCOPE_SEND, "read": tenants_pb2.API_KEY_SCOPE_READ,
                    "admin": tenants_pb2.API_KEY_SCOPE_ADMIN}
    reply = stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
        parent=f"tenants/{tenant_id}", api_key=tenants_pb2.ApiKey(display_name=name,
                                                                  scopes=[scope_values[s] for s in scopes])),
        metadata=_admin(admin_token), timeout=10)
    return str(reply.secret)


def top_up(channel: grpc.Channel, admin_token: str, tenant_id: str, amount: int, request_id: str) -> int:
    stub = credits_pb2_grpc.CreditServiceStub(channel)
    balance = stub.TopUp(credits_pb2.TopUpRequest(tenant=f"tenants/{tenant_id}", amount=amount,
                                                  request_id=request_id), metadata=_admin(admin_token), timeout=10)
    return int(balance.available)


def ensure_provider(channel: grpc.Channel, admin_token: str, seed: ProviderSeed) -> None:
    stub = providers_pb2_grpc.ProviderServiceStub(channel)
    provider = providers_pb2.Provider(
        type=seed.type, display_name=seed.id, endpoint=seed.endpoint, region=seed.region,
        credentials=dict(seed.credentials), webhook_secrets=dict(seed.webhook_secrets), options=dict(seed.options),
        price_per_email_micros=seed.price_per_email_micros, rate_limit_per_second=seed.rate_limit_per_second,
        daily_quota=seed.daily_quota, allowed_classes=[MessageClass(c).proto for c in seed.allowed_classes], weight=1.0)
    try:
        stub.CreateProvider(providers_pb2.CreateProviderRequest(provider_id=seed.id, provider=provider),
                            metadata=_admin(admin_token), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        provider.name = f"providers/{seed.id}"
        stub.UpdateProvider(providers_pb2.UpdateProviderRequest(provider=provider), metadata=_admin(admin_token),
                            timeout=10)


def zone_records(domain: domains_pb2.Domain) -> list[Record]:
    """The records ``domain`` asks to publish, as records of its own zone (names relative to it)."""
    zone = domain.domain
    return [Record("@" if r.name == zone else r.name.removesuffix(f".{zone}"), r.type, r.value)
            for r in domain.records]


def ensure_verified_domain(channel: grpc.Channel, api_key: str, domain: str,
                           publish: Callable[[list[Record]], None]) -> domains_pb2.Domain:
    """Add ``domain`` for the tenant of ``api_key`` (or take the one it has), ``publish`` its records in its zone
    and verify it through the router, as a tenant would: the router looks the records up in DNS."""
    stub = domains_pb2_grpc.DomainServiceStub(channel)
    metadata = (("authorization", f"Bearer {api_key}"),)
    added = stub.CreateDomain(domains_pb2.CreateDomainRequest(domain=domains_pb2.Domain(domain=domain)),
                              metadata=metadata, timeout=30)
    publish(zone_records(added))
    checked: domains_pb2.Domain = stub.VerifyDomain(domains_pb2.VerifyDomainRequest(name=added.name),
                                                    metadata=metadata, timeout=30)
    return checked
