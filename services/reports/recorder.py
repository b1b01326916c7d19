"""Records a batch of message events in one transaction: timeline, message state, provider index, stats and
suppressions.

Events arrive at least once and in any order. Each step is written so that the result does not depend on
either: an event counts only if its ``event_id`` was not recorded before (the timeline insert says which ones
are new: when it finds one recorded already, the batch's writes so far are undone to a savepoint and done again
without it), and the message row is merged in SQL by state rank (``models.STATE_TRANSITIONS``) so a late event
never moves a message backwards and two consumers updating the same message concurrently cannot lose an update.
The merge also numbers each message's new events (``messages.event_seq``, under the row lock the merge takes)
before they are inserted, so the sequence customers see follows the order events were recorded in, whichever
replica recorded them. Every multi-row write goes in key order so that concurrent consumer replicas take row
locks in the same order, message rows before timeline rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import psycopg
from esp.v1 import messages_pb2

from libs.common.mailbox_providers import MAILBOX_PROVIDERS, mailbox_provider_of_domain
from libs.common.suppressions import normalise_email
from services.reports.envelopes import record_from_message_event
from services.reports.message_index import resolve_message
from services.reports.models import (
    EMPTY_MAPPING,
    HARD_BOUNCE_TYPE,
    PLACEHOLDER_STATE,
    SCHEDULED_STATE,
    STATE_TRANSITIONS,
    YIELDING_STATES,
    AcceptedMessage,
    EventType,
    Mailbox,
    MessageEventRecord,
    MessageState,
    Suppression,
    SuppressionReason,
)
from services.reports.rollups import (
    EarlyCount,
    MessageFacts,
    StatsRollup,
    campaign_id_of,
    claimed_early,
    start_claim_early,
)
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


class RecordedEvent(NamedTuple):
    """A new event as customers see it: numbered within its message, with what its message row says."""

    event: MessageEventRecord
    sequence: int
    """1, 2, 3 … per message, in the order events were recorded (ties within a batch: event time, then type)."""
    message_class: str
    tags: tuple[str, ...]
    metadata: Mapping[str, str]
    campaign: str
    first_recipient: str
    """The message's first To address (for events that name no recipient of their own)."""


@dataclass(frozen=True)
class RecordOutcome:
    """What a batch changed."""

    new_events: tuple[MessageEventRecord, ...]
    """Events recorded now (duplicates of earlier events left out), including parked webhook events matched now."""
    duplicates: int
    suppressed: tuple[Suppression, ...]
    """Suppressions from the new events, with their reasons (for the Redis sets: ``add_to_redis``)."""
    recorded: tuple[RecordedEvent, ...] = ()
    """The new events with their sequence numbers and message summaries, in sequence order per message."""
    rollup: StatsRollup | None = None
    """With ``record_events(..., defer_rollups=True)``: the batch's rollup increments, for the caller to write
    (``StatsRollup.write``) in the same transaction, last."""


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
        if event.accepted is not None and event.accepted.send_time is not None:
            transition = SCHEDULED_STATE
        if transition is not None:
            state, rank = transition
            if rank > self.state_rank or (rank == self.state_rank and self._wins_tie(state, event.event_time)):
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

    def _wins_tie(self, state: MessageState, event_time: datetime) -> bool:
        """Whether ``state`` replaces the current state of the same rank: a yielding state gives way to the
        other (``models.YIELDING_STATES``), otherwise the later event wins (its time becomes the state time)."""
        if (self.state in YIELDING_STATES) != (state in YIELDING_STATES):
            return self.state in YIELDING_STATES
        return self.state_time is not None and event_time > self.state_time


_OTHER_MAILBOXES = MAILBOX_PROVIDERS[-1]
"""Where a recipient of no well-known mailbox provider is counted."""


def _by_domain_only(address: str) -> str:
    return mailbox_provider_of_domain(address.rpartition("@")[2]) or _OTHER_MAILBOXES


async def record_events(conn: psycopg.AsyncConnection, events: Sequence[MessageEventRecord], *,
                        mailbox_provider_of: Callable[[str], str] = _by_domain_only,
                        defer_rollups: bool = False) -> RecordOutcome:
    """Record ``events`` in the caller's transaction; return what was new.

    ``mailbox_provider_of`` maps a message's first recipient to its mailbox provider (gmail, yahoo …) for the
    rollups; the default knows the well-known domains only (the service passes its MX-aware classifier).
    ``defer_rollups`` leaves writing the rollups to the caller (``RecordOutcome.rollup``): every concurrent batch
    adds to the same rollup rows, so the consumer writes them right before its commit, to hold their locks for
    as short a time as it can."""
    unique: dict[str, MessageEventRecord] = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    if _may_claim_parked(unique.values()) and (await (await conn.execute(_ANY_PARKED)).fetchone() or (False,))[0]:
        # Only when something is parked at all: the common batch skips matching on an empty table.
        for claimed in await _claim_parked_webhook_events(conn, list(unique.values())):
            unique.setdefault(claimed.event_id, claimed)
    from_batch = frozenset(unique)
    candidates = list(unique.values())
    already: set[tuple[str, datetime]] = set()
    for _attempt in range(_NEW_EVENT_ATTEMPTS):
        fresh = [e for e in candidates if (e.event_id, e.event_time) not in already]
        if not fresh:
            return RecordOutcome((), len(events), ())
        try:
            async with conn.transaction():  # a savepoint: undone when an event turns out recorded before
                summaries, recorded, early = await _record_new(conn, fresh)
            break
        except _RecordedBefore:
            already = await _recorded_before(conn, candidates)
    else:
        raise RuntimeError("events kept being recorded by another transaction while this one numbered them")
    duplicates = len(events) - sum(1 for e in fresh if e.event_id in from_batch)

    rollup = StatsRollup()
    facts = {key: _message_facts(summary, mailbox_provider_of) for key, summary in summaries.items()}
    for event in fresh:
        rollup.add(event, facts.get((event.tenant_id, event.message_id)) or _NO_FACTS)
    for counted in early:
        rollup.attribute_early(counted, facts[(counted.tenant_id, counted.message_id)])

    suppressions = _suppressions_from(fresh)
    # A hard bounce or complaint replaces an earlier unsubscribe of the address (insert_suppressions), and the
    # Redis sets get each event's own reason: the address then refuses every class, not bulk only.
    await insert_suppressions(conn, suppressions)
    if defer_rollups:
        return RecordOutcome(tuple(fresh), duplicates, tuple(suppressions), recorded, rollup)
    await rollup.write(conn)
    return RecordOutcome(tuple(fresh), duplicates, tuple(suppressions), recorded)


_TYPE_ORDER = {event_type: position for position, event_type in enumerate(EventType)}
"""Between events of one message with the same time, the lifecycle's order (accepted before sent before
delivered), which ``EventType`` is declared in."""


def _numbered(deltas: Mapping[tuple[str, str], _MessageDelta],
              summaries: Mapping[tuple[str, str], _Summary]) -> tuple[RecordedEvent, ...]:
    """Each message's new events numbered after those recorded before: the merge returned the message's last
    number (``event_seq``) with its new events counted in."""
    recorded: list[RecordedEvent] = []
    for key in sorted(deltas):
        delta, summary = deltas[key], summaries.get(key, _NO_SUMMARY)
        first = summary.last_sequence - len(delta.events) + 1
        ordered = sorted(delta.events, key=lambda e: (e.event_time, _TYPE_ORDER[e.event_type], e.event_id))
        recorded.extend(
            RecordedEvent(event, first + offset, event.message_class or summary.message_class, summary.tags,
                          summary.metadata, summary.campaign, summary.first_recipient)
            for offset, event in enumerate(ordered))
    return tuple(recorded)


_NEW_EVENT_ATTEMPTS = 3
"""Tries at numbering and inserting a batch's new events (a retry follows events found recorded meanwhile)."""


class _RecordedBefore(Exception):
    """Some of the events taken for new were in the timeline already: the savepoint is undone."""


async def _record_new(conn: psycopg.AsyncConnection, fresh: Sequence[MessageEventRecord]) -> tuple[
        dict[tuple[str, str], _Summary], tuple[RecordedEvent, ...], list[EarlyCount]]:
    """Merge the message rows of events believed new, which numbers them, then insert them into the timeline with
    their numbers: one write per event (inserting first and numbering after was a second, non-HOT write of each
    partitioned row). Raises :class:`_RecordedBefore` when the insert finds some recorded already (a redelivery):
    the caller undoes this and tries again without them.

    The message rows are locked (in key order) before the timeline rows: a concurrent transaction recording the
    same event holds its message row until it commits, so the insert here then sees the event and does not
    wait on it while holding rows the other needs."""
    deltas: dict[tuple[str, str], _MessageDelta] = {}
    for event in fresh:
        key = (event.tenant_id, event.message_id)
        delta = deltas.get(key)
        if delta is None:
            delta = deltas[key] = _MessageDelta(event.tenant_id, event.message_id, event.event_time, event.event_time)
        delta.add(event)
    async with conn.pipeline():
        merged = await _start_merge_messages(conn, [deltas[k] for k in sorted(deltas)])
        await _index_provider_ids(conn, fresh)
        # After the merge, which waited for any transaction still holding these messages' rows.
        early = await start_claim_early(conn, (k for k, d in deltas.items() if d.accepted is not None))
    summaries = await _summaries(merged)
    recorded = _numbered(deltas, summaries)
    cursor = await conn.execute(_INSERT_TIMELINE, (json_rows([
        _timeline_row(r.event, r.sequence) for r in sorted(recorded, key=_by_recorded_event_id)]),))
    if len(await cursor.fetchall()) != len(recorded):
        raise _RecordedBefore
    return summaries, recorded, await claimed_early(early)


def _by_recorded_event_id(recorded: RecordedEvent) -> str:
    return recorded.event.event_id


async def _recorded_before(conn: psycopg.AsyncConnection,
                           events: Sequence[MessageEventRecord]) -> set[tuple[str, datetime]]:
    """Which of ``events`` the timeline holds, as (event id, event time) pairs (its key). Bounded by the events'
    times so that only their day partitions are searched; ids go binary (a text array is dumped element by
    element in Python)."""
    times = [e.event_time for e in events]
    cur = await conn.execute(
        "SELECT event_id, event_time FROM reports.events WHERE event_id = ANY(%b) AND event_time BETWEEN %s AND %s",
        ([e.event_id for e in events], min(times), max(times)))
    return {(event_id, event_time) for event_id, event_time in await cur.fetchall()}


def json_rows(rows: Sequence[object]) -> str:
    """One JSON document for a ``json_to_recordset`` parameter: a batch's rows travel as one text value that
    Postgres unpacks, instead of one Python-dumped array per column or one statement per row."""
    return json.dumps(rows, separators=(",", ":"))


_INSERT_TIMELINE = """
INSERT INTO reports.events (event_id, tenant_id, message_id, event_type, event_time, provider, provider_message_id,
    recipient, reason, attempt, outcome, latency_ms, bounce_type, url, attributes, seq)
SELECT e.event_id, e.tenant_id, e.message_id, e.event_type, e.event_time, e.provider, e.provider_message_id,
    e.recipient, e.reason, e.attempt, e.outcome, e.latency_ms, e.bounce_type, e.url, e.attributes, e.seq
FROM json_to_recordset(%s::json) AS e(event_id text, tenant_id text, message_id text, event_type text,
    event_time timestamptz, provider text, provider_message_id text, recipient text, reason text, attempt integer,
    outcome text, latency_ms bigint, bounce_type text, url text, attributes jsonb, seq integer)
ON CONFLICT (event_id, event_time) DO NOTHING
RETURNING event_id
"""
_ANY_PARKED = "SELECT EXISTS (SELECT FROM reports.unmatched_delivery_events)"


def _timeline_row(e: MessageEventRecord, sequence: int) -> dict[str, object]:
    return {"event_id": e.event_id, "tenant_id": e.tenant_id, "message_id": e.message_id,
            "event_type": e.event_type, "event_time": e.event_time.isoformat(), "provider": e.provider,
            "provider_message_id": e.provider_message_id, "recipient": e.recipient, "reason": e.reason,
            "attempt": e.attempt, "outcome": e.outcome, "latency_ms": e.latency_ms, "bounce_type": e.bounce_type,
            "url": e.url, "attributes": e.attributes if type(e.attributes) is dict else dict(e.attributes),
            "seq": sequence}


def _may_claim_parked(events: Iterable[MessageEventRecord]) -> bool:
    return any(e.event_type is EventType.ACCEPTED or (e.event_type is EventType.SENT and e.provider_message_id)
               for e in events)


async def _claim_parked_webhook_events(conn: psycopg.AsyncConnection,
                                       events: Sequence[MessageEventRecord]) -> list[MessageEventRecord]:
    """Delivery callbacks parked because their message was unknown, claimed now that a SENT (provider id) or
    ACCEPTED (our id) event of this batch identifies it; returned to be recorded with the batch.

    Duplicates of events recorded earlier claim too: they name the same message, and a callback parked after
    the first copy was recorded would otherwise wait for the sweep."""
    sent = [e for e in events if e.event_type is EventType.SENT and e.provider and e.provider_message_id]
    accepted = {e.message_id: e for e in events if e.event_type is EventType.ACCEPTED}
    if not sent and not accepted:
        return []
    cur = await conn.execute(
        """DELETE FROM reports.unmatched_delivery_events
           WHERE (provider, provider_message_id) IN (
                     SELECT s.provider, s.provider_message_id
                     FROM json_to_recordset(%s::json) AS s(provider text, provider_message_id text))
              OR message_id IN (SELECT json_array_elements_text(%s::json))
           RETURNING event_id, provider, provider_message_id, message_id, event""",
        (json_rows([{"provider": e.provider, "provider_message_id": e.provider_message_id} for e in sent]),
         json_rows(list(accepted))),
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
    return claimed


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


# Whether the delta's state replaces the row's: a higher rank, or the same rank held by a state that yields
# (models.YIELDING_STATES; the same rule as _MessageDelta._wins_tie, except that between two rows of one state
# the recorded one stays).
_YIELDING = ", ".join(sorted(f"'{state.value}'" for state in YIELDING_STATES))
_REPLACES_STATE = (f"(excluded.state_rank > m.state_rank OR (excluded.state_rank = m.state_rank"
                   f" AND m.state IN ({_YIELDING}) AND excluded.state NOT IN ({_YIELDING})))")

# Summary fields absent from a row (a message whose ACCEPTED event is not in this batch) take the empty values.
_MERGE_MESSAGES = """
INSERT INTO reports.messages AS m (tenant_id, message_id, state, state_rank, state_time, accepted_seen,
    message_class, sender, to_addrs, cc_addrs, bcc_addrs, subject, tags, metadata, attachment_ids, request_id,
    credits, campaign, provider, provider_message_id, provider_from_sent, attempts, create_time, update_time, send_time,
    event_seq)
SELECT d.tenant_id, d.message_id, d.state, d.state_rank, d.state_time, d.accepted_seen, d.message_class,
    coalesce(d.sender, '{}'), coalesce(d.to_addrs, '[]'), coalesce(d.cc_addrs, '[]'), coalesce(d.bcc_addrs, '[]'),
    coalesce(d.subject, ''), coalesce(d.tags, '{}'), coalesce(d.metadata, '{}'), coalesce(d.attachment_ids, '{}'),
    coalesce(d.request_id, ''), coalesce(d.credits, 0), coalesce(d.campaign, ''), d.provider, d.provider_message_id,
    d.provider_from_sent, d.attempts, d.create_time, d.update_time, d.send_time, d.event_seq
FROM json_to_recordset(%s::json) AS d(tenant_id text, message_id text, state text, state_rank smallint,
    state_time timestamptz, accepted_seen boolean, message_class text, sender jsonb, to_addrs jsonb, cc_addrs jsonb,
    bcc_addrs jsonb, subject text, tags text[], metadata jsonb, attachment_ids text[], request_id text,
    credits bigint, campaign text, provider text, provider_message_id text, provider_from_sent boolean,
    attempts integer, create_time timestamptz, update_time timestamptz, send_time timestamptz, event_seq integer)
ON CONFLICT (tenant_id, message_id) DO UPDATE SET
    state = CASE WHEN REPLACES_STATE THEN excluded.state ELSE m.state END,
    state_time = CASE WHEN REPLACES_STATE THEN excluded.state_time ELSE m.state_time END,
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
    send_time = CASE WHEN excluded.accepted_seen THEN excluded.send_time ELSE m.send_time END,
    provider = CASE WHEN excluded.provider_from_sent OR m.provider = '' THEN excluded.provider ELSE m.provider END,
    provider_message_id = CASE WHEN excluded.provider_from_sent OR m.provider_message_id = ''
                               THEN excluded.provider_message_id ELSE m.provider_message_id END,
    provider_from_sent = m.provider_from_sent OR excluded.provider_from_sent,
    attempts = m.attempts + excluded.attempts,
    create_time = CASE WHEN excluded.accepted_seen THEN excluded.create_time
                       WHEN m.accepted_seen THEN m.create_time
                       ELSE LEAST(m.create_time, excluded.create_time) END,
    update_time = GREATEST(m.update_time, excluded.update_time),
    event_seq = m.event_seq + excluded.event_seq
RETURNING tenant_id, message_id, message_class, tags, campaign, accepted_seen, event_seq, metadata,
    coalesce(to_addrs->0->>'email', ''), credits, GREATEST(create_time, send_time)
""".replace("REPLACES_STATE", _REPLACES_STATE)


def _mailbox_json(mailbox: Mailbox) -> dict[str, str]:
    return {"email": mailbox.email, "name": mailbox.name}


def _merge_row(delta: _MessageDelta) -> dict[str, object]:
    state, rank = (delta.state, delta.state_rank) if delta.state_rank >= 0 else PLACEHOLDER_STATE
    row: dict[str, object] = {
        "tenant_id": delta.tenant_id,
        "message_id": delta.message_id,
        "state": state,
        "state_rank": rank,
        "state_time": (delta.state_time or delta.first_time).isoformat(),
        "accepted_seen": False,
        "message_class": delta.message_class,
        "provider": delta.provider,
        "provider_message_id": delta.provider_message_id,
        "provider_from_sent": delta.provider_from_sent,
        "attempts": delta.attempts,
        "create_time": delta.first_time.isoformat(),
        "update_time": delta.last_time.isoformat(),
        "event_seq": len(delta.events),
    }
    accepted = delta.accepted
    if accepted is not None:
        row.update(
            accepted_seen=True,
            sender=_mailbox_json(accepted.sender),
            to_addrs=[_mailbox_json(m) for m in accepted.to],
            cc_addrs=[_mailbox_json(m) for m in accepted.cc],
            bcc_addrs=[_mailbox_json(m) for m in accepted.bcc],
            subject=accepted.subject,
            tags=accepted.tags,
            metadata=accepted.metadata if type(accepted.metadata) is dict else dict(accepted.metadata),
            attachment_ids=accepted.attachment_ids,
            request_id=accepted.request_id,
            credits=accepted.credits,
            campaign=accepted.campaign,
        )
        if accepted.create_time:
            row["create_time"] = accepted.create_time.isoformat()
        if accepted.send_time:
            row["send_time"] = accepted.send_time.isoformat()
    return row


async def _start_merge_messages(conn: psycopg.AsyncConnection,
                                deltas: Sequence[_MessageDelta]) -> psycopg.AsyncCursor | None:
    """Queue the merge of each message's delta into its row (creating a placeholder row if needed), in the
    order given (key order); :func:`_summaries` reads the result."""
    if not deltas:
        return None
    return await conn.execute(_MERGE_MESSAGES, (json_rows([_merge_row(d) for d in deltas]),))


class _Summary(NamedTuple):
    """What the stats and the recorded events need of a merged message row."""

    message_class: str
    tags: tuple[str, ...]
    campaign: str
    accepted_seen: bool
    last_sequence: int = 0
    metadata: Mapping[str, str] = EMPTY_MAPPING
    first_recipient: str = ""
    credits: int = 0
    accept_time: datetime | None = None
    """Accepted, or for a scheduled message due (the later of the two)."""


_NO_SUMMARY = _Summary("", (), "", True)


async def _summaries(cursor: psycopg.AsyncCursor | None) -> dict[tuple[str, str], _Summary]:
    """Each merged message's class, tags, campaign, metadata and last event number after the merge, and whether
    its ACCEPTED event is recorded (without it, campaign, tags and metadata are not known yet)."""
    if cursor is None:
        return {}
    return {(tenant_id, message_id): _Summary(message_class, tuple(tags), campaign, accepted_seen, event_seq,
                                              metadata or EMPTY_MAPPING, first_recipient, credits, accept_time)
            for (tenant_id, message_id, message_class, tags, campaign, accepted_seen, event_seq, metadata,
                 first_recipient, credits, accept_time) in await cursor.fetchall()}


_NO_FACTS = MessageFacts("", (), "", "", 0, None, True)


def _message_facts(summary: _Summary, mailbox_provider_of: Callable[[str], str]) -> MessageFacts:
    """What the rollups need of a merged message row."""
    if not summary.accepted_seen:
        return MessageFacts(summary.message_class, (), "", "", 0, None, False)
    return MessageFacts(summary.message_class, summary.tags, campaign_id_of(summary.campaign),
                        mailbox_provider_of(summary.first_recipient), summary.credits, summary.accept_time, True)


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
           SELECT p.provider, p.provider_message_id, p.tenant_id, p.message_id, p.recipient
           FROM json_to_recordset(%s::json) AS p(provider text, provider_message_id text, tenant_id text,
                                                 message_id text, recipient text)
           ON CONFLICT DO NOTHING""",
        (json_rows([{"provider": r[0], "provider_message_id": r[1], "tenant_id": r[2], "message_id": r[3],
                     "recipient": r[4]} for r in rows]),),
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
