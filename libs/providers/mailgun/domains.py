"""Mailgun domains: ``POST /v3/domains`` registers one, ``GET /v3/domains/{name}`` reads its state.

Same endpoint (its region: a domain lives in the US or the EU only) and API key as the adapter. A domain's
``state`` is ``active`` (ready), ``unverified`` (pending: its ``sending_dns_records`` are not all found yet) or
``disabled`` (failed). Creating a domain the account already has answers 400 "… already …": it is read instead.
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

__all__ = ["REGISTRAR", "MailgunDomains"]

_STATES = {"active": ReadinessState.READY, "unverified": ReadinessState.PENDING,
           "disabled": ReadinessState.FAILED}


def _message(response: httpx.Response) -> str:
    body = response_json(response)
    return str(body.get("message", "")) if isinstance(body, dict) else response.text[:200]


def domain_status(body: Any) -> DomainStatus:
    """The status a ``GET``/``POST`` domain answer stands for."""
    if not isinstance(body, dict) or not isinstance(body.get("domain"), dict):
        raise RegistrationUnavailable(f"unexpected Mailgun domain answer: {str(body)[:200]}")
    domain = body["domain"]
    raw_state = str(domain.get("state", ""))
    records = tuple(
        DnsRecord(str(r.get("record_type", "")), str(r.get("name", "")), str(r.get("value", "")),
                  {"valid": True, "invalid": False}.get(str(r.get("valid", ""))))
        for r in body.get("sending_dns_records") or () if isinstance(r, dict))
    state = _STATES.get(raw_state, ReadinessState.PENDING)
    detail = f"state {raw_state}"
    missing = [r.name for r in records if r.valid is not True]
    if state is ReadinessState.PENDING and missing:
        detail += f"; sending DNS records not verified: {', '.join(missing)}"
    disabled = domain.get("disabled")
    if state is ReadinessState.FAILED and isinstance(disabled, dict) and disabled.get("reason"):
        detail += f": {disabled['reason']}"
    return DomainStatus(state, detail, records)


class MailgunDomains(HttpRegistrar):
    """Mailgun's domains API, with basic auth ``api:<api_key>``."""

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = config.credential("api_key")
        super().__init__(config, transport=transport)

    def auth(self) -> httpx.Auth:
        """HTTP basic auth, user ``api``, password the API key (as for sending)."""
        return httpx.BasicAuth("api", self._api_key)

    async def register(self, domain: str) -> DomainStatus:
        """``POST /v3/domains`` with form field ``name``; a domain the account already has is read instead."""
        response = await self.request("POST", "/v3/domains", data={"name": domain})
        unavailable_unless(response, 200)
        if response.status_code == 200:
            return domain_status(response_json(response))
        message = _message(response)
        if response.status_code == 400 and "already" in message.lower():
            found = await self._read(domain)
            if found is not None:
                return found
            raise RegistrationUnavailable(f"Mailgun says {domain} exists and then that it does not: {message}")
        return DomainStatus(ReadinessState.FAILED, f"registration refused ({response.status_code}): {message}")

    async def status(self, domain: str) -> DomainStatus:
        """``GET /v3/domains/{name}``; a domain Mailgun does not know is registered again."""
        found = await self._read(domain)
        return found if found is not None else await self.register(domain)

    async def _read(self, domain: str) -> DomainStatus | None:
        response = await self.request("GET", f"/v3/domains/{domain}")
        unavailable_unless(response, 200, 404)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            return DomainStatus(ReadinessState.FAILED, f"status refused ({response.status_code}): "
                                                       f"{_message(response)}")
        return domain_status(response_json(response))


REGISTRAR = MailgunDomains
"""The registrar class of type ``mailgun``, found by ``libs.providers.domain_registration``."""
