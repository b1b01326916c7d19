"""Postmark domains: ``POST /domains`` registers one, ``GET /domains/{id}`` reads it, ``PUT
/domains/{id}/verifyDkim`` asks Postmark to look its DKIM record up again.

Same endpoint as the adapter, but the domains API is account-level: it takes the **account** token (header
``X-Postmark-Account-Token``, credential ``account_token``), not the server token that sends. A domain is ready
once ``DKIMVerified`` (mail from it is then DKIM-signed by Postmark for it, which DMARC aligns on); the Return-Path
CNAME (``ReturnPathDomainVerified``) is reported among the records but not waited for. Creating a domain the
account already has answers 422 with ``ErrorCode`` 512: it is looked up instead.
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

__all__ = ["REGISTRAR", "PostmarkDomains"]

DOMAIN_EXISTS = 512
"""Postmark's ``ErrorCode`` for "Domain already exists"."""
LIST_PAGE = 500
"""The most domains one list call returns."""
RETURN_PATH_PREFIX = "pm-bounces"
"""The Return-Path subdomain asked for, as Postmark's own examples name it."""


def _error(response: httpx.Response) -> tuple[int | None, str]:
    body = response_json(response)
    if isinstance(body, dict):
        code = body.get("ErrorCode")
        return (code if isinstance(code, int) else None), str(body.get("Message", ""))
    return None, response.text[:200]


def domain_status(details: dict[str, Any]) -> DomainStatus:
    """The status of a domain's details answer."""
    dkim_verified = details.get("DKIMVerified") is True
    records: list[DnsRecord] = []
    host = details.get("DKIMPendingHost") or details.get("DKIMHost")
    value = details.get("DKIMPendingTextValue") or details.get("DKIMTextValue")
    if host:
        records.append(DnsRecord("TXT", str(host), str(value or ""), dkim_verified))
    if details.get("ReturnPathDomain"):
        records.append(DnsRecord("CNAME", str(details["ReturnPathDomain"]),
                                 str(details.get("ReturnPathDomainCNAMEValue", "")),
                                 details.get("ReturnPathDomainVerified") is True))
    ref = str(details.get("ID", ""))
    update = str(details.get("DKIMUpdateStatus", ""))
    detail = (f"DKIMVerified {str(dkim_verified).lower()}, ReturnPathDomainVerified "
              f"{str(details.get('ReturnPathDomainVerified') is True).lower()}")
    if update:
        detail += f", DKIMUpdateStatus {update}"
    if dkim_verified:
        return DomainStatus(ReadinessState.READY, detail, tuple(records), ref)
    state = ReadinessState.FAILED if update.lower() == "failed" else ReadinessState.PENDING
    return DomainStatus(state, detail, tuple(records), ref)


class PostmarkDomains(HttpRegistrar):
    """Postmark's account-level domains API."""

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._token = config.credential("account_token")
        super().__init__(config, transport=transport)

    def default_headers(self) -> dict[str, str]:
        """The account token, JSON both ways."""
        return {"X-Postmark-Account-Token": self._token, "Accept": "application/json"}

    async def register(self, domain: str) -> DomainStatus:
        """The existing domain if the account has it, else ``POST /domains`` with a Return-Path subdomain."""
        found = await self._find(domain)
        if found is not None:
            return await self._checked(found)
        response = await self.request("POST", "/domains", json={
            "Name": domain, "ReturnPathDomain": f"{RETURN_PATH_PREFIX}.{domain}"})
        unavailable_unless(response, 200)
        body = response_json(response)
        if response.status_code == 200 and isinstance(body, dict):
            return domain_status(body)
        code, message = _error(response)
        if code == DOMAIN_EXISTS:
            found = await self._find(domain)
            if found is not None:
                return await self._checked(found)
            raise RegistrationUnavailable(f"Postmark says {domain} exists and then that it does not: {message}")
        return DomainStatus(ReadinessState.FAILED,
                            f"registration refused ({response.status_code}, ErrorCode {code}): {message}")

    async def status(self, domain: str) -> DomainStatus:
        """The domain's details (registering it when the account has none), its DKIM checked again while not
        verified."""
        found = await self._find(domain)
        if found is None:
            return await self.register(domain)
        return await self._checked(found)

    async def _find(self, domain: str) -> int | None:
        offset = 0
        while True:
            response = await self.request("GET", "/domains", params={"count": LIST_PAGE, "offset": offset})
            unavailable_unless(response, 200)
            body = response_json(response)
            if response.status_code != 200 or not isinstance(body, dict):
                raise RegistrationUnavailable(f"Postmark did not list domains ({response.status_code}): "
                                              f"{_error(response)[1]}")
            page = [d for d in body.get("Domains") or () if isinstance(d, dict)]
            for entry in page:
                if str(entry.get("Name", "")).lower() == domain and isinstance(entry.get("ID"), int):
                    return int(entry["ID"])
            offset += len(page)
            if not page or offset >= int(body.get("TotalCount") or 0):
                return None

    async def _checked(self, domain_id: int) -> DomainStatus:
        response = await self.request("GET", f"/domains/{domain_id}")
        unavailable_unless(response, 200)
        body = response_json(response)
        if response.status_code != 200 or not isinstance(body, dict):
            raise RegistrationUnavailable(f"Postmark did not read domain {domain_id} ({response.status_code})")
        if body.get("DKIMVerified") is True:
            return domain_status(body)
        response = await self.request("PUT", f"/domains/{domain_id}/verifyDkim")
        unavailable_unless(response, 200)
        checked = response_json(response)
        return domain_status(checked if response.status_code == 200 and isinstance(checked, dict) else body)


REGISTRAR = PostmarkDomains
"""The registrar class of type ``postmark``, found by ``libs.providers.domain_registration``."""
