"""Registering a tenant's sending domain at an upstream provider and reading back whether it may send for it.

Providers that must know a domain before they send for it (``Capabilities.registers_domains``: SES identities,
Mailgun domains, SendGrid domain authentication, Postmark domains) each have a module
``libs/providers/<type>/domains.py`` whose ``REGISTRAR`` implements :class:`DomainRegistrar` with the same endpoint
and credentials as the type's adapter. The router's readiness worker (``services.router.domain_readiness``) is
the caller: it registers a verified tenant domain once, then reads its status until the provider says ready.

Both calls answer a :class:`DomainStatus` — ready, pending (registered; the provider has not verified it yet, its
DNS records may be unpublished) or failed (the provider refused the registration or reported the domain failed),
the provider's own words as ``detail`` and the DNS records it wants published. Registering a domain the provider
already has is a success that answers its status: two router replicas registering the same domain at once must
not break. Trouble that says nothing about the domain (the network, a 5xx, throttling, our credentials) raises
:class:`RegistrationUnavailable`, and the worker tries again later.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

from libs.common.sending_domains import ReadinessState
from libs.providers.base import provider_tls_context, response_json
from libs.providers.capabilities import registers_domains
from libs.providers.errors import AdapterConfigError
from libs.providers.model import ProviderConfig

__all__ = [
    "DnsRecord",
    "DomainRegistrar",
    "DomainStatus",
    "HttpRegistrar",
    "RegistrationUnavailable",
    "create_registrar",
    "unavailable_unless",
]


@dataclass(frozen=True)
class DnsRecord:
    """One DNS record a provider wants published for a domain."""

    type: str
    """``TXT``, ``CNAME``, ``MX``."""
    name: str
    """The fully qualified owner name."""
    value: str
    valid: bool | None = None
    """What the provider last found in DNS for it (None: it does not say)."""

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (Postgres keeps the records a provider gave)."""
        return {"type": self.type, "name": self.name, "value": self.value, "valid": self.valid}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> DnsRecord:
        """Read :meth:`to_json`'s form."""
        valid = data.get("valid")
        return cls(str(data.get("type", "")), str(data.get("name", "")), str(data.get("value", "")),
                   valid if isinstance(valid, bool) else None)


@dataclass(frozen=True)
class DomainStatus:
    """What a provider says about one domain."""

    state: ReadinessState
    detail: str = ""
    """The provider's status in its own words (or why it refused the registration)."""
    records: tuple[DnsRecord, ...] = ()
    provider_ref: str = ""
    """The domain's id at the provider where it has one apart from the name (SendGrid, Postmark)."""


class RegistrationUnavailable(Exception):
    """The provider could not be asked (network, 5xx, throttled, credentials refused): try again later. Says
    nothing about the domain."""


class DomainRegistrar(Protocol):
    """One provider account's domain API."""

    async def register(self, domain: str) -> DomainStatus:
        """Register ``domain`` (one the provider already has is no error) and answer its status."""
        ...

    async def status(self, domain: str) -> DomainStatus:
        """The provider's current word on ``domain`` (registering it again if the provider has forgotten it)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class HttpRegistrar:
    """Base of the HTTP providers' registrars: one keep-alive client with the adapter's base URL and TLS context;
    subclasses give the headers and auth their domain API wants. ``transport`` lets tests inject one."""

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not config.endpoint.startswith(("http://", "https://")):
            raise AdapterConfigError(f"provider {config.name!r}: endpoint must be an http(s) base URL")
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.endpoint.rstrip("/"), headers=self.default_headers(), auth=self.auth(),
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s), transport=transport,
            verify=provider_tls_context())

    def default_headers(self) -> dict[str, str]:
        """Headers sent on every request."""
        return {"Accept": "application/json"}

    def auth(self) -> httpx.Auth | None:
        """httpx authentication for every request."""
        return None

    async def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """One call; transport failures become :class:`RegistrationUnavailable`."""
        try:
            return await self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise RegistrationUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def aclose(self) -> None:
        """Close the HTTP client's connections."""
        await self._client.aclose()


def unavailable_unless(response: httpx.Response, *ok: int) -> None:
    """Raise :class:`RegistrationUnavailable` for an answer that says nothing about the domain: throttled (429),
    the provider's fault (5xx), or our credentials refused (401, 403); return for ``ok`` and other answers."""
    status = response.status_code
    if status in ok:
        return
    if status == 429 or status >= 500 or status in (401, 403):
        body = response_json(response)
        text = str(body) if body is not None else response.text[:200]
        raise RegistrationUnavailable(f"HTTP {status}: {text}")


def create_registrar(config: ProviderConfig) -> DomainRegistrar:
    """The registrar of ``config``'s provider type; ``AdapterConfigError`` for a type that registers no domains
    (``registers_domains`` says which do) or a configuration it cannot use."""
    if not registers_domains(config.type):
        raise AdapterConfigError(f"provider type {config.type!r} registers no domains")
    module = importlib.import_module(f"libs.providers.{config.type}.domains")
    registrar: DomainRegistrar = module.REGISTRAR(config)
    return registrar
