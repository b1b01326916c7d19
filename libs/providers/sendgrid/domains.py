"""SendGrid domain authentication: ``POST /v3/whitelabel/domains`` registers a domain, ``GET
/v3/whitelabel/domains?domain=`` finds it, ``POST /v3/whitelabel/domains/{id}/validate`` asks SendGrid to look
its records up again.

Same endpoint and API key (``Authorization: Bearer``) as the adapter. An authenticated domain is ``valid`` (ready)
once SendGrid has found its ``dns`` records (``mail_cname``, ``dkim1``, ``dkim2`` with automated security);
SendGrid only looks again when asked to validate, so a status read of a domain not yet valid validates it, and
the reasons validation gives are the detail. SendGrid keeps one authentication per domain and subdomain, so
registering looks the domain up first; one created meanwhile by another router replica (400 "… already exists")
is looked up again.
"""

from __future__ import annotations

from typing import Any

import httpx

from libs.common.sending_domains import ReadinessState
from libs.providers.base import response_json
from libs.providers.domain_registration import (
    DnsRecord,
    DomainStatus,
    HttpRegistrar,
    RegistrationUnavailable,
    unavailable_unless,
)
from libs.providers.model import ProviderConfig

__all__ = ["REGISTRAR", "SendGridDomains"]

DOMAINS_PATH = "/v3/whitelabel/domains"


def _errors(response: httpx.Response) -> str:
    body = response_json(response)
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return "; ".join(str(e.get("message", "")) for e in body["errors"] if isinstance(e, dict))
    return response.text[:200]


def _records(entry: dict[str, Any]) -> tuple[DnsRecord, ...]:
    dns = entry.get("dns")
    if not isinstance(dns, dict):
        return ()
    return tuple(DnsRecord(str(r.get("type", "")).upper(), str(r.get("host", "")), str(r.get("data", "")),
                           r.get("valid") if isinstance(r.get("valid"), bool) else None)
                 for r in dns.values() if isinstance(r, dict))


def _status(entry: dict[str, Any], reasons: str = "") -> DomainStatus:
    records = _records(entry)
    ref = str(entry.get("id", ""))
    if entry.get("valid") is True:
        return DomainStatus(ReadinessState.READY, "valid", records, ref)
    detail = "not valid"
    if reasons:
        detail += f": {reasons}"
    else:
        missing = [r.name for r in records if r.valid is not True]
        if missing:
            detail += f"; records not found: {', '.join(missing)}"
    return DomainStatus(ReadinessState.PENDING, detail, records, ref)


class SendGridDomains(HttpRegistrar):
    """SendGrid's domain authentication API."""

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = config.credential("api_key")
        super().__init__(config, transport=transport)

    def default_headers(self) -> dict[str, str]:
        """The API key as a bearer token, as for sending."""
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

    async def register(self, domain: str) -> DomainStatus:
        """The existing authentication of ``domain`` if there is one, else a new one with automated security."""
        found = await self._find(domain)
        if found is not None:
            return await self._checked(found)
        response = await self.request("POST", DOMAINS_PATH, json={"domain": domain, "automatic_security": True})
        unavailable_unless(response, 200, 201)
        body = response_json(response)
        if response.status_code in (200, 201) and isinstance(body, dict):
            return _status(body)
        reasons = _errors(response)
        if response.status_code == 400 and "already exists" in reasons.lower():
            found = await self._find(domain)
            if found is not None:
                return _status(found)
            raise RegistrationUnavailable(f"SendGrid says {domain} exists and then that it does not: {reasons}")
        return DomainStatus(ReadinessState.FAILED, f"registration refused ({response.status_code}): {reasons}")

    async def status(self, domain: str) -> DomainStatus:
        """Find the domain (registering it when SendGrid has none) and, while not valid, validate it."""
        found = await self._find(domain)
        if found is None:
            return await self.register(domain)
        return await self._checked(found)

    async def _find(self, domain: str) -> dict[str, Any] | None:
        response = await self.request("GET", DOMAINS_PATH, params={"domain": domain})
        unavailable_unless(response, 200)
        body = response_json(response)
        if response.status_code != 200 or not isinstance(body, list):
            raise RegistrationUnavailable(f"SendGrid did not list domains ({response.status_code}): "
                                          f"{_errors(response)}")
        return next((e for e in body if isinstance(e, dict) and str(e.get("domain", "")).lower() == domain), None)

    async def _checked(self, entry: dict[str, Any]) -> DomainStatus:
        if entry.get("valid") is True:
            return _status(entry)
        response = await self.request("POST", f"{DOMAINS_PATH}/{entry.get('id')}/validate")
        unavailable_unless(response, 200)
        body = response_json(response)
        if response.status_code != 200 or not isinstance(body, dict):
            return _status(entry, f"validation refused ({response.status_code}): {_errors(response)}")
        if body.get("valid") is True:
            return _status({**entry, "valid": True})
        results = body.get("validation_results")
        if not isinstance(results, dict):
            results = {}
        reasons = "; ".join(f"{name}: {r.get('reason')}" for name, r in results.items()
                            if isinstance(r, dict) and not r.get("valid") and r.get("reason"))
        return _status(entry, reasons)


REGISTRAR = SendGridDomains
"""The registrar class of type ``sendgrid``, found by ``libs.providers.domain_registration``."""
