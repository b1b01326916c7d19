"""The ingest domain's values: an email as the customer asked for it, before and after validation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from libs.common.message_classes import MessageClass

CLASS_NAMES: frozenset[str] = frozenset(c.value for c in MessageClass)
"""The names a draft's ``message_class`` may take (``libs.common.message_classes.MessageClass``)."""
URGENT_CLASSES: frozenset[str] = frozenset(c.value for c in MessageClass if c.policy.urgent)
"""The classes whose emails take the urgent lane of every batching step on the accept path (``ClassPolicy.urgent``:
OTP)."""
YIELD_EVERY = 10
"""A batch's CPU-bound steps let the event loop run other work after this many emails (about a millisecond): every
batch being accepted runs one such slice per turn of the loop, and each step of an OTP's accept waits a turn."""


@dataclass(frozen=True)
class Mailbox:
    """An address with an optional display name."""

    email: str
    name: str = ""


@dataclass(frozen=True)
class EmailDraft:
    """A send request in domain terms (no protobuf types)."""

    message_class: str
    """A ``MessageClass`` value (``otp`` / ``transactional`` / ``bulk``) once validated; empty when not given."""
    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...] = ()
    bcc: tuple[Mailbox, ...] = ()
    reply_to: tuple[Mailbox, ...] = ()
    subject: str = ""
    text_body: str = ""
    html_body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    attachment_ids: tuple[str, ...] = ()
    request_id: str = ""
    send_time: datetime | None = None
    """When to hand it to a sender (aware); None: at once. Kept as the request gave it, past times included, so a
    retry after that time still has the first request's fingerprint: the accept path decides whether it is ahead."""

    @property
    def recipients(self) -> tuple[Mailbox, ...]:
        """Every recipient: ``to``, then ``cc``, then ``bcc``."""
        return self.to + self.cc + self.bcc


class HoldRequest(NamedTuple):
    """Credits to hold for one email at the ledger."""

    hold_id: str
    """The message id."""
    message_class: str
    attachment_bytes: int = 0
    ttl_s: int = 0
    """How long the hold lives unless committed or released; 0: the ledger's default (a day). A scheduled email's
    lives until its send time and that long again."""


@dataclass(frozen=True)
class StoredAttachment:
    """An uploaded attachment as recorded by ingest."""

    id: str
    tenant_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    s3_key: str


@dataclass(frozen=True)
class TenantPolicy:
    """Per-tenant limits and settings the accept path applies."""

    tenant_id: str
    rate_per_second: Mapping[str, float]
    """Sends per second per class; 0 means the platform default."""
    daily_quota: int
    large_attachment_policy: str
    allowed_headers: frozenset[str]
    disabled: bool = False
