"""Settling outcome events: a final ``sent`` commits the whole hold, a final ``failed`` releases it, once per event
id. The settlement worker (:mod:`services.ledger.settlement_worker`) hands each JetStream batch to
:func:`apply_outcomes`, which settles it in one pipelined transaction.

Outcome commits (a campaign's settlement: the bulk of all movements) add to the tenant's ``ledger.commit_totals`` row
instead of its balance row, so settling never holds the row every reserve locks; only releases touch the balance.

Late outcomes
    A ``sent`` event for a hold that already expired (or was released) charges nothing: the returned credits may
    already back other holds, so charging could overdraw. The ledger records it as ``hold_expired`` (or
    ``hold_already_resolved``) and writes an ``unbilled_send`` notification so the loss is visible; a hold TTL
    well above the sender's retry horizon keeps this rare.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import AsyncConnection

from services.ledger.balances import LockedBalance, query_balances, update_balances
from services.ledger.database import Database
from services.ledger.errors import IdempotencyMismatch, InvalidLedgerArgument, LedgerError
from services.ledger.models import (
    ENTRY_ACCOUNTS,
    EntryKind,
    FinalOutcome,
    NotificationKind,
    OutcomeApplied,
    OutcomeEvent,
    OutcomeResult,
)
from services.ledger.notifications import NewNotification, insert_notifications
from services.ledger.validation import MAX_ID_LENGTH, require_id

_OUTCOMES: dict[str, FinalOutcome] = {outcome.value: outcome for outcome in FinalOutcome}
"""An outcome by its value (a member hashes and compares like its value, so it finds itself too)."""


async def apply_outcome(db: Database, event_id: str, hold_id: str, outcome: FinalOutcome | str) -> OutcomeApplied:
    """:meth:`Ledger.apply_outcome <services.ledger.ledger.Ledger.apply_outcome>`."""
    result = (await apply_outcomes(db, [OutcomeEvent(event_id, hold_id, _outcome(outcome))]))[0]
    if isinstance(result, LedgerError):
        raise result
    return result


async def apply_outcomes(db: Database, events: Sequence[OutcomeEvent]) -> list[OutcomeApplied | LedgerError]:
    """:meth:`Ledger.apply_outcomes <services.ledger.ledger.Ledger.apply_outcomes>`."""
    results: list[OutcomeApplied | LedgerError | None] = [None] * len(events)
    valid: list[tuple[int, OutcomeEvent]] = []
    for index, event in enumerate(events):
        # One per email: the usual well-formed event is checked inline and kept as it is.
        event_id, hold_id, outcome = event.event_id, event.hold_id, _OUTCOMES.get(event.outcome)
        if (
            outcome is not None
            and event_id.__class__ is str
            and hold_id.__class__ is str
            and 0 < len(event_id) <= MAX_ID_LENGTH
            and 0 < len(hold_id) <= MAX_ID_LENGTH
        ):
            valid.append((index, event if event.outcome is outcome else OutcomeEvent(event_id, hold_id, outcome)))
            continue
        try:
            require_id("event_id", event_id)
            require_id("hold_id", hold_id)
            valid.append((index, OutcomeEvent(event_id, hold_id, _outcome(event.outcome))))
        except LedgerError as exc:
            results[index] = exc
    if valid:
        applied = await db.transaction(lambda conn: _settle(conn, [event for _, event in valid]), pipeline=True)
        for (index, _), result in zip(valid, applied, strict=True):
            results[index] = result
    return [result for result in results if result is not None]


def _outcome(value: FinalOutcome | str) -> FinalOutcome:
    try:
        return FinalOutcome(value)
    except ValueError:
        raise InvalidLedgerArgument(
            "outcome", f"must be one of {', '.join(FinalOutcome)} (got {value!r})"
        ) from None


# An outcome batch locks only what it decides with (not whole hold rows): id, tenant, amount, state.
_LOCK_OUTCOME_HOLDS = (
    "SELECT hold_id, tenant_id, amount, state FROM ledger.holds WHERE hold_id = ANY(%b) ORDER BY hold_id FOR UPDATE"
)
_SEEN_EVENTS = "SELECT event_id, hold_id, outcome, result FROM ledger.processed_events WHERE event_id = ANY(%b)"
# The rows are locked and known to be held. No "state = 'held'" here: that condition matches the sweeper's partial
# index, and the planner then reads every held hold of the deployment (a bitmap of the index, or a hash of all of
# them) instead of probing the primary key once per event.
_RESOLVE_OUTCOME_HOLDS = """
    UPDATE ledger.holds AS h
    SET state = r.state, committed_amount = CASE WHEN r.state = 'committed' THEN h.amount END,
        resolution_reason = 'event ' || r.event_id, resolved_at = now()
    FROM unnest(%b::text[], %b::text[], %b::text[]) AS r(hold_id, state, event_id)
    WHERE h.hold_id = r.hold_id"""
# The journal rows of an outcome batch, in event order. Runs after the balance update: each row's available_after
# is the balance just written minus what the batch's later releases returned. (A tenant with commits only is not
# locked: its commits leave available as it is, and the row's value when the statement runs is what they record.)
_INSERT_OUTCOME_ENTRIES = """
    INSERT INTO ledger.entries (tenant_id, kind, debit_account, credit_account, amount, hold_id, available_after)
    SELECT e.tenant_id, e.kind, CASE WHEN e.kind = %b THEN %b ELSE %b END, CASE WHEN e.kind = %b THEN %b ELSE %b END,
           e.amount, e.hold_id,
           b.available - COALESCE(sum(CASE WHEN e.kind = %b THEN e.amount ELSE 0 END)
                                  OVER (PARTITION BY e.tenant_id ORDER BY e.position
                                        ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)
    FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[]) WITH ORDINALITY
         AS e(tenant_id, kind, amount, hold_id, position)
    JOIN ledger.balances b USING (tenant_id)
    ORDER BY e.position"""
# Outcome commits add to the tenant's commit total rather than the balance row that reserves lock (migration 002).
_ADD_COMMIT_TOTALS = """
    INSERT INTO ledger.commit_totals AS c (tenant_id, committed)
    SELECT * FROM unnest(%b::text[], %b::bigint[])
    ON CONFLICT (tenant_id) DO UPDATE SET committed = c.committed + excluded.committed, updated_at = now()"""
_INSERT_PROCESSED_EVENTS = """
    INSERT INTO ledger.processed_events (event_id, hold_id, outcome, result)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])"""
_COMMIT_DEBIT, _COMMIT_CREDIT = (a.value for a in ENTRY_ACCOUNTS[EntryKind.COMMIT])
_RELEASE_DEBIT, _RELEASE_CREDIT = (a.value for a in ENTRY_ACCOUNTS[EntryKind.RELEASE])


async def _settle(conn: AsyncConnection, events: Sequence[OutcomeEvent]) -> list[OutcomeApplied | LedgerError]:
    """Decide a batch of (validated) outcome events and send its writes; runs in a pipelined transaction, so the
    two reads share one round trip and the writes go out with the commit.

    On the hot path (one per email): rows stay tuples and states stay strings; no Hold objects are built."""
    # Holds first (in id order, like every other hold-locking batch), then the processed-event lookup: a
    # replica that waited for a hold's lock then sees the event the other replica committed meanwhile (each
    # statement of a read-committed transaction reads a snapshot taken when it starts).
    holds_cursor = await conn.execute(_LOCK_OUTCOME_HOLDS, (sorted({event.hold_id for event in events}),))
    seen_cursor = await conn.execute(_SEEN_EVENTS, ([event.event_id for event in events],))
    holds: dict[str, tuple[str, str, int, str]] = {row[0]: row for row in await holds_cursor.fetchall()}
    seen: dict[str, tuple[str, str, str]] = {row[0]: (row[1], row[2], row[3]) for row in await seen_cursor.fetchall()}
    state_now: dict[str, str] = {}
    results: list[OutcomeApplied | LedgerError] = []
    resolved_holds: list[str] = []
    resolved_states: list[str] = []
    resolved_by: list[str] = []
    entry_tenants: list[str] = []
    entry_kinds: list[str] = []
    entry_amounts: list[int] = []
    entry_holds: list[str] = []
    balances: dict[str, LockedBalance] = {}  # releases: back to available, on the balance row
    committed: dict[str, int] = {}  # commits: held -> spent, on the tenant's commit_totals row
    processed_events: list[str] = []
    processed_holds: list[str] = []
    processed_outcomes: list[str] = []
    processed_results: list[str] = []
    notifications: list[NewNotification] = []
    for event in events:
        event_id, hold_id, outcome = event.event_id, event.hold_id, event.outcome
        first = seen.get(event_id)
        if first is not None:
            if first[0] != hold_id or first[1] != outcome:
                results.append(
                    IdempotencyMismatch("event_id", event_id, f"was {first[1]} of hold {first[0]} before")
                )
            else:
                results.append(OutcomeApplied(event_id, hold_id, outcome, OutcomeResult(first[2]), duplicate=True))
            continue
        row = holds.get(hold_id)
        if row is None:
            result = OutcomeResult.HOLD_NOT_FOUND
        else:
            state = state_now.get(hold_id) or row[3]
            if state == "held":
                tenant_id, amount = row[1], row[2]
                if outcome is FinalOutcome.SENT:
                    result, kind, state_now[hold_id] = OutcomeResult.COMMITTED, "commit", "committed"
                    committed[tenant_id] = committed.get(tenant_id, 0) + amount
                else:
                    result, kind, state_now[hold_id] = OutcomeResult.RELEASED, "release", "released"
                    balance = balances.get(tenant_id)
                    if balance is None:
                        balance = balances[tenant_id] = LockedBalance(0)
                    balance.held_delta -= amount
                    balance.available_delta += amount
                resolved_holds.append(hold_id)
                resolved_states.append(state_now[hold_id])
                resolved_by.append(event_id)
                if amount:
                    entry_tenants.append(tenant_id)
                    entry_kinds.append(kind)
                    entry_amounts.append(amount)
                    entry_holds.append(hold_id)
            elif state == "expired":
                result = OutcomeResult.HOLD_EXPIRED
            else:
                result = OutcomeResult.HOLD_ALREADY_RESOLVED
            if outcome is FinalOutcome.SENT and state in ("expired", "released"):
                notifications.append(
                    NewNotification(
                        row[1],
                        NotificationKind.UNBILLED_SEND,
                        {"hold_id": hold_id, "state": state, "amount": row[2], "event_id": event_id},
                    )
                )
        seen[event_id] = (hold_id, outcome, result)
        processed_events.append(event_id)
        processed_holds.append(hold_id)
        processed_outcomes.append(outcome.value)
        processed_results.append(result.value)
        results.append(OutcomeApplied(event_id, hold_id, outcome, result, duplicate=False))

    # Nothing below waits for a result: the writes reach the server together with the commit. Balance rows (only
    # for releases) and then commit totals are locked in tenant order (like every other batch), after the holds.
    if resolved_holds:
        if balances:
            await query_balances(conn, list(balances), lock=True)
        await conn.execute(_RESOLVE_OUTCOME_HOLDS, (resolved_holds, resolved_states, resolved_by))
        await update_balances(conn, balances)
        if committed:
            tenants = sorted(committed)
            await conn.execute(_ADD_COMMIT_TOTALS, (tenants, [committed[t] for t in tenants]))
        if entry_holds:
            await conn.execute(
                _INSERT_OUTCOME_ENTRIES,
                (
                    EntryKind.COMMIT.value, _COMMIT_DEBIT, _RELEASE_DEBIT,
                    EntryKind.COMMIT.value, _COMMIT_CREDIT, _RELEASE_CREDIT,
                    EntryKind.RELEASE.value,
                    entry_tenants, entry_kinds, entry_amounts, entry_holds,
                ),
            )
    if processed_events:
        await conn.execute(
            _INSERT_PROCESSED_EVENTS, (processed_events, processed_holds, processed_outcomes, processed_results)
        )
    await insert_notifications(conn, notifications)
    return results
