"""Validation of send requests: every problem reported at once as a field violation; nothing is changed."""

from __future__ import annotations

import re
from collections.abc import Iterable

from email_validator import EmailNotValidError, validate_email

from libs.common.errors import FieldViolation, InvalidArgument
from services.ingest.model import MESSAGE_CLASSES, EmailDraft, Mailbox

MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit: a longer subject cannot be sent unfolded
MAX_BODY_BYTES = 5 * 1024 * 1024  # Postmark's cap per body part, the strictest of the providers
MAX_RECIPIENTS = 50  # SES's per-message cap; larger audiences go through campaigns
MAX_TAGS = 10
MAX_TAG_CHARS = 128
MAX_METADATA_PAIRS = 20
MAX_METADATA_BYTES = 4096
MAX_ATTACHMENTS = 10
MAX_NAME_CHARS = 256

# Headers a customer may set. Everything that changes routing, authentication or the envelope is ours.
ALLOWED_HEADERS = frozenset(
    {
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-id",
        "in-reply-to",
        "references",
        "precedence",
        "auto-submitted",
    }
)
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_FORBIDDEN_CHARS = ("\r", "\n", "\0")
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _has_control(value: str) -> bool:
    return any(ch in value for ch in _FORBIDDEN_CHARS)


def normalise_address(raw: str) -> str:
    """The address in canonical form (domain lower-cased, IDNA-checked); raises ValueError when malformed."""
    try:
        result = validate_email(raw, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc
    return result.normalized


def _check_mailboxes(field: str, boxes: Iterable[Mailbox], out: list[FieldViolation]) -> None:
    for i, box in enumerate(boxes):
        where = f"{field}[{i}]"
        if _has_control(box.email) or _has_control(box.name):
            out.append(FieldViolation(where, "CR, LF and NUL are not allowed in addresses", "HEADER_INJECTION"))
            continue
        if len(box.name) > MAX_NAME_CHARS:
            out.append(FieldViolation(f"{where}.name", f"longer than {MAX_NAME_CHARS} characters"))
        try:
            normalise_address(box.email)
        except ValueError as exc:
            out.append(FieldViolation(f"{where}.email", f"{box.email!r} is not a valid address: {exc}",
                                      "MALFORMED_ADDRESS"))


def validate_draft(draft: EmailDraft, *, extra_allowed_headers: frozenset[str] = frozenset()) -> EmailDraft:
    """Check a draft; return it with addresses normalised, or raise InvalidArgument listing every violation."""
    problems: list[FieldViolation] = []
    if draft.message_class not in MESSAGE_CLASSES:
        problems.append(FieldViolation("message_class", f"must be one of {', '.join(MESSAGE_CLASSES)}"))
    if not draft.sender.email:
        problems.append(FieldViolation("from.email", "required"))
    else:
        _check_mailboxes("from", [draft.sender], problems)
    if not draft.to:
        problems.append(FieldViolation("to", "at least one recipient is required"))
    for name, boxes in (("to", draft.to), ("cc", draft.cc), ("bcc", draft.bcc), ("reply_to", draft.reply_to)):
        _check_mailboxes(name, boxes, problems)
    if len(draft.recipients) > MAX_RECIPIENTS:
        problems.append(FieldViolation("to", f"at most {MAX_RECIPIENTS} recipients (to+cc+bcc) per message; "
                                             "use a campaign for more"))
    if _has_control(draft.subject):
        problems.append(FieldViolation("subject", "CR, LF and NUL are not allowed", "HEADER_INJECTION"))
    if len(draft.subject) > MAX_SUBJECT_CHARS:
        problems.append(FieldViolation("subject", f"longer than {MAX_SUBJECT_CHARS} characters"))
    if not draft.text_body and not draft.html_body:
        problems.append(FieldViolation("text_body", "text_body or html_body is required"))
    for name, body in (("text_body", draft.text_body), ("html_body", draft.html_body)):
        if len(body.encode()) > MAX_BODY_BYTES:
            problems.append(FieldViolation(name, f"larger than {MAX_BODY_BYTES} bytes"))
        if "\0" in body:
            problems.append(FieldViolation(name, "NUL is not allowed"))
    allowed = ALLOWED_HEADERS | {h.lower() for h in extra_allowed_headers}
    for hname, hvalue in draft.headers.items():
        where = f"headers[{hname!r}]"
        if not _HEADER_NAME.match(hname):
            problems.append(FieldViolation(where, "not a valid header name", "HEADER_INJECTION"))
        elif not (hname.lower().startswith("x-") or hname.lower() in allowed) or hname.lower().startswith("x-esp-"):
            problems.append(FieldViolation(where, "header not on the allow-list (X-* and " +
                                           ", ".join(sorted(ALLOWED_HEADERS)) + ")", "HEADER_NOT_ALLOWED"))
        if _has_control(hvalue):
            problems.append(FieldViolation(where, "CR, LF and NUL are not allowed in header values",
                                           "HEADER_INJECTION"))
    if len(draft.tags) > MAX_TAGS:
        problems.append(FieldViolation("tags", f"at most {MAX_TAGS} tags"))
    for i, tag in enumerate(draft.tags):
        if not tag or len(tag) > MAX_TAG_CHARS or _has_control(tag):
            problems.append(FieldViolation(f"tags[{i}]", f"1 to {MAX_TAG_CHARS} characters, no CR/LF/NUL"))
    if len(draft.metadata) > MAX_METADATA_PAIRS:
        problems.append(FieldViolation("metadata", f"at most {MAX_METADATA_PAIRS} pairs"))
    if sum(len(k.encode()) + len(v.encode()) for k, v in draft.metadata.items()) > MAX_METADATA_BYTES:
        problems.append(FieldViolation("metadata", f"larger than {MAX_METADATA_BYTES} bytes"))
    for key, value in draft.metadata.items():
        if _has_control(key) or _has_control(value):
            problems.append(FieldViolation(f"metadata[{key!r}]", "CR, LF and NUL are not allowed",
                                           "HEADER_INJECTION"))
    if len(draft.attachment_ids) > MAX_ATTACHMENTS:
        problems.append(FieldViolation("attachment_ids", f"at most {MAX_ATTACHMENTS} attachments"))
    for i, attachment_id in enumerate(draft.attachment_ids):
        if not _ID_SHAPE.match(attachment_id.removeprefix("attachments/")):
            problems.append(FieldViolation(f"attachment_ids[{i}]", "not an attachment id", "UNKNOWN_ATTACHMENT"))
    if draft.request_id and not (1 <= len(draft.request_id) <= 128 and not _has_control(draft.request_id)):
        problems.append(FieldViolation("request_id", "1 to 128 characters, no CR/LF/NUL"))
    if problems:
        raise InvalidArgument(f"the request has {len(problems)} invalid field(s)", reason="INVALID_EMAIL_REQUEST",
                              field_violations=problems)
    return draft
