"""Postmark's Email API: ``POST /email`` and ``POST /email/batch`` (JSON, ``X-Postmark-Server-Token``)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from dev.simulator.dialects.base import Dialect, Parsed, Rejected, retry_after_header
from dev.simulator.model import Personality, SimMessage
from dev.simulator.parsing import attachment_info, is_valid_address, split_addresses

TEST_TOKEN = "POSTMARK_API_TEST"
MAX_MESSAGE_BYTES = 10 * 1000 * 1000
MAX_BATCH_MESSAGES = 500
MAX_BATCH_BYTES = 50 * 1000 * 1000
MAX_RECIPIENTS = 50
#: Recipients whose local part starts with this are treated as inactive (bounced before): ErrorCode 406.
INACTIVE_PREFIX = "inactive"


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"ErrorCode": code, "Message": message}, status_code=status)


class MessageInvalid(Exception):
    """One message fails Postmark's checks."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PostmarkDialect(Dialect):
    """Postmark (single and batch sends)."""

    type_name = "postmark"

    def operation(self, method: str, path: str) -> str | None:
        """``single`` or ``batch``."""
        if method != "POST":
            return None
        return {"/email": "single", "/email/batch": "batch"}.get(path)

    def not_found(self, path: str) -> Response:
        """404."""
        return _error(404, 404, f"Resource not found: {path}")

    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """``X-Postmark-Server-Token`` must be the server token or the test token."""
        token = request.headers.get("x-postmark-server-token")
        if token not in (personality.credentials["server_token"], TEST_TOKEN):
            return _error(401, 10, "The Server Token you provided in the X-Postmark-Server-Token request header "
                                   "was invalid. Please verify that you are using a valid token.")
        return None

    def parse(self, personality: Personality, operation: str, path: str, request: Request, body: bytes) -> Parsed:
        """One message, or an array of messages each validated on its own."""
        sandbox = request.headers.get("x-postmark-server-token") == TEST_TOKEN
        if "json" not in request.headers.get("content-type", ""):
            raise Rejected(_error(422, 409, "JSON Required: Please set 'Content-Type' to 'application/json'."),
                           "not JSON")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise Rejected(_error(422, 402, "Received invalid JSON input."), "invalid JSON") from exc
        if operation == "single":
            if len(body) > MAX_MESSAGE_BYTES * 1.1:
                raise Rejected(_error(413, 300, "Payload too large"), "too large")
            if not isinstance(payload, dict):
                raise Rejected(_error(422, 403, "Incompatible JSON input."), "not an object")
            try:
                return Parsed([self._message(payload)], sandbox=sandbox)
            except MessageInvalid as exc:
                raise Rejected(_error(422, exc.code, exc.message), exc.message) from exc
        if len(body) > MAX_BATCH_BYTES:
            raise Rejected(_error(413, 300, "Payload too large"), "too large")
        if not isinstance(payload, list):
            raise Rejected(_error(422, 403, "Incompatible JSON input."), "not an array")
        if len(payload) > MAX_BATCH_MESSAGES:
            raise Rejected(_error(422, 410, "Too many batch messages (limit 500)."), "too many batch messages")
        messages = []
        for entry in payload:
            try:
                if not isinstance(entry, dict):
                    raise MessageInvalid(403, "Incompatible JSON input.")
                messages.append(self._message(entry))
            except MessageInvalid as exc:
                messages.append(SimMessage(sender="", to=[], rejection=exc.message, rejection_code=exc.code))
        return Parsed(messages, sandbox=sandbox)

    def _message(self, data: dict[str, Any]) -> SimMessage:
        sender = split_addresses(str(data.get("From", "")))
        if not sender or not is_valid_address(sender[0][1]):
            raise MessageInvalid(300, f"Invalid 'From' address: '{data.get('From', '')}'.")
        lists: dict[str, list[tuple[str, str]]] = {}
        for field in ("To", "Cc", "Bcc"):
            pairs = split_addresses(str(data.get(field) or ""))
            for _, address in pairs:
                if not is_valid_address(address):
                    raise MessageInvalid(300, f"Invalid '{field}' address: '{address}'.")
            lists[field] = pairs
        if not lists["To"]:
            raise MessageInvalid(300, "Zero recipients specified")
        if sum(len(v) for v in lists.values()) > MAX_RECIPIENTS:
            raise MessageInvalid(300, "Maximum of 50 recipients allowed per email message")
        if not data.get("TextBody") and not data.get("HtmlBody"):
            raise MessageInvalid(300, "Provide either email TextBody or HtmlBody or both.")
        inactive = [a for pairs in lists.values() for _, a in pairs if a.lower().startswith(INACTIVE_PREFIX)]
        if inactive:
            raise MessageInvalid(406, "You tried to send to recipient(s) that have been marked as inactive. "
                                      f"Found inactive addresses: {', '.join(inactive)}.")
        attachments = []
        for attachment in data.get("Attachments") or []:
            try:
                content = base64.b64decode(attachment.get("Content", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MessageInvalid(300, "Attachment content is not valid base64") from exc
            content_id = attachment.get("ContentID")
            attachments.append(
                attachment_info(str(attachment.get("Name", "")), str(attachment.get("ContentType", "")), content,
                                content_id=str(content_id).removeprefix("cid:") if content_id else None,
                                inline=bool(content_id))
            )
        headers = {str(h.get("Name")): str(h.get("Value")) for h in data.get("Headers") or []}
        metadata = {str(k): str(v) for k, v in (data.get("Metadata") or {}).items()}
        esp_id = next((v for k, v in headers.items() if k.lower() == "x-esp-message-id"), None)
        return SimMessage(
            sender=sender[0][1],
            sender_name=sender[0][0],
            to=[a for _, a in lists["To"]],
            to_names=[n for n, _ in lists["To"]],
            cc=[a for _, a in lists["Cc"]],
            bcc=[a for _, a in lists["Bcc"]],
            subject=str(data.get("Subject", "")),
            text=data.get("TextBody"),
            html=data.get("HtmlBody"),
            headers=headers,
            esp_message_id=esp_id or metadata.get("esp_message_id"),
            tags=[str(data["Tag"])] if data.get("Tag") else [],
            metadata=metadata,
            attachments=attachments,
        )

    def assign_ids(self, personality: Personality, operation: str, parsed: Parsed) -> None:
        """A UUID per accepted message."""
        for message in parsed.messages:
            if message.rejection is None:
                message.provider_message_id = str(uuid.uuid4())

    def accepted(self, personality: Personality, operation: str, parsed: Parsed) -> Response:
        """200 with one result object (single) or an array of them in request order (batch)."""
        submitted_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")

        def result(message: SimMessage) -> dict[str, Any]:
            if message.rejection is not None:
                return {"ErrorCode": message.rejection_code, "Message": message.rejection}
            return {"To": ", ".join(message.to), "SubmittedAt": submitted_at,
                    "MessageID": message.provider_message_id, "ErrorCode": 0, "Message": "OK"}

        if operation == "single":
            return JSONResponse(result(parsed.messages[0]))
        return JSONResponse([result(m) for m in parsed.messages])

    def outage(self) -> Response:
        """503."""
        return PlainTextResponse("Service Unavailable", status_code=503)

    def throttled(self, retry_after_s: float) -> Response:
        """429."""
        response = _error(429, 429, "Rate limit exceeded")
        response.headers.update(retry_after_header(retry_after_s))
        return response

    def quota_exceeded(self, retry_after_s: int) -> Response:
        """ErrorCode 405, not allowed to send."""
        return _error(422, 405, "Not allowed to send: the daily sending limit of this account is used up.")

    def server_error(self) -> Response:
        """500."""
        return PlainTextResponse("Internal Server Error", status_code=500)
