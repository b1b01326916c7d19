"""Records a batch of message events in one transaction: timeline, message state, provider index, stats and
suppressions.

Events arrive at least once and in any order. Each step is written so that the result does not depend on
either: an event counts only if its ``event_id`` was not recorded before (the timeline insert says which ones
are new), and the message row is merged in SQL by state rank (``models.STATE_TRANSITIONS``) so a late event
never moves a message backwards and two consumers updating the same message concurrently cannot lose an update.
Every multi-row write goes in key order so that concurrent consumer replicas take row locks in the same order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from esp.v1 import messages_pb2
from psycopg.types.json import Jsonb

from services.reports.envelopes import record_from_message_event
from services.reports.message_index import resolve_message
from services.reports.models import (
    HARD_BOUNCE_TYPE,
    PLACEHOLDER_STATE,
    STATE_TRANSITIONS,
    AcceptedMessage,
    EventType,
    Mailbox,
    MessageEventRecord,
    MessageState,
    Suppression,
    SuppressionReason,
    normalise_email,
)
from services.reports.stats import StatsRollup
from services.reports.suppressions import insert_suppressions

# Events whose provider is the one that took the message (SENT), and delivery reports that name it too: these
# fill Message.provider when SENT has not been seen yet. ATTEMPTED and DEFERRED name providers that failed.
_PROVIDER_EVENTS = frozenset({
    EventType.DELIVERED, EventType.BOUNCED, EventType.COMPLAINED, EventType.REJECTED, EventType.OPENED,
    EventType.CLICKED, EventType.UNSUBSCRIBED,
})
_SUPPRESSING_EVENTS: Mapping[EventType, SuppressionReason] = {
    EventType.COMPLAINED: SuppressionReason.COMPLAINT,
    EventType.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBE,
}
_MAX_NOTE = 500


@dataclass(frozen=True)
class RecordOutcome:
    """What a batch changed."""

    new_events: tuple[MessageEventRecord, ...]
    """Events recorded now (duplicates of earlier events left out), including parked webhook events matched now."""
    duplicates: int
    suppressed: Mapping[str, tuple[str, ...]]
    """Addresses to suppress by tenant, from the new events (for the Redis mirror)."""


@dataclass
class _MessageDelta:
    """What the new events of one message change on its row."""

    tenant_id: str
    message_id: str
    first_time: datetime
    last_time: datetime
    state: MessageState = PLACEHOLDER_STATE[0]
    state_rank: int = -1
    state_time: datetime | None = None
    attempts: int = 0
    provider: str = ""
    provider_message_id: str = ""
    provider_from_sent: bool = False
    sent_time: datetime | None = None
    message_class: str = ""
    accepted: AcceptedMessage | None = None
    events: list[MessageEventRecord] = field(default_factory=list)

    def add(self, event: MessageEventRecord) -> None:
        self.events.append(event)
        self.first_time = min(self.first_time, event.event_time)
        self.last_time = max(self.last_time, event.event_time)
        self.message_class = self.message_class or event.message_class
        transition = STATE_TRANSITIONS.get(event.event_type)
        if transition is not None:
            state, rank = transition
            # Equal ranks: the later event wins (its time becomes the state time).
            later = self.state_time is not None and event.event_time > self.state_time
            if rank > self.state_rank or (rank == self.state_rank and later):
                self.state, self.state_rank, self.state_time = state, rank, event.event_time
        if event.event_type is EventType.ATTEMPTED:
            self.attempts += 1
        if event.event_type is EventType.SENT and event.provider:
            if self.sent_time is None or event.event_time >= self.sent_time:
                self.provider, self.provider_message_id = event.provider, event.provider_message_id
                self.provider_from_sent, self.sent_time = True, event.event_time
        elif event.event_type in _PROVIDER_EVENTS and event.provider and not self.provider_from_sent:
            self.provider = self.provider or event.provider
            self.provider_message_id = self.provider_message_id or event.provider_message_id
        if event.accepted is not None:
            self.accepted = event.accepted
            self.message_class = event.accepted.message_class or self.message_class


async def record_events(conn: psycopg.AsyncConnection, events: Sequence[MessageEventRecord]) -> RecordOutcome:
    """Record ``events`` in the caller's transaction; return what was new."""
    unique: dict[str, MessageEventRecord] = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    fresh = await _insert_timeline(conn, list(unique.values()))
    duplicates = len(events) - len(fresh)
    fresh += await _apply_parked_webhook_events(conn, fresh)
    if not fresh:
        return RecordOutcome((), duplicates, {})

    deltas: dict[tuple[str, str], _MessageDelta] = {}
    for event in fresh:
        key = (event.tenant_id, event.message_id)
        delta = deltas.get(key)
        if delta is None:
            delta = deltas[key] = _MessageDelta(event.tenant_id, event.message_id, event.event_time, event.event_time)
        delta.add(event)
    summaries = await _merge_messages(conn, [deltas[k] for k in sorted(deltas)])
    await _index_provider_ids(conn, fresh)

    rollup = StatsRollup()
    for event in fresh:
        message_class, tags = summaries.get((event.tenant_id, event.message_id), (event.message_class, ()))
        rollup.add(tenant_id=event.tenant_id, event_type=event.event_type, event_time=event.event_time,
                   message_class=event.message_class or message_class, provider=event.provider, tags=tags,
                   latency_ms=event.latency_ms)
    await rollup.write(conn)

    suppressions = _suppressions_from(fresh)
    await insert_suppressions(conn, suppressions)
    suppressed: dict[str, list[str]] = defaultdict(list)
    for suppression in suppressions:
        suppressed[suppression.tenant_id].append(suppression.email)
    return RecordOutcome(tuple(fresh), duplicates, {t: tuple(e) for t, e in suppressed.items()})


async def _insert_timeline(conn: psycopg.AsyncConnection,
                           events: Sequence[MessageEventRecord]) -> list[MessageEventRecord]:
    """Insert the events; return those that were not recorded before, in the order given."""
    if not events:
        return []
    ordered = sorted(events, key=lambda e: e.event_id)
    cur = await conn.execute(
        """INSERT INTO reports.events (event_id, tenant_id, message_id, event_type, event_time, provider,
               provider_message_id, recipient, reason, attempt, outcome, latency_ms, bounce_type, url, attributes)
           SELECT e.event_id, e.tenant_id, e.message_id, e.event_type, e.event_time, e.provider,
               e.provider_message_id, e.recipient, e.reason, e.attempt, e.outcome, e.latency_ms, e.bounce_type,
               e.url, e.attributes::jsonb
           FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::text[],
                       %s::text[], %s::text[], %s::integer[], %s::text[], %s::bigint[], %s::text[], %s::text[],
                       %s::text[])
               AS e(event_id, tenant_id, message_id, event_type, event_time, provider, provider_message_id,
                    recipient, reason, attempt, outcome, latency_ms, bounce_type, url, attributes)
           ON CONFLICT (event_id) DO NOTHING
           RETURNING event_id""",
        (
            [e.event_id for e in ordered],
            [e.tenant_id for e in ordered],
            [e.message_id for e in ordered],
            [e.event_type.value for e in ordered],
            [e.event_time for e in ordered],
            [e.provider for e in ordered],
            [e.provider_message_id for e in ordered],
            [e.recipient for e in ordered],
            [e.reason for e in ordered],
            [e.attempt for e in ordered],
            [e.outcome for e in ordered],
            [e.latency_ms for e in ordered],
            [e.bounce_type for e in ordered],
            [e.url for e in ordered],
            [json.dumps(dict(e.attributes)) for e in ordered],
        ),
    )
    inserted = {row[0] for row in await cur.fetchall()}
    return [e for e in events if e.event_id in inserted]


async def _apply_parked_webhook_events(conn: psycopg.AsyncConnection,
                                       fresh: Sequence[MessageEventRecord]) -> list[MessageEventRecord]:
    """Delivery callbacks parked because their message was unknown, claimed now that a new SENT (provider id)
    or ACCEPTED (our id) event identifies it; recorded in the timeline and returned as new events."""
    sent = [e for e in fresh if e.event_type is EventType.SENT and e.provider and e.provider_message_id]
    accepted = {e.message_id: e for e in fresh if e.event_type is EventType.ACCEPTED}
    if not sent and not accepted:
        return []
    cur = await conn.execute(
        """DELETE FROM reports.unmatched_delivery_events
           WHERE (provider, provider_message_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
              OR message_id = ANY(%s::text[])
           RETURNING event_id, provider, provider_message_id, message_id, event""",
        ([e.provider for e in sent], [e.provider_message_id for e in sent], list(accepted)),
    )
    claimed: list[MessageEventRecord] = []
    unclaimed: list[tuple[str, str, str, str, bytes]] = []
    for event_id, provider, provider_message_id, message_id, payload in await cur.fetchall():
        parked = messages_pb2.MessageEvent()
        parked.ParseFromString(payload)
        by_our_id = accepted.get(message_id)
        if by_our_id is not None and parked.attributes.get("callback_tenant_id", by_our_id.tenant_id) != (
                by_our_id.tenant_id):
            by_our_id = None  # the callback names another tenant: not this message
        owner = by_our_id or _owner_by_recipient(
            [e for e in sent if (e.provider, e.provider_message_id) == (provider, provider_message_id)],
            parked.recipient,
        )
        if owner is None:
            unclaimed.append((event_id, provider, provider_message_id, message_id, payload))
            continue
        claimed.append(record_from_message_event(parked, owner.tenant_id, owner.message_id, owner.message_class))
    if unclaimed:
        await conn.execute(
            """INSERT INTO reports.unmatched_delivery_events (event_id, provider, provider_message_id, message_id,
                   event) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[])
               ON CONFLICT (event_id) DO NOTHING""",
            tuple(list(column) for column in zip(*unclaimed, strict=True)),
        )
    return await _insert_timeline(conn, claimed)


def _owner_by_recipient(candidates: Sequence[MessageEventRecord], recipient: str) -> MessageEventRecord | None:
    """Which SENT event a callback about ``recipient`` belongs to when a provider id is shared (batch sends)."""
    if len(candidates) == 1:
        return candidates[0]
    wanted = normalise_email(recipient)
    for candidate in candidates:
        if normalise_email(candidate.recipient) == wanted:
            return candidate
    for candidate in candidates:
        if not candidate.recipient:
            return candidate
    return None


_MERGE_MESSAGE = """
INSERT INTO reports.messages AS m (tenant_id, message_id, state, state_rank, state_time, accepted_seen,
    message_class, sender, to_addrs, cc_addrs, bcc_addrs, subject, tags, metadata, attachment_ids, request_id,
    credits, campaign, provider, provider_message_id, attempts, create_time, update_time)
VALUES (%(tenant_id)s, %(message_id)s, %(state)s, %(state_rank)s, %(state_time)s, %(accepted_seen)s,
    %(message_class)s, %(sender)s, %(to_addrs)s, %(cc_addrs)s, %(bcc_addrs)s, %(subject)s, %(tags)s, %(metadata)s,
    %(attachment_ids)s, %(request_id)s, %(credits)s, %(campaign)s, %(provider)s, %(provider_message_id)s,
    %(attempts)s, %(create_time)s, %(update_time)s)
ON CONFLICT (tenant_id, message_id) DO UPDATE SET
    state = CASE WHEN excluded.state_rank > m.state_rank THEN excluded.state ELSE m.state END,
    state_time = CASE WHEN excluded.state_rank > m.state_rank THEN excluded.state_time ELSE m.state_time END,
    state_rank = GREATEST(m.state_rank, excluded.state_rank),
    accepted_seen = m.accepted_seen OR excluded.accepted_seen,
    message_class = CASE WHEN excluded.message_class <> '' AND (excluded.accepted_seen OR m.message_class = '')
                         THEN excluded.message_class ELSE m.message_class END,
    sender = CASE WHEN excluded.accepted_seen THEN excluded.sender ELSE m.sender END,
    to_addrs = CASE WHEN excluded.accepted_seen THEN excluded.to_addrs ELSE m.to_addrs END,
    cc_addrs = CASE WHEN excluded.accepted_seen THEN excluded.cc_addrs ELSE m.cc_addrs END,
    bcc_addrs = CASE WHEN excluded.accepted_seen THEN excluded.bcc_addrs ELSE m.bcc_addrs END,
    subject = CASE WHEN excluded.accepted_seen THEN excluded.subject ELSE m.subject END,
    tags = CASE WHEN excluded.accepted_seen THEN excluded.tags ELSE m.tags END,
    metadata = CASE WHEN excluded.accepted_seen THEN excluded.metadata ELSE m.metadata END,
    attachment_ids = CASE WHEN excluded.accepted_seen THEN excluded.attachment_ids ELSE m.attachment_ids END,
    request_id = CASE WHEN excluded.accepted_seen THEN excluded.request_id ELSE m.request_id END,
    credits = CASE WHEN excluded.accepted_seen THEN excluded.credits ELSE m.credits END,
    campaign = CASE WHEN excluded.accepted_seen THEN excluded.campaign ELSE m.campaign END,
    provider = CASE WHEN %(provider_from_sent)s OR m.provider = '' THEN excluded.provider ELSE m.provider END,
    provider_message_id = CASE WHEN %(provider_from_sent)s OR m.provider_message_id = ''
                               THEN excluded.provider_message_id ELSE m.provider_message_id END,
    attempts = m.attempts + excluded.attempts,
    create_time = CASE WHEN excluded.accepted_seen THEN excluded.create_time
                       WHEN m.accepted_seen THEN m.create_time
                       ELSE LEAST(m.create_time, excluded.create_time) END,
    update_time = GREATEST(m.update_time, excluded.update_time)
RETURNING tenant_id, message_id, message_class, tags
"""


def _mailbox_json(mailbox: Mailbox) -> dict[str, str]:
    return {"email": mailbox.email, "name": mailbox.name}


def _merge_parameters(delta: _MessageDelta) -> dict[str, object]:
    accepted = delta.accepted
    state, rank = (delta.state, delta.state_rank) if delta.state_rank >= 0 else PLACEHOLDER_STATE
    return {
        "tenant_id": delta.tenant_id,
        "message_id": delta.message_id,
        "state": state.value,
        "state_rank": rank,
        "state_time": delta.state_time or delta.first_time,
        "accepted_seen": accepted is not None,
        "message_class": delta.message_class,
        "sender": Jsonb(_mailbox_json(accepted.sender) if accepted else {}),
        "to_addrs": Jsonb([_mailbox_json(m) for m in accepted.to] if accepted else []),
        "cc_addrs": Jsonb([_mailbox_json(m) for m in accepted.cc] if accepted else []),
        "bcc_addrs": Jsonb([_mailbox_json(m) for m in accepted.bcc] if accepted else []),
        "subject": accepted.subject if accepted else "",
        "tags": list(accepted.tags) if accepted else [],
        "metadata": Jsonb(dict(accepted.metadata) if accepted else {}),
        "attachment_ids": list(accepted.attachment_ids) if accepted else [],
        "request_id": accepted.request_id if accepted else "",
        "credits": accepted.credits if accepted else 0,
        "campaign": accepted.campaign if accepted else "",
        "provider": delta.provider,
        "provider_message_id": delta.provider_message_id,
        "provider_from_sent": delta.provider_from_sent,
        "attempts": delta.attempts,
        "create_time": (accepted.create_time if accepted and accepted.create_time else delta.first_time),
        "update_time": delta.last_time,
    }


async def _merge_messages(conn: psycopg.AsyncConnection,
                          deltas: Sequence[_MessageDelta]) -> dict[tuple[str, str], tuple[str, tuple[str, ...]]]:
    """Merge each message's delta into its row (creating a placeholder row if needed); return each message's
    class and tags after the merge, for the stats."""
    summaries: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
    async with conn.cursor() as cur:
        await cur.executemany(_MERGE_MESSAGE, [_merge_parameters(d) for d in deltas], returning=True)
        while True:
            for tenant_id, message_id, message_class, tags in await cur.fetchall():
                summaries[(tenant_id, message_id)] = (message_class, tuple(tags))
            if not cur.nextset():
                break
    return summaries


async def _index_provider_ids(conn: psycopg.AsyncConnection, fresh: Sequence[MessageEventRecord]) -> None:
    """Remember provider message id -> message for every new SENT event, for the webhook receiver."""
    rows = sorted({
        (e.provider, e.provider_message_id, e.tenant_id, e.message_id, normalise_email(e.recipient))
        for e in fresh if e.event_type is EventType.SENT and e.provider and e.provider_message_id
    })
    if not rows:
        return
    await conn.execute(
        """INSERT INTO reports.provider_messages (provider, provider_message_id, tenant_id, message_id, recipient)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
           ON CONFLICT DO NOTHING""",
        tuple(list(column) for column in zip(*rows, strict=True)),
    )


def _suppressions_from(fresh: Sequence[MessageEventRecord]) -> list[Suppression]:
    """Hard bounces, complaints and unsubscribes put the recipient on the tenant's list."""
    found: list[Suppression] = []
    for event in fresh:
        if not event.recipient:
            continue
        if event.event_type is EventType.BOUNCED and event.bounce_type == HARD_BOUNCE_TYPE:
            reason = SuppressionReason.HARD_BOUNCE
        elif event.event_type in _SUPPRESSING_EVENTS:
            reason = _SUPPRESSING_EVENTS[event.event_type]
        else:
            continue
        note = " ".join(part for part in (event.provider, event.reason) if part)[:_MAX_NOTE]
        found.append(Suppression(tenant_id=event.tenant_id, email=normalise_email(event.recipient), reason=reason,
                                 note=note, source_message_id=event.message_id))
    return found


async def claim_parked_events(conn: psycopg.AsyncConnection, *, min_age: timedelta, limit: int = 1000,
                              retention: timedelta = timedelta(days=7)) -> list[MessageEventRecord]:
    """Parked delivery callbacks whose message can be found now, removed from the parking table (in the caller's
    transaction) and returned for :func:`record_events`.

    The consumer claims parked callbacks as soon as it records the SENT or ACCEPTED event that identifies them,
    but a callback parked while that very transaction was running is missed; this sweep catches those. Callbacks
    still unknown after ``retention`` were not about our messages and are dropped.
    """
    await conn.execute("DELETE FROM reports.unmatched_delivery_events WHERE received_at < now() - %s",
                       (retention,))
    cur = await conn.execute(
        """SELECT event_id, provider, provider_message_id, message_id, event
           FROM reports.unmatched_delivery_events WHERE received_at < now() - %s
           ORDER BY received_at LIMIT %s FOR UPDATE SKIP LOCKED""",
        (min_age, limit),
    )
    claimed: list[MessageEventRecord] = []
    claimed_ids: list[str] = []
    for event_id, provider, provider_message_id, message_id, payload in await cur.fetchall():
        parked = messages_pb2.MessageEvent()
        parked.ParseFromString(payload)
        ref = await resolve_message(conn, provider, provider_message_id, parked.recipient, message_id,
                                    parked.attributes.get("callback_tenant_id", ""))
        if ref is None:
            continue
        claimed.append(record_from_message_event(parked, ref.tenant_id, ref.message_id, ref.message_class))
        claimed_ids.append(event_id)
    if claimed_ids:
        await conn.execute("DELETE FROM reports.unmatched_delivery_events WHERE event_id = ANY(%s)", (claimed_ids,))
    return claimed
