"""Mailgun's messages API: ``POST /v3/{domain}/messages`` (form fields) and ``/messages.mime`` (raw MIME)."""

from __future__ import annotations

import base64
import json
import re
import secrets
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from dev.simulator.dialects.base import Dialect, Parsed, Rejected, retry_after_header
from dev.simulator.model import Personality, SimMessage, signed_raw_mime
from dev.simulator.parsing import (
    FormFile,
    attachment_info,
    is_valid_address,
    parse_form_data,
    parse_mime,
    split_addresses,
)

_PATH = re.compile(r"^/v3/(?P<domain>[^/]+)/(?P<kind>messages|messages\.mime)$")
_RECIPIENT_VARIABLE = re.compile(r"%recipient\.([A-Za-z0-9_.-]+)%")
MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


class MailgunDialect(Dialect):
    """Mailgun (US and EU look the same; a domain lives in one region only)."""

    type_name = "mailgun"

    def operation(self, method: str, path: str) -> str | None:
        """``send`` or ``mime`` for the two message endpoints."""
        match = _PATH.match(path)
        if method != "POST" or not match:
            return None
        return "mime" if match.group("kind") == "messages.mime" else "send"

    def not_found(self, path: str) -> Response:
        """Mailgun answers a malformed API path with 200 and its banner."""
        return PlainTextResponse("Mailgun Magnificent API", status_code=200)

    def account_domain(self, path: str) -> str | None:
        """The domain of ``/v3/{domain}/messages[.mime]``."""
        match = _PATH.match(path)
        return match.group("domain").lower() if match else None

    def unknown_domain(self, domain: str) -> Response:
        """Mailgun's 404 for a domain the account does not have."""
        return _error(404, f"Domain not found: {domain}")

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """HTTP basic auth with user ``api`` and the API key; Mailgun's refusal is a terse 401."""
        expected = base64.b64encode(f"api:{personality.credentials['api_key']}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return PlainTextResponse("Forbidden", status_code=401)
        return None

    def parse(
        self, personality: Personality, operation: str, path: str, request: Request, body: bytes
    ) -> Parsed:
        """Form fields → messages; one message per recipient when ``recipient-variables`` is given, its
        ``%recipient.name%`` variables substituted in the subject, the bodies, the ``h:`` headers and the ``v:``
        variables (one left as written where the recipient has no such value)."""
        if len(body) > MAX_MESSAGE_BYTES + 1024 * 1024:
            raise Rejected(_error(413, "Request entity too large"), "too large", "invalid")
        try:
            fields = parse_form_data(body, request.headers.get("content-type", ""))
        except (ValueError, UnicodeDecodeError) as exc:
            raise Rejected(_error(400, f"Invalid multipart body: {exc}"), str(exc)) from exc
        values: dict[str, list[str]] = {}
        files: list[tuple[str, FormFile]] = []
        for name, value in fields:
            if isinstance(value, FormFile):
                files.append((name, value))
            else:
                values.setdefault(name, []).append(value)
        if operation == "mime":
            return self._parse_mime(values, files)
        return self._parse_fields(values, files)

    def _recipients(self, values: dict[str, list[str]], field: str) -> list[tuple[str, str]]:
        pairs = [pair for value in values.get(field, []) for pair in split_addresses(value)]
        for _, address in pairs:
            if not is_valid_address(address):
                raise Rejected(
                    _error(400, f"{field} parameter is not a valid address. please check documentation"),
                    f"invalid {field} address {address!r}",
                )
        return pairs

    def _parse_fields(self, values: dict[str, list[str]], files: list[tuple[str, FormFile]]) -> Parsed:
        if not values.get("from"):
            raise Rejected(_error(400, "from parameter is missing"), "from missing")
        if not values.get("to"):
            raise Rejected(_error(400, "to parameter is missing"), "to missing")
        if not any(values.get(key) for key in ("text", "html", "amp-html", "template")):
            raise Rejected(
                _error(400, "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified"),
                "no body",
            )
        sender = split_addresses(values["from"][0])
        if not sender or not is_valid_address(sender[0][1]):
            raise Rejected(_error(400, "from parameter is not a valid address. please check documentation"), "from")
        to, cc, bcc = (self._recipients(values, f) for f in ("to", "cc", "bcc"))
        if len(to) + len(cc) + len(bcc) > MAX_RECIPIENTS:
            raise Rejected(_error(400, f"Too many recipients: limit is {MAX_RECIPIENTS}"), "too many recipients")
        option_bytes = sum(len(k) + len(v) for k, vs in values.items() if k[:2] in {"o:", "h:", "v:", "t:"} for v in vs)
        if option_bytes > 16 * 1024:
            raise Rejected(_error(400, "o:, h:, v: and t: parameters exceed 16 KB"), "options too large")
        variables: dict[str, dict[str, str]] | None = None
        if values.get("recipient-variables"):
            try:
                loaded = json.loads(values["recipient-variables"][0])
            except ValueError as exc:
                raise Rejected(_error(400, "recipient-variables parameter is not a valid JSON"), "bad JSON") from exc
            if not isinstance(loaded, dict):
                raise Rejected(_error(400, "recipient-variables parameter is not a valid JSON"), "bad JSON")
            variables = {
                str(address): {str(key): str(value) for key, value in own.items()}
                for address, own in loaded.items()
                if isinstance(own, dict)
            }
        attachments = [
            attachment_info(f.filename, f.content_type, f.data, content_id=f.filename if name == "inline" else None,
                            inline=name == "inline")
            for name, f in files
            if name in {"attachment", "inline"}
        ]

        def first(key: str) -> str | None:
            return values[key][0] if values.get(key) else None

        def build(recipients_to: list[tuple[str, str]], own: dict[str, str] | None) -> SimMessage:
            def render(text: str | None) -> str | None:
                if text is None or own is None:
                    return text
                return _RECIPIENT_VARIABLE.sub(lambda m: own.get(m.group(1), m.group(0)), text)

            headers = {k[2:]: render(v[0]) or "" for k, v in values.items() if k.startswith("h:")}
            metadata = {k[2:]: render(v[0]) or "" for k, v in values.items() if k.startswith("v:")}
            esp_id = next((v for k, v in headers.items() if k.lower() == "x-esp-message-id"), None)
            return SimMessage(
                sender=sender[0][1],
                sender_name=sender[0][0],
                to=[a for _, a in recipients_to],
                to_names=[n for n, _ in recipients_to],
                cc=[] if own is not None else [a for _, a in cc],
                bcc=[] if own is not None else [a for _, a in bcc],
                subject=render(first("subject")) or "",
                text=render(first("text")),
                html=render(first("html")),
                headers=headers,
                esp_message_id=esp_id or metadata.get("esp_message_id"),
                tags=values.get("o:tag", []),
                metadata=metadata,
                attachments=attachments,
            )

        sandbox = (first("o:testmode") or "").lower() in {"yes", "true", "1"}
        if variables is None:
            return Parsed([build(to, None)], sandbox=sandbox)
        # Batch sending: with recipient variables every "to" gets a message of its own.
        return Parsed([build([pair], variables.get(pair[1], {})) for pair in to], sandbox=sandbox)

    def _parse_mime(self, values: dict[str, list[str]], files: list[tuple[str, FormFile]]) -> Parsed:
        message_files = [f for name, f in files if name == "message"]
        if not message_files:
            raise Rejected(_error(400, "message parameter is missing"), "message missing")
        if not values.get("to"):
            raise Rejected(_error(400, "to parameter is missing"), "to missing")
        if len(values["to"]) > MAX_RECIPIENTS:
            raise Rejected(_error(400, f"Too many recipients: limit is {MAX_RECIPIENTS}"), "too many recipients")
        option_bytes = sum(len(k) + len(v) for k, vs in values.items() if k[:2] in {"o:", "h:", "v:", "t:"} for v in vs)
        if option_bytes > 16 * 1024:
            raise Rejected(_error(400, "o:, h:, v: and t: parameters exceed 16 KB"), "options too large")
        recipients = [a for _, a in self._recipients(values, "to")]
        raw = message_files[0].data
        try:
            message = parse_mime(raw, envelope_recipients=recipients)
        except ValueError as exc:
            raise Rejected(_error(400, f"message parameter is not a valid MIME message: {exc}"), "bad MIME") from exc
        if not message.sender:
            raise Rejected(_error(400, "message has no From header"), "from missing")
        message.tags = values.get("o:tag", [])
        message.metadata = {k[2:]: v[0] for k, v in values.items() if k.startswith("v:")}
        message.esp_message_id = message.esp_message_id or message.metadata.get("esp_message_id")
        message.raw_mime = signed_raw_mime(raw)
        return Parsed([message])

    def assign_ids(self, personality: Personality, operation: str, parsed: Parsed) -> None:
        """One id per call, ``<timestamp.random@domain>``, shared by every message of a batch."""
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        provider_id = f"<{stamp}.{secrets.token_hex(6)}@{personality.credentials['domain']}>"
        for message in parsed.messages:
            message.provider_message_id = provider_id

    def accepted(self, personality: Personality, operation: str, parsed: Parsed) -> Response:
        """200 with the id in angle brackets."""
        return JSONResponse({"id": parsed.messages[0].provider_message_id, "message": "Queued. Thank you."})

    def outage(self) -> Response:
        """503 from the load balancer."""
        return PlainTextResponse("Service Unavailable", status_code=503)

    def throttled(self, retry_after_s: float) -> Response:
        """429 with Retry-After."""
        return JSONResponse(
            {"message": "Too many requests"}, status_code=429, headers=retry_after_header(retry_after_s)
        )

    def quota_exceeded(self, retry_after_s: int) -> Response:
        """429 until the quota resets (UTC midnight)."""
        return JSONResponse(
            {"message": "Domain has exceeded its daily sending limit"},
            status_code=429,
            headers=retry_after_header(retry_after_s),
        )

    def server_error(self) -> Response:
        """500."""
        return _error(500, "Internal Server Error")
