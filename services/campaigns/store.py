"""Campaigns and their recipients in Postgres: create, read, list, transitions and recipient loading.

Recipients are numbered in the order they are added (``row_number``, from 1, with gaps where a duplicate was
dropped); the expander works through them in that order behind a cursor (``next_row``). Adding takes the campaign
row's lock for the length of its insert, as the expander does for a chunk, so a chunk never passes rows that are
still being inserted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from libs.common.jetstream import Topology
from libs.common.outbox import CommittedRow
from services.campaigns.model import (
    Action,
    CampaignRecord,
    CampaignSpec,
    CampaignState,
    PauseReason,
    next_state,
)
from services.campaigns.notifications import paused_event, queue_event
from services.campaigns.recipients import Recipient

__all__ = ["ADDABLE_STATES", "AddedRecipients", "CampaignStore"]

ADDABLE_STATES = frozenset({CampaignState.DRAFT, CampaignState.SCHEDULED, CampaignState.RUNNING,
                            CampaignState.PAUSED})
"""States in which recipients may still be added (a running campaign takes them in behind its cursor)."""

_COLUMNS = """id, tenant_id, spec, state, pause_reason, created_at, updated_at, started_at, ended_at, next_row,
    last_row, recipients, duplicates, invalid, expanded, queued, suppressed, render_failed, cancelled"""
_COUNTS = ("recipients", "duplicates", "invalid", "expanded", "queued", "suppressed", "render_failed", "cancelled")


def _record(row: dict[str, Any]) -> CampaignRecord:
    return CampaignRecord(
        id=row["id"], tenant_id=row["tenant_id"], spec=CampaignSpec.from_json(row["spec"]),
        state=CampaignState(row["state"]), pause_reason=PauseReason(row["pause_reason"]),
        created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
        ended_at=row["ended_at"], next_row=row["next_row"], last_row=row["last_row"],
        counts={name: row[name] for name in _COUNTS})


@dataclass(frozen=True)
class AddedRecipients:
    """What one insert of recipients did."""

    added: int
    duplicates: int


class CampaignStore:
    """The campaigns schema, as the RPCs use it (the expander has its own statements)."""

    def __init__(self, pool: AsyncConnectionPool, topology: Topology, *, unpark_window_s: float = 30.0,
                 on_commit: Callable[[Sequence[CommittedRow]], None] = lambda rows: None) -> None:
        self.pool = pool
        self.topology = topology
        self.unpark_window_s = unpark_window_s
        self.on_commit = on_commit
        """Receives the outbox rows a transition committed (the outbox publisher's ``publish_soon``)."""

    async def create(self, campaign_id: str, tenant_id: str, request_id: str, spec: CampaignSpec) -> CampaignRecord:
        """Store a new draft; a repeated ``request_id`` answers the campaign it created (the same spec) or
        ALREADY_EXISTS (another spec)."""
        fingerprint = spec.fingerprint()
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """INSERT INTO campaigns.campaigns (id, tenant_id, request_id, spec, fingerprint, state, send_time)
                   VALUES (%s, %s, %s, %s, %s, 'draft', %s)
                   ON CONFLICT (tenant_id, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id""",
                (campaign_id, tenant_id, request_id or None, spec.to_json(), fingerprint, spec.send_time))
            if await cur.fetchone() is None:
                cur = await conn.execute(
                    "SELECT id, fingerprint FROM campaigns.campaigns WHERE tenant_id = %s AND request_id = %s",
                    (tenant_id, request_id))
                earlier = await cur.fetchone()
                assert earlier is not None  # the conflict was on this key
                if bytes(earlier[1]) != fingerprint:
                    raise AlreadyExists("request_id was used for another campaign", reason="REQUEST_ID_REUSED",
                                        metadata={"campaign": f"campaigns/{earlier[0]}"})
                campaign_id = earlier[0]
        return await self.get(tenant_id, campaign_id)

    async def get(self, tenant_id: str, campaign_id: str) -> CampaignRecord:
        """The tenant's campaign; NOT_FOUND for an unknown id or another tenant's."""
        async with self.pool.connection() as conn:
            return await self._get(conn, tenant_id, campaign_id)

    async def _get(self, conn: AsyncConnection[Any], tenant_id: str, campaign_id: str, *,
                   lock: bool = False) -> CampaignRecord:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {_COLUMNS} FROM campaigns.campaigns WHERE id = %s AND tenant_id = %s"
                          + (" FOR UPDATE" if lock else ""), (campaign_id, tenant_id))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"campaigns/{campaign_id} not found", reason="CAMPAIGN_NOT_FOUND",
                           metadata={"campaign": f"campaigns/{campaign_id}"})
        return _record(row)

    async def list(self, tenant_id: str, *, state: CampaignState | None, page_size: int,
                   page_token: str) -> tuple[list[CampaignRecord], str]:
        """A page of the tenant's campaigns, newest first, and the token of the next page ("" at the end)."""
        after: tuple[datetime, str] | None = None
        if page_token:
            try:
                created, campaign_id = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (datetime.fromisoformat(created), str(campaign_id))
            except (ValueError, TypeError):
                raise InvalidArgument("page_token is not one this service gave out",
                                      reason="INVALID_PAGE_TOKEN") from None
        clauses: list[str] = ["tenant_id = %s"]
        args: list[Any] = [tenant_id]
        if state is not None:
            clauses.append("state = %s")
            args.append(state.value)
        if after is not None:
            clauses.append("(created_at, id) < (%s, %s)")
            args.extend(after)
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"""SELECT {_COLUMNS} FROM campaigns.campaigns WHERE {' AND '.join(clauses)}
                                  ORDER BY created_at DESC, id DESC LIMIT %s""", (*args, page_size + 1))
            rows = await cur.fetchall()
        records = [_record(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = records[-1]
            token = base64.urlsafe_b64encode(json.dumps([last.created_at.isoformat(), last.id]).encode()).decode()
        return records, token

    async def transition(self, tenant_id: str, campaign_id: str, action: Action, request_id: str, *,
                         reason: PauseReason = PauseReason.BY_CUSTOMER) -> tuple[CampaignRecord, bool]:
        """Apply ``action``; the campaign afterwards and whether this call changed it (False: a repeat of an earlier
        request_id). FAILED_PRECONDITION (the current state in its metadata) when the action does not apply.

        A campaign that becomes paused (or stays paused for another reason) gets its ``campaign_paused`` event
        written to the outbox in the same transaction, and published after the commit."""
        notices: list[CommittedRow] = []
        async with self.pool.connection() as conn, conn.transaction():
            record, changed = await self._transition(conn, tenant_id, campaign_id, action, request_id, reason,
                                                     notices)
        self.on_commit(notices)
        return record, changed

    async def _transition(self, conn: AsyncConnection[Any], tenant_id: str, campaign_id: str, action: Action,
                          request_id: str, reason: PauseReason,
                          notices: MutableSequence[CommittedRow]) -> tuple[CampaignRecord, bool]:
        record = await self._get(conn, tenant_id, campaign_id, lock=True)
        if request_id:
            cur = await conn.execute(
                "SELECT action FROM campaigns.transitions WHERE campaign_id = %s AND request_id = %s",
                (campaign_id, request_id))
            seen = await cur.fetchone()
            if seen is not None:
                if seen[0] != action.value:
                    raise AlreadyExists(f"request_id was used to {seen[0]} this campaign",
                                        reason="REQUEST_ID_REUSED")
                return record, False
        now = datetime.now(UTC)
        send_time = record.spec.send_time
        target = next_state(action, record.state, send_time_ahead=send_time is not None and send_time > now)
        sets = ["state = %s", "updated_at = now()", "pause_reason = %s"]
        args: list[Any] = [target.value, reason.value if target is CampaignState.PAUSED else ""]
        if target is CampaignState.RUNNING:
            sets.append("started_at = coalesce(started_at, now())")
        if action in (Action.RESUME, Action.CANCEL) and record.state in (CampaignState.PAUSED,
                                                                         CampaignState.RUNNING):
            # Senders parked what they had of it while paused: the expander puts those back in the send stream
            # (to be sent, or dropped as cancelled by the senders).
            sets.append("unpark_until = %s")
            args.append(now + timedelta(seconds=self.unpark_window_s))
        # Pausing a campaign paused already for the same reason tells the customer nothing new.
        newly_paused = target is CampaignState.PAUSED and (record.state, record.pause_reason) != (target, reason)
        if newly_paused:
            sets.append("pauses = pauses + 1")
        if target is CampaignState.CANCELLED:
            # Rows not yet expanded are dropped here: they never had a hold or a message.
            sets += ["cancelled = cancelled + (SELECT count(*) FROM campaigns.recipients"
                     " WHERE campaign_id = %s AND row_number >= next_row)",
                     "next_row = last_row + 1", "ended_at = now()"]
            args.append(campaign_id)
        cur = await conn.execute(f"UPDATE campaigns.campaigns SET {', '.join(sets)} WHERE id = %s RETURNING pauses",
                                 (*args, campaign_id))
        updated = await cur.fetchone()
        assert updated is not None  # the row is locked
        if newly_paused:
            notices.append(await queue_event(conn, paused_event(self.topology, tenant_id, campaign_id, reason,
                                                                updated[0], at=now)))
        if request_id:
            await conn.execute(
                "INSERT INTO campaigns.transitions (campaign_id, request_id, action) VALUES (%s, %s, %s)",
                (campaign_id, request_id, action.value))
        return await self._get(conn, tenant_id, campaign_id), True

    async def add_recipients(self, tenant_id: str, campaign_id: str, recipients: Sequence[Recipient], *,
                             invalid: int = 0) -> AddedRecipients:
        """Insert ``recipients`` behind the campaign's last row; addresses already in the campaign are dropped and
        counted. ``invalid`` rows refused before the insert are counted too. FAILED_PRECONDITION once the campaign
        is completed or cancelled."""
        async with self.pool.connection() as conn, conn.transaction():
            record = await self._get(conn, tenant_id, campaign_id, lock=True)
            if record.state not in ADDABLE_STATES:
                raise FailedPrecondition(f"recipients cannot be added to a campaign that is {record.state.value}",
                                         reason="ILLEGAL_TRANSITION", metadata={"state": record.state.value.upper()})
            first = record.last_row + 1
            added = 0
            if recipients:
                await conn.execute(
                    """CREATE TEMP TABLE IF NOT EXISTS incoming_recipients (row_number bigint, email text, name text,
                           variables jsonb) ON COMMIT DELETE ROWS""")
                async with conn.cursor().copy(
                        "COPY incoming_recipients (row_number, email, name, variables) FROM STDIN") as copy:
                    for offset, r in enumerate(recipients):
                        await copy.write_row((first + offset, r.email, r.name,
                                              json.dumps(dict(r.variables), ensure_ascii=False)
                                              if r.variables else None))
                cur = await conn.execute(
                    """INSERT INTO campaigns.recipients (campaign_id, row_number, email, name, variables)
                       SELECT %s, row_number, email, name, variables FROM incoming_recipients ORDER BY row_number
                       ON CONFLICT (campaign_id, lower(email)) DO NOTHING""", (campaign_id,))
                added = cur.rowcount
            await conn.execute(
                """UPDATE campaigns.campaigns SET last_row = last_row + %s, recipients = recipients + %s,
                       duplicates = duplicates + %s, invalid = invalid + %s, updated_at = now() WHERE id = %s""",
                (len(recipients), added, len(recipients) - added, invalid, campaign_id))
        return AddedRecipients(added=added, duplicates=len(recipients) - added)
