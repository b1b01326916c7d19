"""Amazon SES v2 domain identities: ``CreateEmailIdentity`` (``POST /v2/email/identities``) registers one with
Easy DKIM, ``GetEmailIdentity`` (``GET /v2/email/identities/{id}``) reads it.

Same endpoint, region and credentials as the adapter (boto3 ``sesv2``, run in a thread, botocore's retries off).
An identity is ready once ``VerifiedForSendingStatus`` is true; failed when its ``DkimAttributes.Status`` or
``VerificationStatus`` is ``FAILED`` (``VerificationInfo.ErrorType`` says why); pending otherwise. The DKIM
records SES wants are three CNAMEs ``<token>._domainkey.<domain>`` → ``<token>.dkim.amazonses.com``. Creating an
identity the account has already answers ``AlreadyExistsException``: it is read instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from libs.common.sending_domains import ReadinessState
from libs.providers.domain_registration import DnsRecord, DomainStatus, RegistrationUnavailable
from libs.providers.errors import AdapterConfigError
from libs.providers.model import ProviderConfig

__all__ = ["REGISTRAR", "SesDomains"]

DKIM_TARGET = "dkim.amazonses.com"
"""What Easy DKIM's CNAMEs point into."""
#: Error codes that say nothing about the identity: try again later.
UNAVAILABLE_CODES = frozenset({
    "TooManyRequestsException", "ThrottlingException", "Throttling", "LimitExceededException",
    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
    "InvalidSignatureException", "SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken",
    "ExpiredToken", "ExpiredTokenException", "InternalFailure", "ServiceUnavailable",
})


def identity_status(domain: str, answer: dict[str, Any]) -> DomainStatus:
    """The status a ``CreateEmailIdentity`` or ``GetEmailIdentity`` answer stands for."""
    dkim = answer.get("DkimAttributes") or {}
    dkim_status = str(dkim.get("Status", ""))
    records = tuple(DnsRecord("CNAME", f"{token}._domainkey.{domain}", f"{token}.{DKIM_TARGET}",
                              dkim_status == "SUCCESS") for token in dkim.get("Tokens") or ())
    verified = answer.get("VerifiedForSendingStatus") is True
    verification = str(answer.get("VerificationStatus", ""))
    detail = f"VerifiedForSendingStatus {str(verified).lower()}, DKIM {dkim_status or 'NOT_STARTED'}"
    if verification:
        detail += f", VerificationStatus {verification}"
    error_type = (answer.get("VerificationInfo") or {}).get("ErrorType")
    if error_type:
        detail += f" ({error_type})"
    if verified:
        return DomainStatus(ReadinessState.READY, detail, records)
    if "FAILED" in (dkim_status, verification):
        return DomainStatus(ReadinessState.FAILED, detail, records)
    return DomainStatus(ReadinessState.PENDING, detail, records)


def _code(error: botocore.exceptions.ClientError) -> tuple[str, str, int]:
    info = error.response.get("Error", {})
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return str(info.get("Code", "")), str(info.get("Message", "")), int(status)


class SesDomains:
    """SES v2 email identities of one account and region."""

    def __init__(self, config: ProviderConfig) -> None:
        if not config.region:
            raise AdapterConfigError(f"provider {config.name!r}: ses needs a region")
        session_args: dict[str, str] = {}
        if config.credentials.get("access_key_id"):
            session_args = {"aws_access_key_id": config.credential("access_key_id"),
                            "aws_secret_access_key": config.credential("secret_access_key")}
            if config.credentials.get("session_token"):
                session_args["aws_session_token"] = config.credentials["session_token"]
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"ses-domains-{config.name}")
        self._client: Any = boto3.session.Session(**session_args).client(
            "sesv2", region_name=config.region, endpoint_url=config.endpoint or None,
            config=botocore.config.Config(connect_timeout=config.connect_timeout_s, read_timeout=config.timeout_s,
                                          retries={"total_max_attempts": 1, "mode": "standard"}))

    async def _call(self, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except botocore.exceptions.ClientError as exc:
            code, message, status = _code(exc)
            if code in UNAVAILABLE_CODES or status >= 500:
                raise RegistrationUnavailable(f"{code}: {message}") from exc
            raise
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise RegistrationUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def register(self, domain: str) -> DomainStatus:
        """``CreateEmailIdentity`` for the domain; an identity the account already has is read instead."""
        try:
            answer = await self._call(lambda: self._client.create_email_identity(EmailIdentity=domain))
        except botocore.exceptions.ClientError as exc:
            code, message, status = _code(exc)
            if code == "AlreadyExistsException":
                found = await self._read(domain)
                if found is not None:
                    return found
                raise RegistrationUnavailable(f"SES says {domain} exists and then that it does not") from exc
            return DomainStatus(ReadinessState.FAILED, f"registration refused ({status}): {code}: {message}")
        return identity_status(domain, answer)

    async def status(self, domain: str) -> DomainStatus:
        """``GetEmailIdentity``; an identity SES does not know is created again."""
        found = await self._read(domain)
        return found if found is not None else await self.register(domain)

    async def _read(self, domain: str) -> DomainStatus | None:
        try:
            answer = await self._call(lambda: self._client.get_email_identity(EmailIdentity=domain))
        except botocore.exceptions.ClientError as exc:
            code, message, status = _code(exc)
            if code == "NotFoundException":
                return None
            return DomainStatus(ReadinessState.FAILED, f"status refused ({status}): {code}: {message}")
        return identity_status(domain, answer)

    async def aclose(self) -> None:
        """Close boto3's connection pool and stop the threads."""
        self._client.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


REGISTRAR = SesDomains
"""The registrar class of type ``ses``, found by ``libs.providers.domain_registration``."""
