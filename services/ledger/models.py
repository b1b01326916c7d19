"""The ledger's values: what callers pass in and get back. Plain frozen dataclasses, no gRPC or SQL types.

``MessageClass`` is the shared one (:mod:`libs.common.message_classes`); each class has its own price per email."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from libs.common.message_classes import MessageClass as MessageClass  # re-exported: the ledger's callers use it

ATTACHMENT_BILLING_UNIT_BYTES = 1024 * 1024
"""Attachments are priced per started MiB (1 byte over a MiB costs two units of ``per_attachment_mb``)."""

DEFAULT_PRICE_BOOK = "-"
"""The tenant id of the platform's default price book (``tenants/-`` in the API)."""


class HoldState(StrEnum):
    """Where a hold is in its life; every state but ``HELD`` is final."""

    HELD = "held"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class Account(StrEnum):
    """The accounts of one tenant. ``ISSUED`` is the platform's side (credits it sold); the others are the
    tenant's (``SPENT`` doubles as the platform's earned revenue)."""

    ISSUED = "issued"
    AVAILABLE = "available"
    HELD = "held"
    SPENT = "spent"


class EntryKind(StrEnum):
    """What a journal entry records; each kind moves credits between one fixed pair of accounts."""

    TOP_UP = "top_up"
    RESERVE = "reserve"
    COMMIT = "commit"
    COMMIT_REFUND = "commit_refund"
    RELEASE = "release"
    EXPIRE = "expire"


ENTRY_ACCOUNTS: dict[EntryKind, tuple[Account, Account]] = {
    EntryKind.TOP_UP: (Account.ISSUED, Account.AVAILABLE),
    EntryKind.RESERVE: (Account.AVAILABLE, Account.HELD),
    EntryKind.COMMIT: (Account.HELD, Account.SPENT),
    EntryKind.COMMIT_REFUND: (Account.HELD, Account.AVAILABLE),
    EntryKind.RELEASE: (Account.HELD, Account.AVAILABLE),
    EntryKind.EXPIRE: (Account.HELD, Account.AVAILABLE),
}
"""(debit, credit) account of each entry kind; the database refuses any other pair."""


class FinalOutcome(StrEnum):
    """A message's final outcome as the ledger settles it: ``SENT`` commits its hold, ``FAILED`` releases it."""

    SENT = "sent"
    FAILED = "failed"


class OutcomeResult(StrEnum):
    """What applying an outcome event did."""

    COMMITTED = "committed"
    """``sent`` on a held hold: the whole hold was spent."""
    RELEASED = "released"
    """``failed`` on a held hold: its credits returned."""
    HOLD_ALREADY_RESOLVED = "hold_already_resolved"
    """The hold was committed or released before (by a call or another event); nothing changed."""
    HOLD_EXPIRED = "hold_expired"
    """The hold had expired and its credits had returned; nothing changed. A late ``sent`` is not charged (the
    credits may be spent already; charging could overdraw) and is reported in the outbox as ``unbilled_send``."""
    HOLD_NOT_FOUND = "hold_not_found"
    """No hold has this id (e.g. a message covered by a campaign chunk's hold); nothing changed."""


@dataclass(frozen=True)
class Balance:
    """A tenant's credits. Everything the tenant ever bought is ``available + held + spent``."""

    tenant_id: str
    available: int
    """Credits free to reserve."""
    held: int
    """Credits set aside by unresolved holds."""
    spent: int
    """Credits consumed by committed holds."""
    low_balance_threshold: int | None = None
    """Below this many available credits a ``low_balance_crossed`` notification is written, once per crossing."""

    @property
    def total_topped_up(self) -> int:
        """Every credit the tenant ever bought."""
        return self.available + self.held + self.spent


@dataclass(frozen=True)
class PriceBook:
    """Prices in credit units. ``tenant_id`` is ``DEFAULT_PRICE_BOOK`` for the platform defaults."""

    tenant_id: str
    otp_per_email: int
    transactional_per_email: int
    bulk_per_email: int
    per_attachment_mb: int
    """Price per started MiB of attachments, per email."""

    def per_email(self, message_class: MessageClass) -> int:
        """The price of one email of ``message_class``, attachments aside."""
        match message_class:
            case MessageClass.OTP:
                return self.otp_per_email
            case MessageClass.TRANSACTIONAL:
                return self.transactional_per_email
            case MessageClass.BULK:
                return self.bulk_per_email


@dataclass(frozen=True)
class PriceOverrides:
    """A tenant's own prices; ``None`` inherits the platform default."""

    otp_per_email: int | None = None
    transactional_per_email: int | None = None
    bulk_per_email: int | None = None
    per_attachment_mb: int | None = None


@dataclass(frozen=True)
class Price:
    """The unit prices a hold was priced with, fixed at reserve time."""

    per_email: int
    per_attachment_mb: int


@dataclass(frozen=True)
class ReserveRequest:
    """One hold to make (the arguments of :meth:`Ledger.reserve`)."""

    tenant_id: str
    hold_id: str
    """Our message id or campaign chunk id; globally unique, and the idempotency key of the reserve."""
    message_class: MessageClass
    emails: int = 1
    attachment_bytes: int = 0
    """Attachment bytes of each email (priced per started MiB, per email)."""
    ttl_s: float | None = None
    """Seconds until the hold expires if nobody resolves it; ``None`` for the ledger's default."""


@dataclass(frozen=True)
class Hold:
    """Credits set aside for one message or one campaign chunk."""

    hold_id: str
    tenant_id: str
    message_class: MessageClass
    emails: int
    attachment_bytes: int
    price: Price
    amount: int
    """What the hold set aside: ``emails * (per_email + started MiB * per_attachment_mb)``."""
    state: HoldState
    committed_amount: int | None
    """What was spent, once committed."""
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None
    resolution_request_id: str | None = None
    resolution_reason: str | None = None

    @property
    def returned_amount(self) -> int:
        """Credits that went back to ``available`` when the hold was resolved (0 while held)."""
        if self.state is HoldState.HELD:
            return 0
        return self.amount - (self.committed_amount or 0)


@dataclass(frozen=True)
class Transaction:
    """One journal entry: ``amount`` moved from ``debit_account`` to ``credit_account`` of ``tenant_id``."""

    entry_id: int
    tenant_id: str
    kind: EntryKind
    debit_account: Account
    credit_account: Account
    amount: int
    hold_id: str | None
    request_id: str | None
    available_after: int
    """The tenant's available credits right after this entry."""
    created_at: datetime


@dataclass(frozen=True)
class OutcomeEvent:
    """A message outcome from the EVENTS stream, as :meth:`Ledger.apply_outcomes` takes it."""

    event_id: str
    """The event's own id: its idempotency key."""
    hold_id: str
    outcome: FinalOutcome


@dataclass(frozen=True)
class OutcomeApplied:
    """What an outcome event did; ``duplicate`` when the event had been applied before (same result again)."""

    event_id: str
    hold_id: str
    outcome: FinalOutcome
    result: OutcomeResult
    duplicate: bool


class NotificationKind(StrEnum):
    """Kinds of rows in the ``ledger.notifications`` outbox."""

    LOW_BALANCE_CROSSED = "low_balance_crossed"
    """Available credits fell below the tenant's threshold; payload: tenant_id, threshold, available."""
    UNBILLED_SEND = "unbilled_send"
    """A ``sent`` outcome arrived for a hold that had expired or been released; payload: hold_id, state, amount,
    event_id."""


@dataclass(frozen=True)
class Notification:
    """One outbox row, for the service to publish (then mark published)."""

    notification_id: int
    tenant_id: str
    kind: NotificationKind
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
