"""A CreateCampaign request's Campaign checked and turned into a :class:`CampaignSpec`: every problem reported at
once as a field violation, the templates compiled (a syntax error with its line and column)."""

from __future__ import annotations

import math
import re
from datetime import UTC
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from esp.v1 import campaigns_pb2, common_pb2

from libs.common.addresses import check_mailbox, has_control
from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.message_classes import MessageClass
from libs.common.suppressions import is_topic, normalise_topic
from services.campaigns.expansion import compile_spec
from services.campaigns.model import CampaignSpec, Mailbox, SendWindow
from services.campaigns.templates import MissingVariablePolicy

__all__ = ["MAX_TAGS", "spec_from_proto"]

MAX_TAGS = 10
MAX_METADATA = 50
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,76}")
_PLATFORM_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post", "from", "to", "cc", "bcc", "subject",
                               "reply-to", "message-id", "date", "mime-version", "content-type",
                               "content-transfer-encoding"})
_POLICIES = {campaigns_pb2.MISSING_VARIABLE_POLICY_UNSPECIFIED: MissingVariablePolicy.FAIL,
             campaigns_pb2.MISSING_VARIABLE_POLICY_FAIL: MissingVariablePolicy.FAIL,
             campaigns_pb2.MISSING_VARIABLE_POLICY_EMPTY: MissingVariablePolicy.EMPTY}


def _mailbox(box: common_pb2.EmailAddress, field: str, problems: list[FieldViolation]) -> Mailbox:
    email, found = check_mailbox(box.email, box.name)
    for problem in found:
        problems.append(FieldViolation(f"{field}.{problem.part}", problem.description, problem.reason))
    return Mailbox(email or box.email, box.name)


def spec_from_proto(c: campaigns_pb2.Campaign) -> CampaignSpec:
    """The spec ``c`` asks for; INVALID_ARGUMENT listing every bad field."""
    problems: list[FieldViolation] = []
    sender = getattr(c, "from")
    if not sender.email:
        problems.append(FieldViolation("campaign.from.email", "required", "REQUIRED"))
    box = _mailbox(sender, "campaign.from", problems) if sender.email else Mailbox("")
    reply_to = tuple(_mailbox(r, f"campaign.reply_to[{i}]", problems) for i, r in enumerate(c.reply_to))
    if not c.subject:
        problems.append(FieldViolation("campaign.subject", "required", "REQUIRED"))
    if not c.text_body and not c.html_body:
        problems.append(FieldViolation("campaign.text_body", "a text or an HTML body is required", "REQUIRED"))
    message_class = (MessageClass.BULK if c.message_class == common_pb2.MESSAGE_CLASS_UNSPECIFIED
                     else MessageClass.from_proto(c.message_class))
    if message_class is MessageClass.OTP:
        problems.append(FieldViolation("campaign.message_class", "a campaign is bulk or transactional, not otp",
                                       "UNSUPPORTED_CLASS"))
    one_click = c.unsubscribe.mode != campaigns_pb2.UNSUBSCRIBE_MODE_NONE and (
        message_class is MessageClass.BULK or c.unsubscribe.mode == campaigns_pb2.UNSUBSCRIBE_MODE_ONE_CLICK)
    if c.unsubscribe.mode == campaigns_pb2.UNSUBSCRIBE_MODE_NONE and message_class is MessageClass.BULK:
        problems.append(FieldViolation(
            "campaign.unsubscribe.mode", "bulk mail carries one-click unsubscribe (RFC 8058; Gmail and Yahoo "
            "require it of bulk senders)", "UNSUBSCRIBE_REQUIRED"))
    topic = normalise_topic(c.unsubscribe.topic)
    if topic and not is_topic(topic):
        problems.append(FieldViolation("campaign.unsubscribe.topic", "1-64 characters of a-z, 0-9, '.', '_' and '-', "
                                       "starting with a letter or digit", "INVALID_TOPIC"))
    mailto = c.unsubscribe.mailto
    if mailto:
        address, found = check_mailbox(mailto.removeprefix("mailto:"))
        if address is None or found:
            problems.append(FieldViolation("campaign.unsubscribe.mailto", "not a valid address", "MALFORMED_ADDRESS"))
    for name, value in c.headers.items():
        if not _HEADER_NAME.fullmatch(name):
            problems.append(FieldViolation(f"campaign.headers[{name!r}]", "not a header name", "INVALID_HEADER"))
        elif name.lower() in _PLATFORM_HEADERS:
            problems.append(FieldViolation(f"campaign.headers[{name!r}]", "set by the platform", "RESERVED_HEADER"))
        if has_control(value):
            problems.append(FieldViolation(f"campaign.headers[{name!r}]", "line breaks and control characters are "
                                           "not allowed", "HEADER_INJECTION"))
    if len(c.tags) > MAX_TAGS:
        problems.append(FieldViolation("campaign.tags", f"at most {MAX_TAGS}", "TOO_MANY"))
    if len(c.metadata) > MAX_METADATA:
        problems.append(FieldViolation("campaign.metadata", f"at most {MAX_METADATA} keys", "TOO_MANY"))
    if not math.isfinite(c.send_rate) or c.send_rate < 0:
        problems.append(FieldViolation("campaign.send_rate", "emails per second, 0 or more", "OUT_OF_RANGE"))
    window: SendWindow | None = None
    if c.HasField("send_window"):
        w = c.send_window
        if not 0 <= w.start_minute <= 1439:
            problems.append(FieldViolation("campaign.send_window.start_minute", "0 to 1439", "OUT_OF_RANGE"))
        if not 1 <= w.end_minute <= 1440:
            problems.append(FieldViolation("campaign.send_window.end_minute", "1 to 1440", "OUT_OF_RANGE"))
        if w.start_minute == w.end_minute:
            problems.append(FieldViolation("campaign.send_window", "an empty window never sends", "OUT_OF_RANGE"))
        try:
            ZoneInfo(w.time_zone or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(FieldViolation("campaign.send_window.time_zone", f"unknown time zone {w.time_zone!r}",
                                           "UNKNOWN_TIME_ZONE"))
        window = SendWindow(w.start_minute, w.end_minute, w.time_zone or "UTC")
    spec = CampaignSpec(
        display_name=c.display_name, sender=box, reply_to=reply_to, subject=c.subject, text_body=c.text_body,
        html_body=c.html_body, headers=dict(c.headers), tags=tuple(c.tags), attachment_ids=tuple(c.attachment_ids),
        metadata=dict(c.metadata), default_variables=dict(c.default_variables),
        missing_variable_policy=_POLICIES.get(c.missing_variable_policy, MissingVariablePolicy.FAIL).value,
        message_class=message_class.value,
        send_time=c.send_time.ToDatetime(tzinfo=UTC) if c.HasField("send_time") else None,
        send_rate=c.send_rate if math.isfinite(c.send_rate) else 0.0, send_window=window,
        one_click_unsubscribe=one_click, unsubscribe_mailto=mailto, unsubscribe_topic=topic)
    if c.subject:
        try:
            compile_spec(spec)
        except InvalidArgument as exc:
            problems.extend(exc.field_violations)
    if problems:
        raise InvalidArgument("the campaign has invalid fields", field_violations=problems)
    return spec
