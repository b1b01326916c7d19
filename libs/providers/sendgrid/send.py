"""SendGrid v3 adapter: ``POST /v3/mail/send`` with a JSON body whose attachments stream as base64.

Configuration (``ProviderConfig``):
    endpoint: ``https://api.sendgrid.com`` (or ``https://api.eu.sendgrid.com`` for EU regional subusers).
    credentials: ``api_key`` (``Authorization: Bearer <key>``).
    options: ``sandbox`` = ``true`` sets ``mail_settings.sandbox_mode`` (validated, never delivered; 200).

Every email becomes one entry of ``personalizations`` carrying its recipients, ``X-ESP-Message-Id`` header,
``custom_args`` (our message and tenant ids, echoed in every webhook event) and ``substitutions`` for its
``{{ name }}`` placeholders, so a batch is one request of up to 1,000 personalizations / recipients with one
``X-Message-Id`` shared by all its emails (webhooks then tell recipients apart by ``sg_message_id``).
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
    PLACEHOLDER_PATTERN,
    Address,
    OutboundEmail,
    Outcome,
    ProviderConfig,
    SendResult,
    content_key,
    unique_addresses,
)

__all__ = [
    "ADAPTER",
    "SendGridAdapter",
]

MAIL_SEND_PATH = "/v3/mail/send"


def _address(address: Address) -> dict[str, str]:
    return {"email": address.email, "name": address.name} if address.name else {"email": address.email}


def _normalise_placeholders(value: str) -> str:
    """``{{ name }}`` → ``{{name}}``, the exact tag the substitutions are keyed by."""
    return PLACEHOLDER_PATTERN.sub(lambda match: "{{" + match.group(1) + "}}", value)


class SendGridAdapter(HttpAdapter):
    """SendGrid's v3 Mail Send API."""

    type_name = "sendgrid"
    default_capabilities = DEFAULT_CAPABILITIES["sendgrid"]

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = config.credential("api_key")
        self._sandbox = config.option_bool("sandbox", False)
        super().__init__(config, transport=transport)

    def default_headers(self) -> dict[str, str]:
        """Bearer token; SendGrid answers 406 without an Accept header."""
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

    # -- building --------------------------------------------------------------------------------------------

    def _personalization(self, email: OutboundEmail) -> dict[str, Any]:
        personalization: dict[str, Any] = {"to": [_address(a) for a in unique_addresses(email.to)]}
        if email.cc:
            personalization["cc"] = [_address(a) for a in email.cc]
        if email.bcc:
            personalization["bcc"] = [_address(a) for a in email.bcc]
        personalization["headers"] = {ESP_MESSAGE_ID_HEADER: email.message_id}
        personalization["custom_args"] = {ESP_MESSAGE_ID_KEY: email.message_id}
        variables = email.recipient_variables.get(email.to[0].email) if email.to else None
        if variables:
            personalization["substitutions"] = {"{{" + key + "}}": value for key, value in variables.items()}
        return personalization

    def _payload(self, emails: Sequence[OutboundEmail]) -> dict[str, Any]:
        first = emails[0]
        payload: dict[str, Any] = {
            "personalizations": [self._personalization(email) for email in emails],
            "from": _address(first.sender),
            "subject": _normalise_placeholders(first.subject),
        }
        content = []
        if first.text is not None:
            content.append({"type": "text/plain", "value": _normalise_placeholders(first.text)})
        if first.html is not None:
            content.append({"type": "text/html", "value": _normalise_placeholders(first.html)})
        payload["content"] = content
        if len(first.reply_to) == 1:
            payload["reply_to"] = _address(first.reply_to[0])
        elif first.reply_to:
            payload["reply_to_list"] = [_address(a) for a in first.reply_to]
        if first.headers:
            payload["headers"] = dict(first.headers)
        if first.tags:
            payload["categories"] = list(first.tags)
        payload["custom_args"] = {**first.metadata, ESP_TENANT_ID_KEY: first.tenant_id}
        if first.attachments:
            payload["attachments"] = [
                {
                    "content": attachment,  # streamed as base64 by streamed_json
                    "filename": attachment.filename,
                    "type": attachment.content_type,
                    "disposition": "inline" if attachment.is_inline else "attachment",
                    **({"content_id": attachment.content_id.strip("<>")} if attachment.content_id else {}),
                }
                for attachment in first.attachments
            ]
        if self._sandbox:
            payload["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return payload

    def build_request(self, email: OutboundEmail) -> httpx.Request:
        """One personalization."""
        return self.streamed_request("POST", MAIL_SEND_PATH, streamed_json(self._payload([email])))

    def batch_key(self, email: OutboundEmail) -> object | None:
        """Emails with the same content (recipients, ids and variables may differ) share one request."""
        return content_key(email)

    def build_batch_request(self, emails: Sequence[OutboundEmail]) -> httpx.Request:
        """One personalization per email."""
        return self.streamed_request("POST", MAIL_SEND_PATH, streamed_json(self._payload(emails)))

    # -- parsing ---------------------------------------------------------------------------------------------

    def parse_response(self, email: OutboundEmail, response: httpx.Response) -> SendResult:
        """202 with ``X-Message-Id`` (200 in sandbox mode); errors are ``{"errors": [{"message", …}]}``."""
        status = response.status_code
        if status in (200, 202):
            sandbox_note = "sandbox mode: validated, not delivered" if status == 200 else ""
            return SendResult(
                Outcome.ACCEPTED,
                provider_message_id=response.headers.get("x-message-id"),
                reason=sandbox_note,
                status_code=status,
            )
        return classify_http_failure(response, _error_messages(response))

    def parse_batch_response(self, emails: Sequence[OutboundEmail], response: httpx.Response) -> list[SendResult]:
        """SendGrid accepts or rejects the request as a whole."""
        return [self.parse_response(emails[0], response)] * len(emails)


def _error_messages(response: httpx.Response) -> str:
    body = response_json(response)
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        messages = []
        for error in body["errors"]:
            if isinstance(error, dict):
                field = f" ({error['field']})" if error.get("field") else ""
                messages.append(f"{error.get('message', '')}{field}")
        return "; ".join(messages)
    return response.text[:200]


ADAPTER = SendGridAdapter
"""The adapter class of type ``sendgrid``, found by ``libs.providers.registry``."""
