"""Mailgun adapter: ``POST /v3/{domain}/messages`` as streamed multipart/form-data, or ``/messages.mime`` (our own
MIME, signed) for an email with the tenant's DKIM keys.

Configuration (``ProviderConfig``):
    endpoint: ``https://api.mailgun.net`` (US) or ``https://api.eu.mailgun.net`` (EU); a domain lives in one.
    credentials: ``api_key`` (HTTP basic auth, user ``api``).
    options: ``domain`` (required: the account's domain, which mail from the platform's sandbox domains goes
    through; a tenant's own verified domain, registered at Mailgun by the router, carries that tenant's mail —
    ``OutboundEmail.sending_domain``).
    region: ``us`` or ``eu`` (reported in the capabilities).

Batch sends carry up to 1,000 recipients in one call, one ``to`` per email, personalised with
``recipient-variables``: ``{{ name }}`` placeholders become ``%recipient.name%`` in the subject, the bodies and the
``h:`` header values alike, since Mailgun substitutes recipient variables in custom headers too (our message id
travels per recipient that way, as ``h:X-ESP-Message-Id`` and ``v:esp_message_id``). Each recipient gets a value
for every placeholder of the content, the placeholder as first written where it has none, so an unknown one reads
as written (``placeholder_literals``). Every email of a batch gets the same Mailgun id. Inline images are sent as
``inline`` parts named after their content id, because Mailgun references inline parts as ``cid:<filename>``.

An email with the tenant's DKIM keys goes to Mailgun's MIME endpoint: our MIME rendered for its recipient, signed
(``BaseAdapter.sign_mime``), as the ``message`` file of a form whose ``to`` fields are the envelope (to, cc and
bcc), with the tags and ``v:`` variables of the fields call. It is sent on its own, never batched: a batch is
personalised by Mailgun after any signature of ours. Mailgun adds its own signature; its open and click tracking,
where the domain turns them on, rewrite the HTML and so break ours (Mailgun's still passes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import httpx

from libs.providers.base import HttpAdapter, classify_http_failure, response_json
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.providers.errors import AdapterConfigError, UnsupportedFeature
from libs.providers.mime import MimeDocument, build_mime, streamed_form_data
from libs.providers.model import (
    ESP_MESSAGE_ID_HEADER,
    ESP_MESSAGE_ID_KEY,
    ESP_TENANT_ID_KEY,
    PLACEHOLDER_PATTERN,
    Attachment,
    OutboundEmail,
    Outcome,
    ProviderConfig,
    SendResult,
    content_key,
    personalize,
    placeholder_literals,
)

__all__ = [
    "ADAPTER",
    "MailgunAdapter",
]

#: Mailgun's ``o:``/``h:``/``v:``/``t:`` parameters may total at most 16 KB per message.
MAX_OPTION_BYTES = 16 * 1024
_RECIPIENT_ID_VARIABLE = f"%recipient.{ESP_MESSAGE_ID_KEY}%"

FormFields = list[tuple[str, str | tuple[str, Attachment]]]


class MailgunAdapter(HttpAdapter):
    """Mailgun's messages API."""

    type_name = "mailgun"
    default_capabilities = DEFAULT_CAPABILITIES["mailgun"]

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = config.credential("api_key")
        self._domain = config.option("domain")
        if not self._domain:
            raise AdapterConfigError(f"provider {config.name!r}: mailgun needs option 'domain'")
        super().__init__(config, transport=transport)
        if config.region:
            self.capabilities = replace(self.capabilities, regions=(config.region,))

    def auth(self) -> httpx.Auth:
        """HTTP basic auth, user ``api``, password the API key."""
        return httpx.BasicAuth("api", self._api_key)

    def default_headers(self) -> dict[str, str]:
        """Mailgun answers JSON."""
        return {"Accept": "application/json"}

    def domain_for(self, email: OutboundEmail) -> str:
        """The account domain ``email`` is sent through: the tenant's verified domain covering its ``From``
        (registered at Mailgun by the router), else the configured one (sandbox senders)."""
        return email.sending_domain or self._domain

    def messages_path(self, email: OutboundEmail) -> str:
        """The send endpoint's path for ``email``'s domain."""
        return f"/v3/{self.domain_for(email)}/messages"

    def mime_path(self, email: OutboundEmail) -> str:
        """The MIME send endpoint's path for ``email``'s domain."""
        return f"/v3/{self.domain_for(email)}/messages.mime"

    # -- building --------------------------------------------------------------------------------------------

    def _common_fields(self, email: OutboundEmail, *, placeholders: bool) -> FormFields:
        """Everything except recipients and our per-message ids."""

        def content(value: str) -> str:
            if not placeholders:
                return value
            return PLACEHOLDER_PATTERN.sub(lambda match: f"%recipient.{match.group(1)}%", value)

        fields: FormFields = [("from", email.sender.formatted()), ("subject", content(email.subject))]
        if email.text is not None:
            fields.append(("text", content(email.text)))
        if email.html is not None:
            fields.append(("html", content(email.html)))
        if email.reply_to:
            fields.append(("h:Reply-To", ", ".join(a.formatted() for a in email.reply_to)))
        fields.extend((f"h:{name}", content(value)) for name, value in email.headers.items())
        fields.extend(("o:tag", tag) for tag in email.tags)
        fields.append((f"v:{ESP_TENANT_ID_KEY}", email.tenant_id))
        fields.extend((f"v:{key}", value) for key, value in email.metadata.items())
        for attachment in email.attachments:
            if attachment.content_id is not None:
                fields.append(("inline", (attachment.content_id.strip("<>"), attachment)))
            else:
                fields.append(("attachment", (attachment.filename, attachment)))
        return fields

    def build_request(self, email: OutboundEmail) -> httpx.Request:
        """One message: to/cc/bcc as given, our id as a header and a user variable."""
        email = personalize(email)
        fields = self._common_fields(email, placeholders=False)
        fields.extend(("to", a.formatted()) for a in email.to)
        fields.extend(("cc", a.formatted()) for a in email.cc)
        fields.extend(("bcc", a.formatted()) for a in email.bcc)
        fields.append((f"h:{ESP_MESSAGE_ID_HEADER}", email.message_id))
        fields.append((f"v:{ESP_MESSAGE_ID_KEY}", email.message_id))
        _check_option_bytes(fields)
        return self.streamed_request("POST", self.messages_path(email), streamed_form_data(fields))

    def build_mime_request(self, email: OutboundEmail, document: MimeDocument) -> httpx.Request:
        """One message as our MIME ``document`` (rendered and signed for ``email``): the envelope as ``to`` fields,
        tags and variables as in the fields call."""
        fields: FormFields = [("to", a.email) for a in email.recipients]
        fields.extend(("o:tag", tag) for tag in email.tags)
        fields.append((f"v:{ESP_TENANT_ID_KEY}", email.tenant_id))
        fields.extend((f"v:{key}", value) for key, value in email.metadata.items())
        fields.append((f"v:{ESP_MESSAGE_ID_KEY}", email.message_id))
        _check_option_bytes(fields)
        message = Attachment("message.mime", "message/rfc822", document.size, document.stream)
        fields.append(("message", ("message.mime", message)))
        return self.streamed_request("POST", self.mime_path(email), streamed_form_data(fields))

    async def _deliver(self, email: OutboundEmail) -> SendResult:
        if not self.signs(email):
            return await super()._deliver(email)
        email = personalize(email)
        document, signed_with = await self.sign_mime(email, build_mime(email))
        response = await self._client.send(self.build_mime_request(email, document))
        result = self.parse_response(email, response)
        return replace(result, dkim_algorithms=signed_with) if signed_with else result

    def batch_key(self, email: OutboundEmail) -> object | None:
        """Emails that differ only in their single ``to`` recipient, id and variables share one call."""
        if len(email.to) != 1 or email.cc or email.bcc:
            return None
        return content_key(email)

    def build_batch_request(self, emails: Sequence[OutboundEmail]) -> httpx.Request:
        """One call, one ``to`` per email, per-recipient values in ``recipient-variables``."""
        fields = self._common_fields(emails[0], placeholders=True)
        literals = placeholder_literals(emails[0])  # the same content for every email of the batch
        variables: dict[str, dict[str, str]] = {}
        for email in emails:
            recipient = email.to[0]
            fields.append(("to", recipient.formatted()))
            values = email.recipient_variables.get(recipient.email, {})
            own = {name: values.get(name, literal) for name, literal in literals.items()}
            own[ESP_MESSAGE_ID_KEY] = email.message_id
            variables[recipient.email] = own
        fields.append((f"h:{ESP_MESSAGE_ID_HEADER}", _RECIPIENT_ID_VARIABLE))
        fields.append((f"v:{ESP_MESSAGE_ID_KEY}", _RECIPIENT_ID_VARIABLE))
        fields.append(("recipient-variables", json.dumps(variables, ensure_ascii=False)))
        _check_option_bytes(fields)
        return self.streamed_request("POST", self.messages_path(emails[0]), streamed_form_data(fields))

    # -- parsing ---------------------------------------------------------------------------------------------

    def parse_response(self, email: OutboundEmail, response: httpx.Response) -> SendResult:
        """200 ``{"id": "<…>", "message": "Queued. Thank you."}``; anything else is a failure."""
        body = response_json(response)
        message = body.get("message", "") if isinstance(body, dict) else response.text[:200]
        if response.status_code == 200:
            if isinstance(body, dict) and isinstance(body.get("id"), str):
                return SendResult(
                    Outcome.ACCEPTED, provider_message_id=body["id"], reason=message, status_code=200
                )
            # A malformed path answers 200 "Mailgun Magnificent API": our endpoint is misconfigured.
            return SendResult(
                Outcome.PERMANENT,
                reason=f"unexpected 200 answer (endpoint misconfigured?): {response.text[:200]}",
                status_code=200,
                provider_fault=True,
            )
        return classify_http_failure(response, message)

    def parse_batch_response(self, emails: Sequence[OutboundEmail], response: httpx.Response) -> list[SendResult]:
        """The call's one result applies to every email in it."""
        return [self.parse_response(emails[0], response)] * len(emails)


def _check_option_bytes(fields: FormFields) -> None:
    total = sum(
        len(name.encode()) + len(value.encode())
        for name, value in fields
        if isinstance(value, str) and name[:2] in {"o:", "h:", "v:", "t:"}
    )
    if total > MAX_OPTION_BYTES:
        raise UnsupportedFeature("mailgun", f"{total} bytes of o:/h:/v:/t: parameters (limit {MAX_OPTION_BYTES})")


ADAPTER = MailgunAdapter
"""The adapter class of type ``mailgun``, found by ``libs.providers.registry``."""
