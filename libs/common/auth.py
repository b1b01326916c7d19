"""Who is calling: the principal of the current RPC, set once per call by the handler wrapper.

The public edge (ingest) authenticates API keys; behind it, services trust the ``x-esp-tenant`` and
``x-esp-scopes`` metadata that the edge adds (the mesh network is closed to the outside by NetworkPolicy).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Protocol

from libs.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

__all__ = [
    "PLATFORM_ADMIN",
    "SCOPES_HEADER",
    "TENANT_HEADER",
    "Authenticator",
    "Principal",
    "TrustedHeaderAuthenticator",
    "check_tenant_access",
    "current_principal",
    "current_tenant",
    "reset_principal",
    "set_principal",
]

TENANT_HEADER = "x-esp-tenant"
SCOPES_HEADER = "x-esp-scopes"
PLATFORM_ADMIN = "platform-admin"


@dataclass(frozen=True)
class Principal:
    """The caller of an RPC."""

    tenant_id: str
    """Empty for the platform admin, who acts on every tenant."""
    scopes: frozenset[str]
    key_id: str = ""

    @property
    def is_platform_admin(self) -> bool:
        """Whether the caller is the platform's operator, who acts on every tenant."""
        return PLATFORM_ADMIN in self.scopes

    def require(self, scope: str) -> None:
        """Raise PERMISSION_DENIED unless the principal holds ``scope`` (the platform admin holds all)."""
        if scope not in self.scopes and not self.is_platform_admin:
            raise PermissionDenied(f"this API key lacks the {scope!r} scope", reason="MISSING_SCOPE",
                                   metadata={"scope": scope})

    def as_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata that carries this principal to a service behind the edge."""
        return ((TENANT_HEADER, self.tenant_id), (SCOPES_HEADER, ",".join(sorted(self.scopes))))


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("esp_principal", default=None)


def current_principal() -> Principal:
    """The principal of the RPC being served; UNAUTHENTICATED when there is none."""
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no credentials", reason="MISSING_CREDENTIALS")
    return principal


def current_tenant(scope: str) -> str:
    """The calling tenant, once its principal is known to hold ``scope``; INVALID_ARGUMENT for a caller without a
    tenant (the platform admin calling a tenant's method without naming one)."""
    principal = current_principal()
    principal.require(scope)
    if not principal.tenant_id:
        raise InvalidArgument("this call needs a tenant (x-esp-tenant)", reason="TENANT_REQUIRED")
    return principal.tenant_id


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make ``principal`` the caller of the RPC being served (the handler wrapper's job, once per call)."""
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    """Restore the caller that ``set_principal`` replaced."""
    _current.reset(token)


class Authenticator(Protocol):
    """Turns an RPC's metadata into a principal, or None for methods that need none (health, reflection)."""

    def __call__(self, method: str, metadata: Mapping[str, str]) -> Awaitable[Principal | None]:
        """The principal calling ``method`` with ``metadata``; raise ``Unauthenticated`` for bad credentials."""
        ...


class TrustedHeaderAuthenticator:
    """For services behind the edge: the principal travels in metadata set by the edge."""

    async def __call__(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        """The principal the edge put in the metadata; None when the call came without one (mesh-internal)."""
        if TENANT_HEADER not in metadata and SCOPES_HEADER not in metadata:
            return None
        scopes = frozenset(s for s in metadata.get(SCOPES_HEADER, "").split(",") if s)
        return Principal(tenant_id=metadata.get(TENANT_HEADER, ""), scopes=scopes)


def check_tenant_access(tenant_id: str) -> None:
    """For tenant-scoped resources: a caller of another tenant gets NOT_FOUND (the resource 'does not exist'
    for them); mesh-internal calls without a principal and the platform admin pass."""
    principal = _current.get()
    if principal is not None and not principal.is_platform_admin and principal.tenant_id != tenant_id:
        raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")
