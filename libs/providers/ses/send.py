"""Amazon SES v2 adapter: boto3 ``sesv2.send_email`` with ``Content.Raw`` (our own MIME), run in a thread.

Configuration (``ProviderConfig``):
    endpoint: empty for AWS's regional endpoint, or a base URL (``endpoint_url``; the simulator, a VPC endpoint).
    region: the AWS region, e.g. ``eu-west-1`` (required).
    credentials: ``access_key_id`` + ``secret_access_key`` (+ ``session_token``); when absent boto3's default
    chain (instance role, environment) is used.
    options: ``configuration_set`` (``ConfigurationSetName``, needed for event publishing unless the identity
    has a default set), ``threads`` (boto3 calls in flight, default 16).

Errors: throttling codes are throttled; account, identity and credential codes are permanent and the provider's
fault, and so is ``MessageRejected`` when it says an identity is not verified (the sender's address or domain, or
in the sandbox a recipient): that is our account at SES, not the email, which another provider would send. Any
other ``MessageRejected`` (content SES refuses) fails the email; 5xx is retryable.

boto3 is synchronous, so calls run in a private thread pool; botocore's own retries are off because the sender
owns retries. Raw content needs the whole MIME message in memory (≤ 40 MB, and botocore base64-encodes it into
the JSON body: two copies); SES has no streaming upload. Tags become ``EmailTags`` (so they come back in every
event's ``mail.tags``) together with our message and tenant ids.

DKIM: an email with the tenant's keys is signed by us (raw content is our MIME), besides the signature SES adds
itself (Easy DKIM, or ``d=amazonses.com``). SES rewrites ``Message-ID`` and ``Date``, and its manual-signing guide
says not to sign them (nor ``Return-Path``, ``Bounces-To``): our signatures leave them out.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from libs.providers.base import BaseAdapter
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.providers.dkim import DEFAULT_SIGNED_HEADERS
from libs.providers.errors import AdapterConfigError, UnsupportedFeature
from libs.providers.mime import MimeDocument, build_mime
from libs.providers.model import (
    ESP_MESSAGE_ID_KEY,
    ESP_TENANT_ID_KEY,
    OutboundEmail,
    Outcome,
    ProviderConfig,
    SendResult,
    personalize,
)

__all__ = [
    "ADAPTER",
    "SesAdapter",
]

#: SES error codes that mean "slow down" (sending rate, daily quota, API request rate).
THROTTLING_CODES = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "Throttling", "LimitExceededException"}
)
#: SES/AWS error codes that mean our account, identity or credentials are at fault, not the email.
ACCOUNT_CODES = frozenset(
    {
        "SendingPausedException",
        "AccountSuspendedException",
        "MailFromDomainNotVerifiedException",
        "NotFoundException",
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
#: What SES says in a ``MessageRejected`` about an identity (sender, domain, or recipient in the sandbox) that is not
#: verified in the region: "Email address is not verified. The following identities failed the check in region …".
_UNVERIFIED_IDENTITY = re.compile(r"\bnot verified\b", re.IGNORECASE)
#: Headers SES replaces in raw content, which a signature of ours must not cover (its manual DKIM signing guide).
_SES_REWRITTEN_HEADERS = frozenset({"message-id", "date", "return-path", "bounces-to"})
#: EmailTags names and values: ASCII letters, digits, ``_`` and ``-``, at most 256 characters.
_TAG_TEXT = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


def classify_client_error(error: botocore.exceptions.ClientError) -> SendResult:
    """The outcome of an SES error answer."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    message = str(error.response.get("Error", {}).get("Message", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    reason = f"{code}: {message}"
    if code in THROTTLING_CODES:
        return SendResult(Outcome.THROTTLED, reason=reason, status_code=status, provider_fault=True)
    if code in ACCOUNT_CODES or (code == "MessageRejected" and _UNVERIFIED_IDENTITY.search(message)):
        return SendResult(Outcome.PERMANENT, reason=reason, status_code=status, provider_fault=True)
    if isinstance(status, int) and status >= 500:
        return SendResult(Outcome.RETRYABLE, reason=reason, status_code=status, provider_fault=True)
    return SendResult(Outcome.PERMANENT, reason=reason, status_code=status)


class SesAdapter(BaseAdapter):
    """Amazon SES through the v2 API."""

    type_name = "ses"
    default_capabilities = DEFAULT_CAPABILITIES["ses"]
    dkim_signed_headers = tuple(h for h in DEFAULT_SIGNED_HEADERS if h not in _SES_REWRITTEN_HEADERS)

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        if not config.region:
            raise AdapterConfigError(f"provider {config.name!r}: ses needs a region")
        self.capabilities = replace(self.capabilities, regions=(config.region,))
        threads = max(1, config.option_int("threads", 16))
        self._configuration_set = config.option("configuration_set")
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"ses-{config.name}")
        session_args: dict[str, str] = {}
        if config.credentials.get("access_key_id"):
            session_args = {
                "aws_access_key_id": config.credential("access_key_id"),
                "aws_secret_access_key": config.credential("secret_access_key"),
            }
            if config.credentials.get("session_token"):
                session_args["aws_session_token"] = config.credentials["session_token"]
        self._client: Any = boto3.session.Session(**session_args).client(
            "sesv2",
            region_name=config.region,
            endpoint_url=config.endpoint or None,
            config=botocore.config.Config(
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.timeout_s,
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=threads,
            ),
        )

    def check_features(self, email: OutboundEmail) -> None:
        """Tags and metadata travel as EmailTags, whose names and values allow only ``[A-Za-z0-9_-]``."""
        super().check_features(email)
        for text in [*email.tags, *email.metadata.keys(), *email.metadata.values(), email.tenant_id]:
            if not _TAG_TEXT.match(text):
                raise UnsupportedFeature(self.type_name, f"tag or metadata text {text!r} (only A-Za-z0-9_-)")

    def _email_tags(self, email: OutboundEmail) -> list[dict[str, str]]:
        tags = [
            {"Name": ESP_MESSAGE_ID_KEY, "Value": email.message_id},
            {"Name": ESP_TENANT_ID_KEY, "Value": email.tenant_id},
        ]
        tags.extend({"Name": key, "Value": value} for key, value in email.metadata.items())
        tags.extend({"Name": tag, "Value": "true"} for tag in email.tags)
        return tags

    async def _deliver(self, email: OutboundEmail) -> SendResult:
        email = personalize(email)
        raw = await build_mime(email).read()
        signed_with: tuple[str, ...] = ()
        if self.signs(email):  # signed in memory: the attachments were read once, into ``raw``
            document, signed_with = await self.sign_mime(email, MimeDocument((raw,), len(raw)))
            raw = await document.read()
        destination: dict[str, list[str]] = {"ToAddresses": [a.email for a in email.to]}
        if email.cc:
            destination["CcAddresses"] = [a.email for a in email.cc]
        if email.bcc:
            destination["BccAddresses"] = [a.email for a in email.bcc]
        request: dict[str, Any] = {
            "FromEmailAddress": email.sender.email,
            "Destination": destination,
            "Content": {"Raw": {"Data": raw}},
            "EmailTags": self._email_tags(email),
        }
        if self._configuration_set:
            request["ConfigurationSetName"] = self._configuration_set
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self._executor, lambda: self._client.send_email(**request))
        return SendResult(
            Outcome.ACCEPTED,
            provider_message_id=response.get("MessageId"),
            status_code=response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            dkim_algorithms=signed_with,
        )

    def _classify_exception(self, exc: BaseException) -> SendResult | None:
        if isinstance(exc, botocore.exceptions.ClientError):
            return classify_client_error(exc)
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.EndpointConnectionError):
            return SendResult(Outcome.RETRYABLE, reason=reason, provider_fault=True)
        if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectionClosedError):
            # The request was sent; SES may have accepted the email before the answer was lost.
            return SendResult(Outcome.AMBIGUOUS, reason=reason, provider_fault=True)
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return SendResult(Outcome.PERMANENT, reason=reason, provider_fault=True)
        if isinstance(exc, botocore.exceptions.HTTPClientError):
            return SendResult(Outcome.RETRYABLE, reason=reason, provider_fault=True)
        return None

    async def aclose(self) -> None:
        """Close boto3's connection pool and stop the threads."""
        self._client.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


ADAPTER = SesAdapter
"""The adapter class of type ``ses``, found by ``libs.providers.registry``."""
