"""SendGrid's v3 Mail Send API: ``POST /v3/mail/send`` (JSON, 202 + ``X-Message-Id``)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dev.simulator.dialects.base import Dialect, Parsed, Rejected, retry_after_header
from dev.simulator.model import Personality, SimMessage
from dev.simulator.parsing import attachment_info, is_valid_address

MAX_REQUEST_BYTES = 30 * 1000 * 1000
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000


def _errors(status: int, message: str, field: str | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"errors": [{"message": message, "field": field, "help": None}]}, status_code=status, headers=headers
    )


def _invalid(message: str, field: str | None) -> Rejected:
    return Rejected(_errors(400, message, field), f"{field}: {message}" if field else message)


def _substituter(table: dict[str, str]) -> Callable[[str], str]:
    """Replace each substitution tag by its value where SendGrid substitutes: the subject, the bodies and the custom
    args (unique arguments), never headers. One pass over the text as sent: a value is final text, not searched for
    tags again."""
    if not table:
        return lambda value: value
    tags = re.compile("|".join(re.escape(tag) for tag in sorted(table, key=len, reverse=True)))
    return lambda value: tags.sub(lambda match: table[match.group(0)], value)


class SendGridDialect(Dialect):
    """SendGrid v3 (global and EU regional hosts are the same API)."""

    type_name = "sendgrid"

    def operation(self, method: str, path: str) -> str | None:
        """``send`` for ``POST /v3/mail/send``."""
        return "send" if method == "POST" and path == "/v3/mail/send" else None

    def not_found(self, path: str) -> Response:
        """404 in SendGrid's error format."""
        return _errors(404, "resource not found")

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """``Authorization: Bearer <api key>``."""
        if request.headers.get("authorization") != f"Bearer {personality.credentials['api_key']}":
            return _errors(401, "The provided authorization grant is invalid, expired, or revoked")
        return None

    def parse(self, personality: Personality, operation: str, path: str, request: Request, body: bytes) -> Parsed:
        """Validate the JSON as SendGrid does and turn each personalization into a message."""
        if "accept" not in request.headers:
            raise Rejected(_errors(406, "Accept header is required"), "no Accept header")
        if len(body) > MAX_REQUEST_BYTES:
            raise Rejected(_errors(413, "Payload Too Large"), "payload too large")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise _invalid("Bad Request", None) from exc
        if not isinstance(payload, dict):
            raise _invalid("Bad Request", None)
        personalizations = payload.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            raise _invalid("The personalizations field is required and must have at least one personalization.",
                           "personalizations")
        if len(personalizations) > MAX_PERSONALIZATIONS:
            raise _invalid("The personalizations field can have up to 1000 personalizations.", "personalizations")
        sender = payload.get("from")
        if not isinstance(sender, dict) or not is_valid_address(str(sender.get("email", ""))):
            raise _invalid("The from email does not contain a valid address.", "from.email")
        contents = payload.get("content")
        if not payload.get("template_id") and (not isinstance(contents, list) or not contents):
            raise _invalid("Unless a valid template_id is provided, the content parameter is required.", "content")
        text = html = None
        for content in contents or []:
            if content.get("type") == "text/plain":
                text = str(content.get("value", ""))
            elif content.get("type") == "text/html":
                html = str(content.get("value", ""))
        attachments = []
        for index, attachment in enumerate(payload.get("attachments") or []):
            try:
                data = base64.b64decode(attachment.get("content", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _invalid("The attachment content must be base64 encoded.",
                               f"attachments.{index}.content") from exc
            attachments.append(
                attachment_info(str(attachment.get("filename", "")), str(attachment.get("type", "")), data,
                                content_id=attachment.get("content_id"),
                                inline=attachment.get("disposition") == "inline")
            )
        seen: set[str] = set()
        messages: list[SimMessage] = []
        total_recipients = 0
        for index, personalization in enumerate(personalizations):
            lists: dict[str, list[dict[str, Any]]] = {}
            for kind in ("to", "cc", "bcc"):
                entries = personalization.get(kind) or []
                for position, entry in enumerate(entries):
                    address = str(entry.get("email", "")) if isinstance(entry, dict) else ""
                    field = f"personalizations.{index}.{kind}.{position}.email"
                    if not is_valid_address(address):
                        raise _invalid("Does not contain a valid address.", field)
                    if address.lower() in seen:
                        raise _invalid("Each email address in the personalization block should be unique between "
                                       "to, cc, and bcc. We found the first duplicate instance of "
                                       f"[{address}] in the personalizations.{index}.{kind} field.", field)
                    seen.add(address.lower())
                lists[kind] = entries
            if not lists["to"]:
                raise _invalid("The to array is required for all personalization objects, and must have at "
                               "least one email object with a valid email address.", f"personalizations.{index}.to")
            total_recipients += sum(len(v) for v in lists.values())
            subject = personalization.get("subject", payload.get("subject"))
            if not subject and not payload.get("template_id"):
                raise _invalid("The subject is required. You can get around this requirement if you use a "
                               "template with a subject defined or if every personalization has a subject "
                               "defined.", "subject")
            render = _substituter({str(k): str(v) for k, v in (personalization.get("substitutions") or {}).items()})
            # A personalization's headers override the message's; substitutions never apply to headers.
            headers = {**(payload.get("headers") or {}), **(personalization.get("headers") or {})}
            custom_args = {
                str(k): render(str(v))
                for k, v in {**(payload.get("custom_args") or {}), **(personalization.get("custom_args") or {})}.items()
            }
            esp_id = next((v for k, v in headers.items() if k.lower() == "x-esp-message-id"), None)
            categories = payload.get("categories") or []
            messages.append(
                SimMessage(
                    sender=str(sender["email"]),
                    sender_name=str(sender.get("name", "")),
                    to=[str(e["email"]) for e in lists["to"]],
                    to_names=[str(e.get("name", "")) for e in lists["to"]],
                    cc=[str(e["email"]) for e in lists["cc"]],
                    bcc=[str(e["email"]) for e in lists["bcc"]],
                    subject=render(str(subject or "")),
                    text=None if text is None else render(text),
                    html=None if html is None else render(html),
                    headers={str(k): str(v) for k, v in headers.items()},
                    esp_message_id=esp_id or custom_args.get("esp_message_id"),
                    tags=[str(c) for c in (categories if isinstance(categories, list) else [categories])],
                    metadata=custom_args,
                    attachments=attachments,
                )
            )
        if total_recipients > MAX_RECIPIENTS:
            raise _invalid("The total number of recipients must be no more than 1000.", "personalizations")
        sandbox = bool(((payload.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable"))
        return Parsed(messages, sandbox=sandbox)

    def assign_ids(self, personality: Personality, operation: str, parsed: Parsed) -> None:
        """One ``X-Message-Id`` per request (webhooks add a per-recipient suffix in ``sg_message_id``)."""
        provider_id = secrets.token_urlsafe(16)[:22]
        for message in parsed.messages:
            message.provider_message_id = provider_id

    def accepted(self, personality: Personality, operation: str, parsed: Parsed) -> Response:
        """202 with an empty body; sandbox mode answers 200."""
        if parsed.sandbox:
            return Response(status_code=200)
        return Response(status_code=202, headers={"X-Message-Id": parsed.messages[0].provider_message_id})

    def outage(self) -> Response:
        """503."""
        return _errors(503, "Service Unavailable")

    def throttled(self, retry_after_s: float) -> Response:
        """429 ``too many requests``."""
        return _errors(429, "too many requests", **retry_after_header(retry_after_s))

    def quota_exceeded(self, retry_after_s: int) -> Response:
        """SendGrid answers an exhausted credit balance with 401."""
        return _errors(401, "Maximum credits exceeded")

    def server_error(self) -> Response:
        """500."""
        return _errors(500, "Internal Server Error")
