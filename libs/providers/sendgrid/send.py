"""SendGrid v3 adapter: ``POST /v3/mail/send`` with a JSON body whose attachments stream as base64.

Configuration (``ProviderConfig``):
    endpoint: ``https://api.sendgrid.com`` (or ``https://api.eu.sendgrid.com`` for EU regional subusers).
    credentials: ``api_key`` (``Authorization: Bearer <key>``).
    options: ``sandbox`` = ``true`` sets ``mail_settings.sandbox_mode`` (validated, never delivered; 200).

Every email becomes one entry of ``personalizations`` carrying its recipients, ``X-ESP-Message-Id`` header and
``custom_args`` (our message and tenant ids, echoed in every webhook event), so a batch is one request of up to 1,000
personalizations / recipients with one ``X-Message-Id`` shared by all its emails (webhooks then tell recipients
apart by ``sg_message_id``). In a batch, each personalization's ``substitutions`` hold its recipient's values for the
``{{ name }}`` placeholders of the subject and bodies, the placeholder as first written where it has none, so an
unknown one reads as written (``placeholder_literals``). SendGrid does not substitute in headers, so a header value
holding placeholders is rendered here for each recipient and travels in its personalization's ``headers`` instead of
the message's. An email sent on its own is rendered here (``personalize``) and carries no substitutions; so is an
email whose values could exceed SendGrid's cap on one personalization's substitutions, which is never batched.
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
    personalize,
    placeholder_literals,
    recipient_values,
    render_placeholders,
    unique_addresses,
)

__all__ = [
    "ADAPTER",
    "SendGridAdapter",
]

MAIL_SEND_PATH = "/v3/mail/send"
#: What one personalization's substitutions may hold, tags and values: SendGrid's substitution-tags page says 50,000
#: bytes, older v3 Mail Send references 10,000; the lower figure is kept, as an email above it only loses batching.
MAX_SUBSTITUTION_BYTES = 10_000


def _address(address: Address) -> dict[str, str]:
    return {"email": address.email, "name": address.name} if address.name else {"email": address.email}


def _normalise_placeholders(value: str) -> str:
    """``{{ name }}`` → ``{{name}}``, the exact tag the substitutions are keyed by."""
    return PLACEHOLDER_PATTERN.sub(lambda match: "{{" + match.group(1) + "}}", value)


def _unchanged(value: str) -> str:
    return value


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

    def _personalization(self, email: OutboundEmail, literals: dict[str, str],
                         rendered_headers: Sequence[str]) -> dict[str, Any]:
        personalization: dict[str, Any] = {"to": [_address(a) for a in unique_addresses(email.to)]}
        if email.cc:
            personalization["cc"] = [_address(a) for a in email.cc]
        if email.bcc:
            personalization["bcc"] = [_address(a) for a in email.bcc]
        values = recipient_values(email)
        personalization["headers"] = {
            **{name: render_placeholders(email.headers[name], values) for name in rendered_headers},
            ESP_MESSAGE_ID_HEADER: email.message_id,
        }
        personalization["custom_args"] = {ESP_MESSAGE_ID_KEY: email.message_id}
        if literals:
            personalization["substitutions"] = {
                "{{" + name + "}}": values.get(name, literal) for name, literal in literals.items()
            }
        return personalization

    def _payload(self, emails: Sequence[OutboundEmail], *, substitute: bool) -> dict[str, Any]:
        """The request for emails of equal content; with ``substitute`` their placeholders are filled in by
        SendGrid (subject, bodies) or here per personalization (header values), else sent as they are."""
        first = emails[0]
        literals = placeholder_literals(first, headers=False) if substitute else {}
        content_of = _normalise_placeholders if literals else _unchanged
        rendered_headers = [name for name, value in first.headers.items()
                            if substitute and PLACEHOLDER_PATTERN.search(value)]
        payload: dict[str, Any] = {
            "personalizations": [self._personalization(email, literals, rendered_headers) for email in emails],
            "from": _address(first.sender),
            "subject": content_of(first.subject),
        }
        content = []
        if first.text is not None:
            content.append({"type": "text/plain", "value": content_of(first.text)})
        if first.html is not None:
            content.append({"type": "text/html", "value": content_of(first.html)})
        payload["content"] = content
        if len(first.reply_to) == 1:
            payload["reply_to"] = _address(first.reply_to[0])
        elif first.reply_to:
            payload["reply_to_list"] = [_address(a) for a in first.reply_to]
        headers = {name: value for name, value in first.headers.items() if name not in rendered_headers}
        if headers:
            payload["headers"] = headers
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
        """One personalization, the email rendered here."""
        payload = self._payload([personalize(email)], substitute=False)
        return self.streamed_request("POST", MAIL_SEND_PATH, streamed_json(payload))

    def batch_key(self, email: OutboundEmail) -> object | None:
        """Emails with the same content (recipients, ids and variables may differ) share one request, unless the
        email's values could exceed what one personalization's substitutions may hold."""
        values = recipient_values(email)
        # Counted over all its values, used or not: a bound that needs no look at the content.
        if values and sum(len(name.encode()) + 4 + len(value.encode()) for name, value in values.items()) \
                > MAX_SUBSTITUTION_BYTES:
            return None
        return content_key(email)

    def build_batch_request(self, emails: Sequence[OutboundEmail]) -> httpx.Request:
        """One personalization per email, each with its recipient's substitutions and rendered header values."""
        return self.streamed_request("POST", MAIL_SEND_PATH, streamed_json(self._payload(emails, substitute=True)))

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
