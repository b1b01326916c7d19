"""Validation of send requests: every problem reported at once as a field violation (``BadRequest``).

Validation is pure (no I/O): a refused request has changed nothing. A valid request comes back with its
addresses in canonical form (domain lower-cased and Unicode-normalised), so equal requests look equal to the
idempotency fingerprint and to the suppression list.

What an address and a display name may be is ``libs.common.addresses``' one definition, which campaign recipients
share.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from libs.common.addresses import NO_CONTROL, check_mailbox, has_control
from libs.common.content_limits import MAX_BODY_BYTES, MAX_SUBJECT_CHARS
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.message_classes import MessageClass
from services.ingest.model import CLASS_NAMES, EmailDraft, Mailbox

MAX_RECIPIENTS = 50
"""to + cc + bcc per message: SES's and Postmark's cap; larger audiences go through campaigns."""
MAX_TAGS = 10
MAX_TAG_CHARS = 128
MAX_METADATA_PAIRS = 20
MAX_METADATA_BYTES = 4096
MAX_ATTACHMENTS = 10
MAX_HEADERS = 50
MAX_HEADER_VALUE_CHARS = 998
MAX_REQUEST_ID_CHARS = 128
MAX_SEND_AHEAD_S = 29 * 86_400.0
"""The default of ``IngestSettings.max_send_ahead_s``: how far ahead a send_time may be. A scheduled email's
credit hold must outlive its send time by the usual hold life (a day), and the ledger grants holds of at most
30 days (``LedgerOptions.max_hold_ttl_s``)."""

ALLOWED_HEADERS = frozenset({
    "list-unsubscribe", "list-unsubscribe-post", "list-id", "in-reply-to", "references", "precedence",
    "auto-submitted", "keywords", "comments",
})
"""Headers any tenant may set, besides ``X-*``. A tenant's own allow-list adds to these."""
RESERVED_HEADERS = frozenset({
    "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "content-disposition", "return-path", "received",
    "dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results", "authentication-results",
})
"""Headers that carry the envelope, the structure or the authentication of the email: ours alone, whatever a
tenant's allow-list says (they have their own request fields, or must not be forged)."""
RESERVED_HEADER_PREFIX = "x-esp-"
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext: printable US-ASCII except ':'
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def header_name_ok(name: str) -> bool:
    """True for a syntactically valid header field name (RFC 5322 ftext, 1 to 76 characters)."""
    return _HEADER_NAME.match(name) is not None


def _check_mailboxes(field: str, boxes: Iterable[Mailbox], out: list[FieldViolation]) -> tuple[Mailbox, ...]:
    normalised: list[Mailbox] = []
    for i, box in enumerate(boxes):
        email, problems = check_mailbox(box.email, box.name)
        out.extend(FieldViolation(f"{field}[{i}].{p.part}", p.description, p.reason) for p in problems)
        if email is not None:
            normalised.append(Mailbox(email, box.name))
    return tuple(normalised)


def _check_headers(headers: Iterable[tuple[str, str]], extra_allowed: frozenset[str],
                   out: list[FieldViolation]) -> None:
    allowed = ALLOWED_HEADERS | {h.lower() for h in extra_allowed}
    count = 0
    for name, value in headers:
        count += 1
        where = f"headers[{name!r}]"
        lowered = name.lower()
        if not _HEADER_NAME.match(name):
            out.append(FieldViolation(where, "not a header name (1 to 76 printable ASCII characters, no ':', no "
                                             "space, no CR/LF/NUL)", "HEADER_INJECTION"))
        elif lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_HEADER_PREFIX) or not (
                lowered.startswith("x-") or lowered in allowed):
            out.append(FieldViolation(where, "header not on the allow-list (X-* and "
                                      + ", ".join(sorted(allowed)) + ")", "HEADER_NOT_ALLOWED"))
        if has_control(value):
            out.append(FieldViolation(where, NO_CONTROL + " in header values", "HEADER_INJECTION"))
        elif len(value) > MAX_HEADER_VALUE_CHARS:
            out.append(FieldViolation(where, f"value longer than {MAX_HEADER_VALUE_CHARS} characters"))
    if count > MAX_HEADERS:
        out.append(FieldViolation("headers", f"at most {MAX_HEADERS} custom headers"))


def validate_draft(draft: EmailDraft, *, extra_allowed_headers: frozenset[str] = frozenset(),
                   max_send_ahead_s: float = MAX_SEND_AHEAD_S, now: datetime | None = None) -> EmailDraft:
    """Check a draft; return it with addresses normalised, or raise INVALID_ARGUMENT listing every violation.
    ``now`` (the clock by default) is what ``send_time`` is compared with: at most ``max_send_ahead_s`` ahead."""
    problems: list[FieldViolation] = []
    if draft.message_class not in CLASS_NAMES:
        problems.append(FieldViolation("message_class", f"required: one of {', '.join(MessageClass)}"))
    if not draft.sender.email:
        problems.append(FieldViolation("from.email", "required"))
        sender = draft.sender
    else:
        checked = _check_mailboxes("from", [draft.sender], problems)
        sender = checked[0] if checked else draft.sender
    if not draft.to:
        problems.append(FieldViolation("to", "at least one recipient is required"))
    to = _check_mailboxes("to", draft.to, problems)
    cc = _check_mailboxes("cc", draft.cc, problems)
    bcc = _check_mailboxes("bcc", draft.bcc, problems)
    reply_to = _check_mailboxes("reply_to", draft.reply_to, problems)
    if len(draft.recipients) > MAX_RECIPIENTS:
        problems.append(FieldViolation("to", f"at most {MAX_RECIPIENTS} recipients (to+cc+bcc) per message; "
                                             "use a campaign for more", "TOO_MANY_RECIPIENTS"))
    if has_control(draft.subject):
        problems.append(FieldViolation("subject", NO_CONTROL, "HEADER_INJECTION"))
    if len(draft.subject) > MAX_SUBJECT_CHARS:
        problems.append(FieldViolation("subject", f"longer than {MAX_SUBJECT_CHARS} characters", "TOO_LONG"))
    if not draft.text_body and not draft.html_body:
        problems.append(FieldViolation("text_body", "text_body or html_body is required"))
    for name, body in (("text_body", draft.text_body), ("html_body", draft.html_body)):
        if len(body) > MAX_BODY_BYTES // 4 and len(body.encode()) > MAX_BODY_BYTES:
            problems.append(FieldViolation(name, f"larger than {MAX_BODY_BYTES} bytes", "TOO_LARGE"))
        if "\0" in body:
            problems.append(FieldViolation(name, "NUL is not allowed"))
    _check_headers(draft.headers.items(), extra_allowed_headers, problems)
    if len(draft.tags) > MAX_TAGS:
        problems.append(FieldViolation("tags", f"at most {MAX_TAGS} tags"))
    for i, tag in enumerate(draft.tags):
        if not tag or len(tag) > MAX_TAG_CHARS or has_control(tag):
            problems.append(FieldViolation(f"tags[{i}]", f"1 to {MAX_TAG_CHARS} characters, no CR/LF/NUL",
                                           "HEADER_INJECTION" if has_control(tag) else ""))
    if len(draft.metadata) > MAX_METADATA_PAIRS:
        problems.append(FieldViolation("metadata", f"at most {MAX_METADATA_PAIRS} pairs"))
    if sum(len(k.encode()) + len(v.encode()) for k, v in draft.metadata.items()) > MAX_METADATA_BYTES:
        problems.append(FieldViolation("metadata", f"larger than {MAX_METADATA_BYTES} bytes"))
    for key, value in draft.metadata.items():
        if has_control(key) or has_control(value):
            problems.append(FieldViolation(f"metadata[{key!r}]", NO_CONTROL,
                                           "HEADER_INJECTION"))
    if len(draft.attachment_ids) > MAX_ATTACHMENTS:
        problems.append(FieldViolation("attachment_ids", f"at most {MAX_ATTACHMENTS} attachments"))
    seen: set[str] = set()
    for i, attachment_id in enumerate(draft.attachment_ids):
        bare = attachment_id.removeprefix("attachments/")
        if not _ID_SHAPE.match(bare):
            problems.append(FieldViolation(f"attachment_ids[{i}]", "not an attachment id", "UNKNOWN_ATTACHMENT"))
        elif bare in seen:
            problems.append(FieldViolation(f"attachment_ids[{i}]", "listed twice"))
        seen.add(bare)
    if draft.request_id and (len(draft.request_id) > MAX_REQUEST_ID_CHARS or has_control(draft.request_id)):
        problems.append(FieldViolation("request_id", f"1 to {MAX_REQUEST_ID_CHARS} characters, no CR/LF/NUL"))
    if draft.send_time is not None and draft.send_time - (now or datetime.now(UTC)) > timedelta(
            seconds=max_send_ahead_s):
        problems.append(FieldViolation("send_time", f"at most {_days(max_send_ahead_s)} ahead", "SEND_TIME_TOO_FAR"))
    if problems:
        raise InvalidArgument(f"the request has {len(problems)} invalid field(s)", reason="INVALID_EMAIL_REQUEST",
                              field_violations=problems)
    return EmailDraft(
        message_class=draft.message_class, sender=sender, to=to, cc=cc, bcc=bcc, reply_to=reply_to,
        subject=draft.subject, text_body=draft.text_body, html_body=draft.html_body, headers=draft.headers,
        tags=draft.tags, metadata=draft.metadata,
        attachment_ids=tuple(a.removeprefix("attachments/") for a in draft.attachment_ids),
        request_id=draft.request_id, send_time=draft.send_time)


def _days(seconds: float) -> str:
    return f"{seconds / 86_400:g} days" if seconds >= 86_400 else f"{seconds:g} seconds"
