"""A campaign as the domain sees it: its spec (what the customer asked for), its lifecycle and its progress.

Lifecycle (listmonk's, plus a reason on every pause)::

    draft ──start──▶ scheduled ──(send_time)──▶ running ──(every recipient final)──▶ completed
                        │  ▲                     │  ▲
                        └──┴──pause/resume───▶ paused           any state but completed ──cancel──▶ cancelled

A transition that does not apply to the current state is refused with FAILED_PRECONDITION naming that state; a
repeated transition with the same request_id answers the campaign as it is now.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from libs.common.errors import FailedPrecondition

__all__ = [
    "Action",
    "CampaignRecord",
    "CampaignSpec",
    "CampaignState",
    "Mailbox",
    "PauseReason",
    "Progress",
    "SendWindow",
    "next_state",
]


class CampaignState(StrEnum):
    """Where a campaign is in its life (stored as these values)."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class PauseReason(StrEnum):
    """Why a campaign is paused ("" when it is not)."""

    NONE = ""
    BY_CUSTOMER = "by_customer"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    SEND_WINDOW_CLOSED = "send_window_closed"


class Action(StrEnum):
    """What a customer can do to a campaign."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


def next_state(action: Action, state: CampaignState, *, send_time_ahead: bool) -> CampaignState:
    """The state ``action`` leads to from ``state``; FAILED_PRECONDITION (reason ``ILLEGAL_TRANSITION``, the
    current state in the metadata) when it does not apply."""
    target: CampaignState | None = None
    if action is Action.START and state is CampaignState.DRAFT:
        target = CampaignState.SCHEDULED if send_time_ahead else CampaignState.RUNNING
    elif action is Action.PAUSE and state in (CampaignState.SCHEDULED, CampaignState.RUNNING, CampaignState.PAUSED):
        target = CampaignState.PAUSED
    elif action is Action.RESUME and state is CampaignState.PAUSED:
        target = CampaignState.SCHEDULED if send_time_ahead else CampaignState.RUNNING
    elif action is Action.CANCEL and state not in (CampaignState.COMPLETED, CampaignState.CANCELLED):
        target = CampaignState.CANCELLED
    if target is None:
        raise FailedPrecondition(f"cannot {action.value} a campaign that is {state.value}",
                                 reason="ILLEGAL_TRANSITION", metadata={"state": state.value.upper(),
                                                                        "action": action.value})
    return target


@dataclass(frozen=True)
class Mailbox:
    """An address and its display name."""

    email: str
    name: str = ""


@dataclass(frozen=True)
class SendWindow:
    """A daily window in a time zone: minutes after local midnight (an end before the start spans midnight)."""

    start_minute: int
    end_minute: int
    time_zone: str = "UTC"

    def is_open(self, now: datetime) -> bool:
        """Whether ``now`` (aware) falls inside the window."""
        from zoneinfo import ZoneInfo

        local = now.astimezone(ZoneInfo(self.time_zone or "UTC"))
        minute = local.hour * 60 + local.minute
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute


@dataclass(frozen=True)
class CampaignSpec:
    """What the customer asked for: everything but the state and the counts (stored as JSON)."""

    display_name: str
    sender: Mailbox
    reply_to: tuple[Mailbox, ...]
    subject: str
    text_body: str
    html_body: str
    headers: Mapping[str, str]
    tags: tuple[str, ...]
    attachment_ids: tuple[str, ...]
    metadata: Mapping[str, str]
    default_variables: Mapping[str, str]
    missing_variable_policy: str
    """``FAIL`` or ``EMPTY`` (``services.campaigns.templates.MissingVariablePolicy``)."""
    message_class: str
    """``bulk`` or ``transactional``."""
    send_time: datetime | None = None
    send_rate: float = 0.0
    send_window: SendWindow | None = None
    one_click_unsubscribe: bool = True
    unsubscribe_mailto: str = ""
    unsubscribe_topic: str = ""
    """The list a one-click unsubscribe leaves ("" = all the tenant's bulk mail)."""

    def to_json(self) -> str:
        """The spec as stored."""
        data = asdict(self)
        data["send_time"] = self.send_time.isoformat() if self.send_time else None
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CampaignSpec:
        """The spec as read back (``data`` is the decoded JSON)."""
        window = data.get("send_window")
        send_time = data.get("send_time")
        return cls(
            display_name=data["display_name"], sender=Mailbox(**data["sender"]),
            reply_to=tuple(Mailbox(**m) for m in data["reply_to"]), subject=data["subject"],
            text_body=data["text_body"], html_body=data["html_body"], headers=dict(data["headers"]),
            tags=tuple(data["tags"]), attachment_ids=tuple(data["attachment_ids"]), metadata=dict(data["metadata"]),
            default_variables=dict(data["default_variables"]),
            missing_variable_policy=data["missing_variable_policy"], message_class=data["message_class"],
            send_time=datetime.fromisoformat(send_time) if send_time else None, send_rate=data["send_rate"],
            send_window=SendWindow(**window) if window else None,
            one_click_unsubscribe=data["one_click_unsubscribe"], unsubscribe_mailto=data["unsubscribe_mailto"],
            unsubscribe_topic=data.get("unsubscribe_topic", ""))

    def fingerprint(self) -> bytes:
        """sha256 of the spec: a repeated create with the same request_id must ask for the same campaign."""
        return hashlib.sha256(self.to_json().encode()).digest()


@dataclass(frozen=True)
class Progress:
    """How far a campaign is (see ``CampaignProgress`` in campaigns.proto for each count's meaning)."""

    recipients: int = 0
    duplicates: int = 0
    invalid: int = 0
    pending: int = 0
    queued: int = 0
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    complained: int = 0
    failed: int = 0
    suppressed: int = 0
    cancelled: int = 0
    send_rate: float = 0.0
    estimated_end_time: datetime | None = None


@dataclass(frozen=True)
class CampaignRecord:
    """A campaign as stored: spec, state and the counts the campaigns service keeps itself."""

    id: str
    tenant_id: str
    spec: CampaignSpec
    state: CampaignState
    pause_reason: PauseReason
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    next_row: int
    last_row: int
    counts: Mapping[str, int] = field(default_factory=dict)
    """recipients, duplicates, invalid, expanded, queued, suppressed, render_failed, cancelled."""

    @property
    def name(self) -> str:
        """The resource name, ``campaigns/{id}``."""
        return f"campaigns/{self.id}"

    @property
    def pending(self) -> int:
        """Recipients not yet expanded (the rows from the cursor on; cancel counts them as cancelled)."""
        return max(0, self.counts.get("recipients", 0) - self.counts.get("expanded", 0)
                   - self.counts.get("cancelled", 0))
