"""Postmark adapter: ``POST /email`` and ``POST /email/batch`` with JSON bodies whose attachments stream as base64.

Configuration (``ProviderConfig``):
    endpoint: ``https://api.postmarkapp.com``.
    credentials: ``server_token`` (header ``X-Postmark-Server-Token``; ``POSTMARK_API_TEST`` validates only).
    options: ``message_stream`` (default ``outbound``), ``bulk_message_stream`` (stream for class ``bulk``,
    default the same as ``message_stream``), ``track_opens`` / ``track_links`` (``true`` / ``None`` … as Postmark
    spells them; unset leaves the server default).

Postmark has no per-recipient substitution outside templates, so every email is rendered here and a batch is
an array of complete messages (≤ 500 per call, ≤ 50 MB); the 200 answer holds one result per message, each
with its own ``ErrorCode``. Postmark allows one ``Tag`` per message and 50 recipients (To + Cc + Bcc).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from libs.providers.base import HttpAdapter, classify_http_failure, response_json
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.providers.mime import streamed_json
from libs.providers.model import (
    ESP_MESSAGE_ID_HEADER,
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
    "PostmarkAdapter",
]

EMAIL_PATH = "/email"
BATCH_PATH = "/email/batch"

#: Postmark ErrorCodes that mean our account or sender setup is at fault, not the email.
ACCOUNT_ERROR_CODES = frozenset({10, 400, 401, 405, 412, 413})
#: ErrorCodes for transient conditions (maintenance) and rate limiting.
TRANSIENT_ERROR_CODES = frozenset({100})
RATE_LIMIT_ERROR_CODES = frozenset({429})


def classify_error_code(code: int, message: str, status_code: int) -> SendResult:
    """The outcome of a Postmark ``ErrorCode`` (inside a 422, or a batch entry of a 200)."""
    reason = f"ErrorCode {code}: {message}"
    if code in RATE_LIMIT_ERROR_CODES:
        return SendResult(Outcome.THROTTLED, reason=reason, status_code=status_code, provider_fault=True)
    if code in TRANSIENT_ERROR_CODES:
        return SendResult(Outcome.RETRYABLE, reason=reason, status_code=status_code, provider_fault=True)
    return SendResult(
        Outcome.PERMANENT, reason=reason, status_code=status_code, provider_fault=code in ACCOUNT_ERROR_CODES
    )


class PostmarkAdapter(HttpAdapter):
    """Postmark's Email API."""

    type_name = "postmark"
    default_capabilities = DEFAULT_CAPABILITIES["postmark"]

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._token = config.credential("server_token")
        self._stream = config.option("message_stream", "outbound")
        self._bulk_stream = config.option("bulk_message_stream", self._stream)
        self._track_opens = config.option("track_opens")
        self._track_links = config.option("track_links")
        super().__init__(config, transport=transport)

    def default_headers(self) -> dict[str, str]:
        """Server token and JSON both ways."""
        return {"X-Postmark-Server-Token": self._token, "Accept": "application/json"}

    def _message(self, email: OutboundEmail) -> dict[str, Any]:
        email = personalize(email)
        message: dict[str, Any] = {
            "From": email.sender.formatted(),
            "To": ", ".join(a.formatted() for a in email.to),
        }
        if email.cc:
            message["Cc"] = ", ".join(a.formatted() for a in email.cc)
        if email.bcc:
            message["Bcc"] = ", ".join(a.formatted() for a in email.bcc)
        message["Subject"] = email.subject
        if email.text is not None:
            message["TextBody"] = email.text
        if email.html is not None:
            message["HtmlBody"] = email.html
        if email.reply_to:
            message["ReplyTo"] = ", ".join(a.formatted() for a in email.reply_to)
        message["Headers"] = [
            *({"Name": name, "Value": value} for name, value in email.headers.items()),
            {"Name": ESP_MESSAGE_ID_HEADER, "Value": email.message_id},
        ]
        if email.tags:
            message["Tag"] = email.tags[0]
        message["Metadata"] = {
            **email.metadata,
            ESP_MESSAGE_ID_KEY: email.message_id,
            ESP_TENANT_ID_KEY: email.tenant_id,
        }
        if email.attachments:
            message["Attachments"] = [
                {
                    "Name": attachment.filename,
                    "Content": attachment,  # streamed as base64 by streamed_json
                    "ContentType": attachment.content_type,
                    **({"ContentID": f"cid:{attachment.content_id.strip('<>')}"} if attachment.content_id else {}),
                }
                for attachment in email.attachments
            ]
        if self._track_opens:
            message["TrackOpens"] = self._track_opens.lower() == "true"
        if self._track_links:
            message["TrackLinks"] = self._track_links
        message["MessageStream"] = self._bulk_stream if email.message_class == "bulk" else self._stream
        return message

    def build_request(self, email: OutboundEmail) -> httpx.Request:
        """``POST /email``."""
        return self.streamed_request("POST", EMAIL_PATH, streamed_json(self._message(email)))

    def batch_key(self, email: OutboundEmail) -> object | None:
        """Any emails can share a batch: each is a complete message of its own."""
        return "batch"

    def build_batch_request(self, emails: Sequence[OutboundEmail]) -> httpx.Request:
        """``POST /email/batch`` with an array of messages."""
        return self.streamed_request("POST", BATCH_PATH, streamed_json([self._message(e) for e in emails]))

    def parse_response(self, email: OutboundEmail, response: httpx.Response) -> SendResult:
        """200 ``{"MessageID", "ErrorCode": 0, …}``; 422 ``{"ErrorCode", "Message"}``; other statuses by class."""
        body = response_json(response)
        if response.status_code == 200 and isinstance(body, dict):
            return self._entry_result(body, 200)
        if response.status_code == 422 and isinstance(body, dict) and isinstance(body.get("ErrorCode"), int):
            return classify_error_code(body["ErrorCode"], str(body.get("Message", "")), 422)
        message = str(body.get("Message", "")) if isinstance(body, dict) else response.text[:200]
        if response.status_code == 200:
            return SendResult(
                Outcome.PERMANENT, reason=f"unexpected 200 answer: {message}", status_code=200, provider_fault=True
            )
        return classify_http_failure(response, message)

    def parse_batch_response(self, emails: Sequence[OutboundEmail], response: httpx.Response) -> list[SendResult]:
        """A 200 carries one entry per message in request order; anything else applies to all."""
        body = response_json(response)
        if response.status_code == 200 and isinstance(body, list) and len(body) == len(emails):
            return [
                self._entry_result(entry, 200) if isinstance(entry, dict)
                else SendResult(Outcome.AMBIGUOUS, reason="malformed batch entry", status_code=200)
                for entry in body
            ]
        if response.status_code == 200:
            # The request went through but the answer does not say which messages were taken.
            return [SendResult(Outcome.AMBIGUOUS, reason="unreadable batch answer", status_code=200)] * len(emails)
        return [self.parse_response(emails[0], response)] * len(emails)

    @staticmethod
    def _entry_result(entry: dict[str, Any], status_code: int) -> SendResult:
        code = entry.get("ErrorCode", 0)
        if code == 0 and isinstance(entry.get("MessageID"), str):
            return SendResult(
                Outcome.ACCEPTED,
                provider_message_id=entry["MessageID"],
                reason=str(entry.get("Message", "")),
                status_code=status_code,
            )
        return classify_error_code(int(code), str(entry.get("Message", "")), status_code)


ADAPTER = PostmarkAdapter
"""The adapter class of type ``postmark``, found by ``libs.providers.registry``."""
