"""Amazon SES v2 ``SendEmail``: ``POST /v2/email/outbound-emails`` (REST-JSON, AWS Signature Version 4).

boto3 pointed here with ``endpoint_url=<simulator>/p/<personality>`` works unchanged: the signature is checked
for real (access key, credential scope — date, region, service ``ses`` — and the HMAC over the canonical
request), and errors come back the way botocore parses them (``x-amzn-ErrorType`` header + ``message``).
A sender whose local part starts with ``unverified`` is an identity the account has not verified: 400
``MessageRejected``, in SES's words.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dev.simulator.dialects.base import Dialect, Parsed, Rejected
from dev.simulator.model import Personality, SimMessage, signed_raw_mime
from dev.simulator.parsing import is_valid_address, parse_mime

MAX_MESSAGE_BYTES = 40 * 1024 * 1024
MAX_RECIPIENTS = 50
#: Senders whose local part starts with this are identities the account has not verified: MessageRejected.
UNVERIFIED_PREFIX = "unverified"
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<signed>[^,]+),\s*Signature=(?P<signature>[0-9a-f]{64})$"
)


def aws_error(status: int, code: str, message: str) -> JSONResponse:
    """An AWS REST-JSON error answer."""
    return JSONResponse({"message": message}, status_code=status, headers={"x-amzn-ErrorType": code})


def _signature(secret: str, date: str, region: str, service: str, string_to_sign: str) -> str:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def expected_signature(request: Request, body: bytes, secret: str, scope: dict[str, str]) -> str:
    """The SigV4 signature of ``request`` under ``secret`` for the credential scope it claims."""
    signed = scope["signed"].split(";")
    canonical_headers = "".join(f"{name}:{' '.join(request.headers.get(name, '').split())}\n" for name in signed)
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, v in sorted(parse_qsl(request.url.query, keep_blank_values=True))
    )
    canonical_request = "\n".join(
        [
            request.method,
            quote(request.url.path, safe="/~"),
            query,
            canonical_headers,
            scope["signed"],
            hashlib.sha256(body).hexdigest(),
        ]
    )
    credential_scope = f"{scope['date']}/{scope['region']}/{scope['service']}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            request.headers.get("x-amz-date", ""),
            credential_scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    return _signature(secret, scope["date"], scope["region"], scope["service"], string_to_sign)


class SesDialect(Dialect):
    """SES v2 send path."""

    type_name = "ses"

    def operation(self, method: str, path: str) -> str | None:
        """``send`` for ``POST /v2/email/outbound-emails``."""
        return "send" if method == "POST" and path == "/v2/email/outbound-emails" else None

    def not_found(self, path: str) -> Response:
        """AWS's answer to an unknown operation."""
        return aws_error(404, "UnknownOperationException", "Unknown operation")

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """Check the SigV4 ``Authorization`` header: key id, scope (region, service ``ses``) and signature."""
        header = request.headers.get("authorization", "")
        match = _AUTHORIZATION.match(header)
        if not header:
            return aws_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        if not match:
            return aws_error(403, "IncompleteSignatureException", "Authorization header is not a SigV4 signature")
        scope = match.groupdict()
        if scope["key"] != personality.credentials["access_key_id"]:
            return aws_error(403, "UnrecognizedClientException",
                             "The security token included in the request is invalid.")
        if scope["service"] != "ses":
            return aws_error(403, "InvalidSignatureException",
                             f"Credential should be scoped to correct service: 'ses'. (got {scope['service']})")
        if personality.region and scope["region"] != personality.region:
            return aws_error(403, "InvalidSignatureException",
                             f"Credential should be scoped to a valid region, not '{scope['region']}'.")
        if not request.headers.get("x-amz-date", "").startswith(scope["date"]):
            return aws_error(403, "InvalidSignatureException", "Date in Credential scope does not match X-Amz-Date")
        expected = expected_signature(request, body, personality.credentials["secret_access_key"], scope)
        if not hmac.compare_digest(expected, scope["signature"]):
            return aws_error(403, "InvalidSignatureException",
                             "The request signature we calculated does not match the signature you provided.")
        return None

    def parse(self, personality: Personality, operation: str, path: str, request: Request, body: bytes) -> Parsed:
        """``SendEmail`` input with ``Content.Raw`` (parsed as MIME) or ``Content.Simple``."""
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise Rejected(aws_error(400, "SerializationException", "Malformed JSON"), "malformed JSON") from exc
        destination: dict[str, Any] = payload.get("Destination") or {}
        lists = {key: [str(a) for a in destination.get(key) or []]
                 for key in ("ToAddresses", "CcAddresses", "BccAddresses")}
        content = payload.get("Content") or {}
        if "Raw" in content:
            try:
                raw = base64.b64decode(content["Raw"].get("Data", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                error = aws_error(400, "SerializationException", "Raw.Data is not base64")
                raise Rejected(error, "bad base64") from exc
            if len(content["Raw"].get("Data", "")) > MAX_MESSAGE_BYTES:
                raise Rejected(aws_error(400, "MessageRejected", "Message length is more than 40 MB"), "too large")
            envelope = [*lists["ToAddresses"], *lists["CcAddresses"], *lists["BccAddresses"]] or None
            try:
                message = parse_mime(raw, envelope_recipients=envelope)
            except ValueError as exc:
                error = aws_error(400, "BadRequestException", f"Invalid raw message: {exc}")
                raise Rejected(error, "bad MIME") from exc
            message.raw_mime = signed_raw_mime(raw)
            if lists["ToAddresses"]:
                message.to = lists["ToAddresses"]
                message.cc = lists["CcAddresses"]
                message.bcc = lists["BccAddresses"]
        elif "Simple" in content:
            simple = content["Simple"]
            message = SimMessage(
                sender=str(payload.get("FromEmailAddress", "")),
                to=lists["ToAddresses"],
                cc=lists["CcAddresses"],
                bcc=lists["BccAddresses"],
                subject=str((simple.get("Subject") or {}).get("Data", "")),
                text=((simple.get("Body") or {}).get("Text") or {}).get("Data"),
                html=((simple.get("Body") or {}).get("Html") or {}).get("Data"),
            )
        else:
            raise Rejected(aws_error(400, "BadRequestException", "Content is required"), "no content")
        if payload.get("FromEmailAddress"):
            message.sender = str(payload["FromEmailAddress"])
        if not message.recipients:
            raise Rejected(aws_error(400, "BadRequestException", "Missing destination"), "no recipients")
        if len(message.recipients) > MAX_RECIPIENTS:
            raise Rejected(aws_error(400, "BadRequestException", "Recipient count exceeds 50."), "too many recipients")
        for address in [message.sender, *message.recipients]:
            if not is_valid_address(address):
                raise Rejected(aws_error(400, "BadRequestException", f"Illegal address: {address}"), "bad address")
        if message.sender.lower().startswith(UNVERIFIED_PREFIX):
            region = (personality.region or "us-east-1").upper()
            raise Rejected(aws_error(400, "MessageRejected", "Email address is not verified. The following identities "
                                                             f"failed the check in region {region}: {message.sender}"),
                           "unverified identity")
        tags = {str(t.get("Name")): str(t.get("Value")) for t in payload.get("EmailTags") or []}
        message.metadata = tags
        message.esp_message_id = message.esp_message_id or tags.get("esp_message_id")
        return Parsed([message])

    def assign_ids(self, personality: Personality, operation: str, parsed: Parsed) -> None:
        """SES message ids look like ``0100018c…-<uuid>-000000``."""
        for message in parsed.messages:
            message.provider_message_id = f"0100{secrets.token_hex(6)}-{uuid.uuid4()}-000000"

    def accepted(self, personality: Personality, operation: str, parsed: Parsed) -> Response:
        """200 ``{"MessageId": …}``."""
        return JSONResponse({"MessageId": parsed.messages[0].provider_message_id})

    def outage(self) -> Response:
        """503 ServiceUnavailable."""
        return aws_error(503, "ServiceUnavailable", "Service is unavailable. Please try again later.")

    def throttled(self, retry_after_s: float) -> Response:
        """429 TooManyRequestsException (AWS sends no Retry-After)."""
        return aws_error(429, "TooManyRequestsException", "Maximum sending rate exceeded.")

    def quota_exceeded(self, retry_after_s: int) -> Response:
        """The throttling error SES documents for an exhausted 24-hour quota."""
        return aws_error(429, "ThrottlingException", "Daily message quota exceeded.")

    def server_error(self) -> Response:
        """500 InternalFailure."""
        return aws_error(500, "InternalFailure", "The request processing has failed because of an unknown error.")
