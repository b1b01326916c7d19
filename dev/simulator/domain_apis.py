"""The providers' sending-domain APIs, in each provider's wire format, over the simulator's per-domain state.

- SES v2: ``POST /v2/email/identities`` (``CreateEmailIdentity``), ``GET /v2/email/identities/{id}``
  (``GetEmailIdentity``); SigV4 as for sending.
- Mailgun: ``POST /v3/domains`` (form field ``name``), ``GET /v3/domains/{name}``; basic auth as for sending.
- SendGrid domain authentication: ``GET``/``POST /v3/whitelabel/domains`` (``?domain=`` filters),
  ``POST /v3/whitelabel/domains/{id}/validate``; bearer key as for sending.
- Postmark (account level): ``GET``/``POST /domains``, ``GET /domains/{id}``, ``PUT /domains/{id}/verifyDkim``;
  header ``X-Postmark-Account-Token`` (the personality's credential ``account_token``).

A domain registered at a personality is verified at once unless the admin API holds it
(``PUT /_sim/personalities/{name}/domains/{domain}`` with ``{"state": "pending" | "failed", "detail": …}``):
pending answers the provider's not-yet-verified status; failed makes the provider refuse the registration with
``detail`` as its message where it refuses registrations (Mailgun, SendGrid, Postmark) and, for a domain
registered already or at SES, report it failed (SES ``FAILED``, Mailgun ``disabled``, Postmark
``DKIMUpdateStatus: Failed``, SendGrid a validation reason). Each answer is computed from the current state, so
dropping the hold makes the next read verified.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dev.simulator.dialects.mailgun import MailgunDialect
from dev.simulator.dialects.sendgrid import SendGridDialect
from dev.simulator.dialects.ses import SesDialect, aws_error
from dev.simulator.model import Personality, SimDomain
from dev.simulator.parsing import parse_form_data
from dev.simulator.state import SimulatorState

__all__ = ["DOMAIN_APIS", "DomainApi", "DomainCall"]

SES_ERROR_TYPES = ("HOST_NOT_FOUND", "INVALID_VALUE", "TYPE_NOT_FOUND", "SERVICE_ERROR", "DNS_SERVER_ERROR",
                   "REPLICATION_ERROR")
"""SES's ``VerificationInfo.ErrorType`` values; a failed hold's detail is used when it is one of them."""


@dataclass(frozen=True)
class DomainCall:
    """A request to a domain API: the operation and what its path names."""

    operation: str
    argument: str = ""


def _tokens(domain: str, count: int, salt: str) -> list[str]:
    """Stable per-domain tokens (DKIM selectors, key material): the same domain reads the same each time."""
    return [hashlib.sha256(f"{salt}:{domain}:{i}".encode()).hexdigest()[:32] for i in range(count)]


def _fake_public_key(domain: str) -> str:
    return base64.b64encode(hashlib.sha512(domain.encode()).digest() * 2).decode()


class DomainApi(ABC):
    """One provider's domain API."""

    @abstractmethod
    def match(self, method: str, path: str) -> DomainCall | None:
        """The call ``method path`` names, or None when it is no domain call."""

    @abstractmethod
    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """None when the request carries the credentials this API takes, else the provider's refusal."""

    @abstractmethod
    async def handle(self, personality: Personality, call: DomainCall, request: Request, body: bytes,
                     state: SimulatorState) -> Response:
        """The provider's answer."""


# -- SES ---------------------------------------------------------------------------------------------------------

class SesDomainApi(DomainApi):
    """SES v2 email identities (domains only: an address identity is answered as SES would, but never verified)."""

    _IDENTITY = re.compile(r"^/v2/email/identities/(?P<id>[^/]+)$")

    def match(self, method: str, path: str) -> DomainCall | None:
        """``create`` or ``get``."""
        if method == "POST" and path == "/v2/email/identities":
            return DomainCall("create")
        found = self._IDENTITY.match(path)
        if method == "GET" and found:
            return DomainCall("get", unquote(found.group("id")))
        return None

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """SigV4, scoped to service ``ses``, as for sending."""
        return SesDialect().authenticate(personality, request, body)

    def _answer(self, personality: Personality, domain: str, state: SimulatorState, *, full: bool) -> dict[str, Any]:
        status, detail = state.domain_state(personality.name, domain)
        dkim = {"verified": "SUCCESS", "pending": "PENDING", "failed": "FAILED"}[status]
        answer: dict[str, Any] = {
            "IdentityType": "DOMAIN", "VerifiedForSendingStatus": status == "verified",
            "DkimAttributes": {"SigningEnabled": True, "Status": dkim, "Tokens": _tokens(domain, 3, "ses"),
                               "SigningAttributesOrigin": "AWS_SES", "NextSigningKeyLength": "RSA_2048_BIT",
                               "CurrentSigningKeyLength": "RSA_2048_BIT"}}
        if full:
            answer.update({"FeedbackForwardingStatus": True, "VerificationStatus": dkim, "Policies": {}, "Tags": [],
                           "MailFromAttributes": {"BehaviorOnMxFailure": "USE_DEFAULT_VALUE"}})
            if status == "failed":
                answer["VerificationInfo"] = {
                    "ErrorType": detail if detail in SES_ERROR_TYPES else "HOST_NOT_FOUND",
                    "LastCheckedTimestamp": datetime.now(UTC).timestamp()}
        return answer

    async def handle(self, personality: Personality, call: DomainCall, request: Request, body: bytes,
                     state: SimulatorState) -> Response:
        """``CreateEmailIdentity`` / ``GetEmailIdentity``."""
        if call.operation == "create":
            try:
                payload = json.loads(body)
            except ValueError:
                return aws_error(400, "SerializationException", "Malformed JSON")
            identity = str((payload or {}).get("EmailIdentity", "")).strip().lower()
            if not identity or "@" in identity or "." not in identity:
                return aws_error(400, "BadRequestException", f"Invalid domain name {identity!r}.")
            _, created = state.register_domain(personality.name, identity)
            if not created:
                return aws_error(400, "AlreadyExistsException", f"Email identity {identity} already exist.")
            return JSONResponse(self._answer(personality, identity, state, full=False))
        if state.registered_domain(personality.name, call.argument) is None:
            return aws_error(404, "NotFoundException", f"Email identity {call.argument} does not exist.")
        return JSONResponse(self._answer(personality, call.argument.lower(), state, full=True))


# -- Mailgun -----------------------------------------------------------------------------------------------------

class MailgunDomainApi(DomainApi):
    """Mailgun's domains API (v3)."""

    _DOMAIN = re.compile(r"^/v3/domains/(?P<name>[^/]+)$")

    def match(self, method: str, path: str) -> DomainCall | None:
        """``create`` or ``get``."""
        if method == "POST" and path == "/v3/domains":
            return DomainCall("create")
        found = self._DOMAIN.match(path)
        if method == "GET" and found:
            return DomainCall("get", unquote(found.group("name")))
        return None

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """Basic auth ``api:<key>``, as for sending."""
        return MailgunDialect().authenticate(personality, request, body)

    def _answer(self, personality: Personality, domain: SimDomain, state: SimulatorState, *,
                created: bool) -> dict[str, Any]:
        status, detail = state.domain_state(personality.name, domain.name)
        valid = "unknown" if created and status != "verified" else "valid" if status == "verified" else "invalid"
        selector = f"pdk{domain.id}"
        mailgun_state = {"verified": "active", "pending": "unverified", "failed": "disabled"}[status]
        entry: dict[str, Any] = {
            "created_at": datetime.fromtimestamp(domain.created_at, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "id": _tokens(domain.name, 1, "mailgun")[0][:24], "is_disabled": status == "failed",
            "name": domain.name, "require_tls": False, "skip_verification": False,
            "smtp_login": f"postmaster@{domain.name}", "spam_action": "disabled", "state": mailgun_state,
            "type": "custom", "web_prefix": "email", "web_scheme": "https", "wildcard": False}
        if status == "failed":
            entry["disabled"] = {"code": "", "note": "", "permanently": False,
                                 "reason": detail or "verification failed"}
        return {
            "domain": entry,
            "receiving_dns_records": [
                {"cached": [], "priority": "10", "record_type": "MX", "valid": valid, "value": f"mx{x}.mailgun.org"}
                for x in ("a", "b")],
            "sending_dns_records": [
                {"cached": [], "name": domain.name, "record_type": "TXT", "valid": valid,
                 "value": "v=spf1 include:mailgun.org ~all"},
                {"cached": [], "name": f"{selector}._domainkey.{domain.name}", "record_type": "TXT", "valid": valid,
                 "value": f"k=rsa; p={_fake_public_key(domain.name)}"},
                {"cached": [], "name": f"email.{domain.name}", "record_type": "CNAME", "valid": valid,
                 "value": "mailgun.org"}],
        }

    async def handle(self, personality: Personality, call: DomainCall, request: Request, body: bytes,
                     state: SimulatorState) -> Response:
        """Create (form field ``name``) or read a domain."""
        if call.operation == "create":
            content_type = request.headers.get("content-type", "")
            try:
                if content_type.startswith("application/x-www-form-urlencoded"):
                    names = parse_qs(body.decode()).get("name", [])
                else:  # Mailgun takes either form encoding
                    names = [v for k, v in parse_form_data(body, content_type) if k == "name" and isinstance(v, str)]
            except (ValueError, UnicodeDecodeError) as exc:
                return JSONResponse({"message": f"Invalid body: {exc}"}, status_code=400)
            if not names or "." not in names[0]:
                return JSONResponse({"message": "'name' parameter is not a valid domain name"}, status_code=400)
            name = names[0].strip().lower()
            held, detail = state.domain_state(personality.name, name)
            if held == "failed" and state.registered_domain(personality.name, name) is None:
                return JSONResponse({"message": detail or "Domain creation failed"}, status_code=400)
            domain, created = state.register_domain(personality.name, name)
            if not created:
                return JSONResponse({"message": "This domain name is already taken"}, status_code=400)
            return JSONResponse({"message": "Domain DNS records have been created",
                                 **self._answer(personality, domain, state, created=True)})
        found = state.registered_domain(personality.name, call.argument)
        if found is None:
            return JSONResponse({"message": "Domain not found"}, status_code=404)
        return JSONResponse(self._answer(personality, found, state, created=False))


# -- SendGrid ----------------------------------------------------------------------------------------------------

class SendGridDomainApi(DomainApi):
    """SendGrid's domain authentication (automated security: three CNAMEs)."""

    _VALIDATE = re.compile(r"^/v3/whitelabel/domains/(?P<id>\d+)/validate$")
    USER_ID = 7

    def match(self, method: str, path: str) -> DomainCall | None:
        """``list``, ``create`` or ``validate``."""
        if path == "/v3/whitelabel/domains":
            return {"GET": DomainCall("list"), "POST": DomainCall("create")}.get(method)
        found = self._VALIDATE.match(path)
        if method == "POST" and found:
            return DomainCall("validate", found.group("id"))
        return None

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """``Authorization: Bearer <key>``, as for sending."""
        return SendGridDialect().authenticate(personality, request, body)

    def _dns(self, domain: SimDomain, valid: bool) -> dict[str, Any]:
        user = f"u{self.USER_ID}.wl{domain.id}.sendgrid.net"
        return {
            "mail_cname": {"valid": valid, "type": "cname", "host": f"em{domain.id}.{domain.name}", "data": user},
            "dkim1": {"valid": valid, "type": "cname", "host": f"s1._domainkey.{domain.name}",
                      "data": f"s1.domainkey.{user}"},
            "dkim2": {"valid": valid, "type": "cname", "host": f"s2._domainkey.{domain.name}",
                      "data": f"s2.domainkey.{user}"}}

    def _entry(self, personality: Personality, domain: SimDomain, state: SimulatorState) -> dict[str, Any]:
        valid = state.domain_state(personality.name, domain.name)[0] == "verified"
        return {"id": domain.id, "user_id": self.USER_ID, "subdomain": f"em{domain.id}", "domain": domain.name,
                "username": personality.name, "ips": [], "custom_spf": False, "default": False, "legacy": False,
                "automatic_security": True, "valid": valid, "dns": self._dns(domain, valid)}

    async def handle(self, personality: Personality, call: DomainCall, request: Request, body: bytes,
                     state: SimulatorState) -> Response:
        """List (``?domain=``), create, or validate an authenticated domain."""
        if call.operation == "list":
            wanted = (parse_qs(request.url.query).get("domain") or [""])[0].lower()
            return JSONResponse([self._entry(personality, d, state) for d in state.registered_domains(personality.name)
                                 if not wanted or d.name == wanted])
        if call.operation == "create":
            try:
                payload = json.loads(body)
            except ValueError:
                return JSONResponse({"errors": [{"field": None, "message": "invalid JSON"}]}, status_code=400)
            name = str((payload or {}).get("domain", "")).strip().lower()
            if not name or "." not in name:
                return JSONResponse({"errors": [{"field": "domain", "message": "domain is required"}]},
                                    status_code=400)
            held, detail = state.domain_state(personality.name, name)
            if held == "failed" and state.registered_domain(personality.name, name) is None:
                return JSONResponse({"errors": [{"field": "domain", "message": detail or "invalid domain"}]},
                                    status_code=400)
            domain, created = state.register_domain(personality.name, name)
            if not created:
                return JSONResponse({"errors": [{"field": None, "message":
                                                 "A domain authentication with that domain and subdomain "
                                                 "already exists"}]}, status_code=400)
            return JSONResponse(self._entry(personality, domain, state), status_code=201)
        found = next((d for d in state.registered_domains(personality.name) if str(d.id) == call.argument), None)
        if found is None:
            return JSONResponse({"errors": [{"field": None, "message": "authenticated domain not found"}]},
                                status_code=404)
        status, detail = state.domain_state(personality.name, found.name)
        results = {}
        for name, record in self._dns(found, status == "verified").items():
            reason = None
            if status != "verified":
                reason = detail or f"Expected CNAME for \"{record['host']}\" to match \"{record['data']}\"."
            results[name] = {"valid": status == "verified", "reason": reason}
        return JSONResponse({"id": found.id, "valid": status == "verified", "validation_results": results})


# -- Postmark ----------------------------------------------------------------------------------------------------

def _postmark_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"ErrorCode": code, "Message": message}, status_code=status)


class PostmarkDomainApi(DomainApi):
    """Postmark's account-level domains API."""

    _DOMAIN = re.compile(r"^/domains/(?P<id>\d+)(?P<verify>/verifyDkim)?$")

    def match(self, method: str, path: str) -> DomainCall | None:
        """``list``, ``create``, ``get`` or ``verify``."""
        if path in ("/domains", "/domains/"):
            return {"GET": DomainCall("list"), "POST": DomainCall("create")}.get(method)
        found = self._DOMAIN.match(path)
        if found and method == "GET" and not found.group("verify"):
            return DomainCall("get", found.group("id"))
        if found and method == "PUT" and found.group("verify"):
            return DomainCall("verify", found.group("id"))
        return None

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """``X-Postmark-Account-Token`` must be the personality's account token (the server token is refused)."""
        expected = personality.credentials.get("account_token")
        if not expected or request.headers.get("x-postmark-account-token") != expected:
            return _postmark_error(401, 10, "The Account Token you provided in the X-Postmark-Account-Token "
                                            "request header was invalid. Please verify that you are using a "
                                            "valid token.")
        return None

    def _summary(self, personality: Personality, domain: SimDomain, state: SimulatorState) -> dict[str, Any]:
        verified = state.domain_state(personality.name, domain.name)[0] == "verified"
        return {"Name": domain.name, "SPFVerified": verified, "DKIMVerified": verified, "WeakDKIM": False,
                "ReturnPathDomainVerified": verified, "ID": domain.id}

    def _details(self, personality: Personality, domain: SimDomain, state: SimulatorState) -> dict[str, Any]:
        status, _ = state.domain_state(personality.name, domain.name)
        verified = status == "verified"
        selector = datetime.fromtimestamp(domain.created_at, UTC).strftime("%Y%m%d%H%M%S") + "pm"
        key = f"k=rsa;p={_fake_public_key(domain.name)}"
        return {
            **self._summary(personality, domain, state),
            "SPFHost": domain.name, "SPFTextValue": "v=spf1 a mx include:spf.mtasv.net ~all",
            "DKIMHost": f"{selector}._domainkey.{domain.name}" if verified else "",
            "DKIMTextValue": key if verified else "",
            "DKIMPendingHost": "" if verified else f"{selector}._domainkey.{domain.name}",
            "DKIMPendingTextValue": "" if verified else key,
            "DKIMRevokedHost": "", "DKIMRevokedTextValue": "", "SafeToRemoveRevokedKeyFromDNS": False,
            "DKIMUpdateStatus": {"verified": "Verified", "pending": "Pending", "failed": "Failed"}[status],
            "ReturnPathDomain": f"pm-bounces.{domain.name}", "ReturnPathDomainCNAMEValue": "pm.mtasv.net"}

    async def handle(self, personality: Personality, call: DomainCall, request: Request, body: bytes,
                     state: SimulatorState) -> Response:
        """List, create, read or re-verify a domain."""
        if call.operation == "list":
            query = parse_qs(request.url.query)
            try:
                count, offset = int(query["count"][0]), int(query["offset"][0])
            except (KeyError, ValueError):
                return _postmark_error(422, 511, "Invalid fields supplied: count and offset are required.")
            domains = state.registered_domains(personality.name)
            return JSONResponse({"TotalCount": len(domains), "Domains": [
                self._summary(personality, d, state) for d in domains[offset:offset + min(count, 500)]]})
        if call.operation == "create":
            try:
                payload = json.loads(body)
            except ValueError:
                return _postmark_error(422, 402, "Received invalid JSON input.")
            name = str((payload or {}).get("Name", "")).strip().lower()
            if not name:
                return _postmark_error(422, 514, "Name is a required field.")
            held, detail = state.domain_state(personality.name, name)
            if held == "failed" and state.registered_domain(personality.name, name) is None:
                return _postmark_error(422, 511, detail or "Invalid fields supplied.")
            domain, created = state.register_domain(personality.name, name)
            if not created:
                return _postmark_error(422, 512, "This domain already exists.")
            return JSONResponse(self._details(personality, domain, state))
        found = next((d for d in state.registered_domains(personality.name) if str(d.id) == call.argument), None)
        if found is None:
            return _postmark_error(422, 510, "This domain was not found.")
        return JSONResponse(self._details(personality, found, state))


DOMAIN_APIS: dict[str, DomainApi] = {"ses": SesDomainApi(), "mailgun": MailgunDomainApi(),
                                     "sendgrid": SendGridDomainApi(), "postmark": PostmarkDomainApi()}
"""The domain API of each HTTP provider type."""
