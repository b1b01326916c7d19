"""The ledger's domain: credits that are never lost, never double-spent, and fast on a hot account.

:class:`Ledger` is the front every caller uses (the gRPC servicer, the settlement worker, the notification publisher,
tests and benchmarks); each of its operations is written, with its SQL, in the module of its concept:

==========================================  ==========================================================================
:mod:`services.ledger.reserves`             reserving: holds made in group-committed batches
:mod:`services.ledger.holds`                resolving holds: commit, release, expiry
:mod:`services.ledger.outcomes`             settling outcome events: ``sent`` commits the hold, ``failed`` releases it
:mod:`services.ledger.balances`             top-ups, the low-balance threshold, reading and locking balance rows
:mod:`services.ledger.journal`              the journal of entries: writing them, listing them by page
:mod:`services.ledger.price_book`           the price book: default prices, tenant overrides, quotes
:mod:`services.ledger.pricing`              the arithmetic of pricing a hold
:mod:`services.ledger.notifications`        the notification outbox
:mod:`services.ledger.maintenance`          the expiry sweeper, pruning of processed events, planner statistics
:mod:`services.ledger.database`             running a transaction, retried on deadlocks and racing inserts
:mod:`services.ledger.validation`           argument checks and the bounds that keep amounts in a bigint
==========================================  ==========================================================================

Model
    Every movement of credits is one row of ``ledger.entries``: ``amount`` leaves one account of a tenant and
    enters another (top-up: issued -> available; reserve: available -> held; commit: held -> spent, the unused
    part held -> available; release/expiry: held -> available). Each row balances by construction and the table is
    append-only. ``ledger.balances`` keeps each tenant's available/held/spent in step, updated in the same
    transaction under the row's lock, with ``CHECK (available >= 0)`` as the last line of defence — except the
    commits of outcome events (a campaign's settlement, the bulk of all movements), which add to the tenant's
    ``ledger.commit_totals`` row instead, so settling never holds the row every reserve locks. Held and spent are
    read from the ``ledger.tenant_balances`` view, which combines the two.

Concurrency
    Reserves are grouped into batches, each one pipelined transaction decided optimistically and redone with the
    rows locked when something does not fit (:mod:`services.ledger.reserves`). Resolutions (commit, release,
    outcome events, expiry) lock the hold rows first, then the balance rows; the sweeper takes due holds with
    ``SKIP LOCKED`` so replicas share the work. Every transaction locks balance rows in tenant order, and
    deadlocks and racing inserts of one key are retried (:mod:`services.ledger.database`).

Idempotency
    Reserve is keyed by ``hold_id`` (global), top-up by ``(tenant_id, request_id)``, commit by the hold (a hold
    resolves once; the commit's ``request_id`` tells a retry from a conflicting second commit), outcome events
    by ``event_id``. A repeat returns the first result; the same key with different arguments raises
    :class:`~services.ledger.errors.IdempotencyMismatch`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from libs.common.batching import BatchingOptions
from services.ledger import balances, holds, journal, maintenance, notifications, outcomes, price_book
from services.ledger.database import Database
from services.ledger.errors import LedgerError
from services.ledger.models import (
    DEFAULT_PRICE_BOOK,
    Balance,
    FinalOutcome,
    Hold,
    MessageClass,
    Notification,
    OutcomeApplied,
    OutcomeEvent,
    PriceBook,
    PriceOverrides,
    ReserveRequest,
    Transaction,
)
from services.ledger.reserves import Reserves


@dataclass(frozen=True)
class LedgerOptions:
    """Tuning of one :class:`Ledger` (the service's config builds it from settings)."""

    default_hold_ttl_s: float = 86_400.0
    """TTL of a hold when the caller gives none: longer than any send's retry horizon, so late ``sent`` events
    for expired holds stay rare."""
    max_hold_ttl_s: float = 30 * 86_400.0
    """Longest TTL a caller may ask for."""
    reserve_batching: BatchingOptions = field(default_factory=BatchingOptions)
    """How concurrent reserves are grouped into transactions."""
    reserve_synchronous_commit: bool = True
    """False: a reserve's commit returns before its WAL is flushed (see ``LedgerSettings``: safe only when ingest's
    database shares the ledger's Postgres server)."""
    max_transaction_attempts: int = 5
    """Attempts of one transaction that hits a deadlock, serialization failure or racing duplicate insert."""
    default_page_size: int = 50
    max_page_size: int = 1000


class Ledger:
    """Credit accounts, holds and the journal of one deployment; every method is safe to call concurrently and
    from several replicas at once."""

    def __init__(self, pool: AsyncConnectionPool, options: LedgerOptions | None = None) -> None:
        self._options = options or LedgerOptions()
        self._db = Database(pool, self._options.max_transaction_attempts)
        self._reserves = Reserves(
            self._db,
            default_hold_ttl_s=self._options.default_hold_ttl_s,
            max_hold_ttl_s=self._options.max_hold_ttl_s,
            batching=self._options.reserve_batching,
            synchronous_commit=self._options.reserve_synchronous_commit,
        )

    async def close(self) -> None:
        """Finish the reserves already queued and stop; the pool stays open (it belongs to the caller)."""
        await self._reserves.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ balances and top-ups

    async def top_up(self, tenant_id: str, amount: int, request_id: str) -> Balance:
        """Add ``amount`` credits to the tenant's available balance, once per ``request_id``; re-arms the
        low-balance notification when the balance ends at or above the threshold."""
        return await balances.top_up(self._db, tenant_id, amount, request_id)

    async def get_balance(self, tenant_id: str) -> Balance:
        """The tenant's balance (all zero for a tenant the ledger has never seen)."""
        return await balances.get_balance(self._db, tenant_id)

    async def set_low_balance_threshold(self, tenant_id: str, threshold: int | None) -> Balance:
        """Notify once each time available credits fall below ``threshold`` (``None`` turns it off). A new
        threshold that the balance is already below notifies at once."""
        return await balances.set_low_balance_threshold(self._db, tenant_id, threshold)

    # ------------------------------------------------------------------ reserve

    async def reserve(
        self,
        tenant_id: str,
        hold_id: str,
        message_class: MessageClass | str,
        emails: int = 1,
        attachment_bytes: int = 0,
        ttl_s: float | None = None,
    ) -> Hold:
        """Hold the price of ``emails`` emails of ``message_class`` (each with ``attachment_bytes`` of
        attachments) from the tenant's available credits, priced now from the price book.

        Repeating the call with the same ``hold_id`` and arguments returns the same hold, whatever became of it.
        Raises :class:`~services.ledger.errors.InsufficientCredits` (with the shortfall) when the available credits
        do not cover it.
        """
        return await self._reserves.reserve(tenant_id, hold_id, message_class, emails, attachment_bytes, ttl_s)

    async def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[Hold | LedgerError]:
        """Reserve many holds at once (the ingest batch entry point): each request gets its own hold or error,
        in order; one refused request never fails the others."""
        return await self._reserves.reserve_many(requests)

    # ------------------------------------------------------------------ commit, release, outcomes, expiry

    async def get_hold(self, hold_id: str) -> Hold:
        """The hold named ``hold_id``; raises :class:`~services.ledger.errors.HoldNotFound`."""
        return await holds.get_hold(self._db, hold_id)

    async def commit(self, hold_id: str, amount: int | None = None, request_id: str | None = None) -> Hold:
        """Spend ``amount`` of the hold (all of it when ``None``); the unused part returns to available.

        A hold resolves once: repeating the commit (same amount, and same ``request_id`` if one was given)
        returns the committed hold; a different amount under the same ``request_id`` raises
        :class:`~services.ledger.errors.IdempotencyMismatch`; any other commit or a released/expired hold raises
        :class:`~services.ledger.errors.HoldAlreadyResolved`.
        """
        return await holds.commit(self._db, hold_id, amount, request_id)

    async def release(self, hold_id: str, reason: str = "") -> Hold:
        """Return the hold's credits to available. Releasing a released or expired hold returns it unchanged
        (its credits are back already); releasing a committed hold raises
        :class:`~services.ledger.errors.HoldAlreadyResolved`."""
        return await holds.release(self._db, hold_id, reason)

    async def apply_outcome(self, event_id: str, hold_id: str, outcome: FinalOutcome | str) -> OutcomeApplied:
        """Apply one outcome event: ``sent`` commits the whole hold, ``failed`` releases it. The same event any
        number of times changes nothing after the first; see :class:`~services.ledger.models.OutcomeResult` for
        every case."""
        return await outcomes.apply_outcome(self._db, event_id, hold_id, outcome)

    async def apply_outcomes(self, events: Sequence[OutcomeEvent]) -> list[OutcomeApplied | LedgerError]:
        """Apply a batch of outcome events (e.g. one JetStream fetch) in one transaction; per-event results in
        order. A malformed event or a reused event id gets its own error and never fails the others."""
        return await outcomes.apply_outcomes(self._db, events)

    async def expire_holds(self, now: datetime | None = None, limit: int = 1000) -> int:
        """One sweeper step: expire up to ``limit`` holds whose deadline is at or before ``now`` (the database's
        clock when ``None``) and return their credits; returns how many expired. Safe to run in several replicas
        at once: each takes holds no other sweeper has locked."""
        return await holds.expire_holds(self._db, now, limit)

    # ------------------------------------------------------------------ maintenance

    async def prune_processed_events(self, older_than_s: float, limit: int = 10_000) -> int:
        """Forget up to ``limit`` applied outcome events processed more than ``older_than_s`` ago; returns how many
        (safe past the EVENTS stream's retention; see :func:`services.ledger.maintenance.prune_processed_events`)."""
        return await maintenance.prune_processed_events(self._db, older_than_s, limit)

    async def refresh_planner_statistics(self) -> list[str]:
        """ANALYZE the ledger's tables whose statistics are stale, when the server does not run autovacuum; returns
        the tables analyzed (why: :func:`services.ledger.maintenance.refresh_planner_statistics`)."""
        return await maintenance.refresh_planner_statistics(self._db)

    async def run_expiry_sweeper(self, stop: asyncio.Event, interval_s: float = 1.0, limit: int = 1000,
                                 statistics_every_s: float = 5.0, processed_event_retention_s: float = 8 * 86_400,
                                 prune_every_s: float = 60.0) -> None:
        """Expire due holds until ``stop`` is set: back to back while a step finds a full batch, else every
        ``interval_s``; every ``statistics_every_s`` also refresh stale planner statistics, and every
        ``prune_every_s`` forget applied outcome events older than ``processed_event_retention_s``. A failing step
        is logged and retried at the next interval."""
        await maintenance.run_expiry_sweeper(
            self._db, stop, interval_s=interval_s, limit=limit, statistics_every_s=statistics_every_s,
            processed_event_retention_s=processed_event_retention_s, prune_every_s=prune_every_s,
        )

    # ------------------------------------------------------------------ journal

    async def list_transactions(
        self, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Transaction], str]:
        """The tenant's journal entries, newest first, and the token of the next page ("" on the last page).
        ``page_size`` 0 means the default; larger than the maximum is capped (AIP-158)."""
        return await journal.list_transactions(
            self._db, tenant_id, page_size, page_token,
            default_page_size=self._options.default_page_size, max_page_size=self._options.max_page_size,
        )

    # ------------------------------------------------------------------ price book

    async def get_price_book(self, tenant_id: str = DEFAULT_PRICE_BOOK) -> PriceBook:
        """The prices that apply to ``tenant_id`` (its overrides over the defaults), or the platform defaults."""
        return await price_book.get_price_book(self._db, tenant_id)

    async def set_default_prices(self, book: PriceBook) -> PriceBook:
        """Replace the platform's default prices (``book.tenant_id`` is ignored)."""
        return await price_book.set_default_prices(self._db, book)

    async def set_price_overrides(self, tenant_id: str, overrides: PriceOverrides,
                                  fields: Collection[str] | None = None) -> PriceBook:
        """Replace the tenant's own prices named in ``fields`` (every price by default; ``None`` inherits the
        default, the prices not named keep their override); returns the effective book. Holds made before keep the
        price they were made with."""
        return await price_book.set_price_overrides(self._db, tenant_id, overrides, fields)

    async def quote(
        self, tenant_id: str, message_class: MessageClass | str, emails: int = 1, attachment_bytes: int = 0
    ) -> int:
        """What a reserve with these arguments would hold right now."""
        return await price_book.quote(self._db, tenant_id, message_class, emails, attachment_bytes)

    # ------------------------------------------------------------------ notifications outbox

    async def pending_notifications(self, limit: int = 100) -> list[Notification]:
        """Outbox rows not yet marked published, oldest first (the publisher's input)."""
        return await notifications.pending_notifications(self._db, limit)

    async def mark_notifications_published(self, notification_ids: Iterable[int]) -> None:
        """Record that these outbox rows were published, so they are not handed out again."""
        await notifications.mark_notifications_published(self._db, notification_ids)
