"""The ledger's domain: credits that are never lost, never double-spent, and fast on a hot account.

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
    Reserves go through a :class:`~services.ledger.batcher.GroupCommitter`: concurrent calls coalesce into
    batches (sharded by tenant, so batches in flight at once lock disjoint balance rows), and each batch is one
    transaction made of a few array statements sent in pipeline mode. A batch is decided optimistically against
    balances read without a lock; its writes and commit then go to the server together, taking the row locks
    only there (in tenant order), so no lock waits on this process. ``CHECK (available >= 0)`` catches a
    concurrent spend; then, and whenever some request does not fit, the batch is redone with the rows locked
    first, so a refusal always comes from an authoritative balance. Several replicas stay correct because every
    change is applied under the row lock and checked by the database. Resolutions (commit, release, outcome
    events, expiry) lock the hold rows first, then the balance rows; the sweeper takes due holds with
    ``SKIP LOCKED`` so replicas share the work. Deadlocks and racing inserts of one key are retried.

Idempotency
    Reserve is keyed by ``hold_id`` (global), top-up by ``(tenant_id, request_id)``, commit by the hold (a hold
    resolves once; the commit's ``request_id`` tells a retry from a conflicting second commit), outcome events
    by ``event_id``. A repeat returns the first result; the same key with different arguments raises
    :class:`~services.ledger.errors.IdempotencyMismatch`.

Late outcomes
    A ``sent`` event for a hold that already expired (or was released) charges nothing: the returned credits may
    already back other holds, so charging could overdraw. The ledger records it as ``hold_expired`` and writes an
    ``unbilled_send`` notification so the loss is visible; a hold TTL well above the sender's retry horizon keeps
    this rare.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.stopping import pause_unless_stopped
from services.ledger.errors import (
    HoldAlreadyResolved,
    HoldNotFound,
    IdempotencyMismatch,
    InsufficientCredits,
    InvalidAmount,
    InvalidLedgerArgument,
    InvalidPageToken,
    LedgerError,
)
from services.ledger.models import (
    ATTACHMENT_BILLING_UNIT_BYTES,
    DEFAULT_PRICE_BOOK,
    ENTRY_ACCOUNTS,
    Account,
    Balance,
    EntryKind,
    Hold,
    HoldState,
    MessageClass,
    Notification,
    NotificationKind,
    Outcome,
    OutcomeApplied,
    OutcomeEvent,
    OutcomeResult,
    Price,
    PriceBook,
    PriceOverrides,
    ReserveRequest,
    Transaction,
)
from services.ledger.pricing import hold_amount, unit_price

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ID_LENGTH = 200
# Bounds that keep every amount the ledger computes or stores inside a Postgres bigint.
MAX_EMAILS_PER_HOLD = 10_000_000
MAX_ATTACHMENT_BYTES = 2**40
MAX_UNIT_PRICE = 10**9
MAX_TOP_UP = 10**15

_HOLD_COLUMNS = (
    "hold_id, tenant_id, message_class, emails, attachment_bytes, price_per_email, price_per_attachment_mb, "
    "amount, state, committed_amount, created_at, expires_at, resolved_at, resolution_request_id, "
    "resolution_reason"
)
_ENTRY_COLUMNS = (
    "entry_id, tenant_id, kind, debit_account, credit_account, amount, hold_id, request_id, available_after, created_at"
)


# A reserve batch's holds: the distinct shapes (1-based by position) and, per hold, its id and shape number.
_INSERT_HOLDS = """
    WITH shape AS (
        SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[],
                             %b::bigint[], %b::timestamptz[]) WITH ORDINALITY
            AS s(tenant_id, message_class, emails, attachment_bytes, per_email, per_mb, amount, expires_at, shape))
    INSERT INTO ledger.holds (hold_id, tenant_id, message_class, emails, attachment_bytes, price_per_email,
                              price_per_attachment_mb, amount, expires_at)
    SELECT a.hold_id, s.tenant_id, s.message_class, s.emails, s.attachment_bytes, s.per_email, s.per_mb, s.amount,
           s.expires_at
    FROM unnest(%b::text[], %b::bigint[]) AS a(hold_id, shape) JOIN shape s USING (shape)
    ORDER BY a.hold_id"""

# The journal rows of a reserve batch, in arrival order. Runs after the balance update: each row's available_after
# is the balance just written plus what this batch holds after that row.
_RESERVE_ENTRIES_OF_ACCEPTED = """
    INSERT INTO ledger.entries (tenant_id, kind, debit_account, credit_account, amount, hold_id, available_after)
    SELECT a.tenant_id, %b, %b, %b, a.amount, a.hold_id,
           b.available + COALESCE(sum(a.amount) OVER (PARTITION BY a.tenant_id ORDER BY a.position
                                                      ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)
    FROM accepted a JOIN ledger.balances b USING (tenant_id)
    ORDER BY a.position"""
_INSERT_RESERVE_ENTRIES = """
    WITH shape AS (
        SELECT * FROM unnest(%b::text[], %b::bigint[]) WITH ORDINALITY AS s(tenant_id, amount, shape)),
    accepted AS (
        SELECT a.hold_id, a.position, s.tenant_id, s.amount
        FROM unnest(%b::text[], %b::bigint[]) WITH ORDINALITY AS a(hold_id, shape, position) JOIN shape s USING (shape)
        WHERE s.amount > 0)""" + _RESERVE_ENTRIES_OF_ACCEPTED


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


ONE_ROUND_TRIP_MAX_BATCH = 32
"""Largest reserve batch sent in one round trip (``_reserve_in_one_round_trip``). A small batch — an OTP, a trickle
of single sends — waits mostly for round trips; a large one costs the server more when it prices the holds and
reads their amounts back than the round trip it saves (hot-tenant batches of 1,000: ≈ 15 % fewer reserves/s)."""

_OUTCOMES: dict[str, Outcome] = {outcome.value: outcome for outcome in Outcome}
"""An outcome by its value (a member hashes and compares like its value, so it finds itself too)."""

_RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    # Two transactions inserting the same new hold id or outcome event id race on its primary key; the retry
    # finds the winner's row and answers from it.
    psycopg.errors.UniqueViolation,
)


@dataclass
class _LockedBalance:
    """A balance row as read in a batch's transaction, and the changes the batch makes to it."""

    available: int
    held_delta: int = 0
    spent_delta: int = 0
    available_delta: int = 0

    @property
    def changed(self) -> bool:
        """Whether the row needs writing back."""
        return bool(self.available_delta or self.held_delta or self.spent_delta)


@dataclass(frozen=True)
class _NewEntry:
    tenant_id: str
    kind: EntryKind
    amount: int
    hold_id: str | None
    request_id: str | None
    available_after: int


class _NeedsLock(Exception):
    """An optimistic reserve batch found a request that does not fit: it is redone with the rows locked."""


@dataclass(frozen=True)
class _NewNotification:
    tenant_id: str
    kind: NotificationKind
    payload: dict[str, Any]


@dataclass(frozen=True)
class _Resolution:
    """A held hold to move to a final state."""

    hold: Hold
    state: HoldState
    committed_amount: int | None = None
    request_id: str | None = None
    reason: str | None = None


class Ledger:
    """Credit accounts, holds and the journal of one deployment; every method is safe to call concurrently and
    from several replicas at once."""

    def __init__(self, pool: AsyncConnectionPool, options: LedgerOptions | None = None) -> None:
        self._pool = pool
        self._options = options or LedgerOptions()
        if self._options.max_transaction_attempts < 1:
            raise ValueError("max_transaction_attempts must be at least 1")
        # Sharded by tenant: concurrent batches lock disjoint balance rows, and one tenant's reserves always
        # coalesce into the same batches.
        self._balance_rows: set[str] = set()
        """Tenants whose balance row exists (rows are never deleted): their reserves may skip reading it."""
        self._reserves: GroupCommitter[ReserveRequest, Hold] = GroupCommitter(
            self._reserve_batch, self._options.reserve_batching, shard_key=lambda request: request.tenant_id,
            # An OTP's hold never waits behind a campaign's reserves queued in this process.
            urgent=lambda request: request.message_class is MessageClass.OTP, name="ledger-reserve",
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
        _require_id("tenant_id", tenant_id)
        _require_id("request_id", request_id)
        _require_positive("amount", amount, MAX_TOP_UP)

        async def work(conn: AsyncConnection) -> Balance:
            await conn.execute(
                "INSERT INTO ledger.balances (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING",
                (tenant_id,),
            )
            balance, armed = await self._lock_balance(conn, tenant_id)
            cur = await conn.execute(
                "SELECT amount FROM ledger.entries WHERE tenant_id = %s AND request_id = %s AND kind = 'top_up'",
                (tenant_id, request_id),
            )
            previous = await cur.fetchone()
            if previous is not None:
                if previous[0] != amount:
                    raise IdempotencyMismatch(
                        "request_id", request_id, f"top-up of {previous[0]} before, of {amount} now"
                    )
                return balance
            available = balance.available + amount
            threshold = balance.low_balance_threshold
            rearm = armed or threshold is None or available >= threshold
            await _insert_entries(conn, [_NewEntry(tenant_id, EntryKind.TOP_UP, amount, None, request_id, available)])
            await conn.execute(
                "UPDATE ledger.balances SET available = %s, low_balance_armed = %s, updated_at = now() "
                "WHERE tenant_id = %s",
                (available, rearm, tenant_id),
            )
            return Balance(tenant_id, available, balance.held, balance.spent, threshold)

        return await self._transaction(work)

    async def get_balance(self, tenant_id: str) -> Balance:
        """The tenant's balance (all zero for a tenant the ledger has never seen)."""
        _require_id("tenant_id", tenant_id)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT available, held, spent, low_balance_threshold FROM ledger.tenant_balances WHERE tenant_id = %s",
                (tenant_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return Balance(tenant_id, 0, 0, 0)
        return Balance(tenant_id, row[0], row[1], row[2], row[3])

    async def set_low_balance_threshold(self, tenant_id: str, threshold: int | None) -> Balance:
        """Notify once each time available credits fall below ``threshold`` (``None`` turns it off). A new
        threshold that the balance is already below notifies at once."""
        _require_id("tenant_id", tenant_id)
        if threshold is not None and threshold < 0:
            raise InvalidAmount("threshold", threshold, "must not be negative")

        async def work(conn: AsyncConnection) -> Balance:
            await conn.execute(
                "INSERT INTO ledger.balances (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING",
                (tenant_id,),
            )
            balance, armed = await self._lock_balance(conn, tenant_id)
            if threshold == balance.low_balance_threshold:
                return balance
            armed = True
            if threshold is not None and balance.available < threshold:
                armed = False
                await _insert_notifications(conn, [_low_balance(tenant_id, threshold, balance.available)])
            await conn.execute(
                "UPDATE ledger.balances SET low_balance_threshold = %s, low_balance_armed = %s, "
                "updated_at = now() WHERE tenant_id = %s",
                (threshold, armed, tenant_id),
            )
            return Balance(tenant_id, balance.available, balance.held, balance.spent, threshold)

        return await self._transaction(work)

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
        Raises :class:`InsufficientCredits` (with the shortfall) when the available credits do not cover it.
        """
        request = self._validated(tenant_id, hold_id, message_class, emails, attachment_bytes, ttl_s)
        return await self._reserves.submit(request)

    async def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[Hold | LedgerError]:
        """Reserve many holds at once (the ingest batch entry point): each request gets its own hold or error,
        in order; one refused request never fails the others."""
        results: list[Hold | LedgerError | None] = [None] * len(requests)
        valid: list[tuple[int, ReserveRequest]] = []
        for index, request in enumerate(requests):
            try:
                valid.append(
                    (
                        index,
                        self._validated(
                            request.tenant_id,
                            request.hold_id,
                            request.message_class,
                            request.emails,
                            request.attachment_bytes,
                            request.ttl_s,
                        ),
                    )
                )
            except LedgerError as exc:
                results[index] = exc
        # One lane for the whole call, so its requests are decided in order (a hold id repeated in it is held once):
        # the urgent one when the call is all OTPs (ingest sends its OTPs' holds in calls of their own).
        urgent = all(request.message_class is MessageClass.OTP for _, request in valid)
        outcomes = await self._reserves.submit_many([request for _, request in valid], urgent=urgent)
        for (index, _), outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, Hold | LedgerError):
                results[index] = outcome
            else:
                raise outcome  # not a per-request refusal: the database or the ledger itself failed
        return [result for result in results if result is not None]

    def _validated(
        self,
        tenant_id: str,
        hold_id: str,
        message_class: MessageClass | str,
        emails: int,
        attachment_bytes: int,
        ttl_s: float | None,
    ) -> ReserveRequest:
        """The request with its class as the enum and its TTL resolved; raises on a malformed field. (On the hot
        path: kept to a few cheap checks.)"""
        _require_id("tenant_id", tenant_id)
        _require_id("hold_id", hold_id)
        checked_class = message_class if isinstance(message_class, MessageClass) else _message_class(message_class)
        _require_positive("emails", emails, MAX_EMAILS_PER_HOLD)
        if attachment_bytes.__class__ is not int or not 0 <= attachment_bytes <= MAX_ATTACHMENT_BYTES:
            raise InvalidAmount(
                "attachment_bytes", attachment_bytes, f"must be an integer in [0, {MAX_ATTACHMENT_BYTES}]"
            )
        if ttl_s is None:
            ttl_s = self._options.default_hold_ttl_s
        elif not 0 < ttl_s <= self._options.max_hold_ttl_s:
            raise InvalidLedgerArgument(
                "ttl_s", f"must be in (0, {self._options.max_hold_ttl_s}] seconds (got {ttl_s})"
            )
        return ReserveRequest(tenant_id, hold_id, checked_class, emails, attachment_bytes, ttl_s)

    async def _reserve_batch(self, requests: Sequence[ReserveRequest]) -> list[Hold | LedgerError]:
        """Decide and write one batch of reserves.

        First optimistically: the balances are read without a lock and, if every request fits, the writes go to
        the server in one pipeline that takes the row locks (in tenant order), applies the changes and commits,
        so no lock is held while this process computes or waits for its event loop. The balance CHECK refuses an
        overdraft if a concurrent transaction spent the credits meanwhile. When some request does not fit, or the
        CHECK fired, the batch is redone pessimistically: locks first, then the decision against the locked rows.
        Refusals therefore always come from an authoritative balance. Before all that, a small batch of new hold
        ids for tenants seen before tries ``_reserve_in_one_round_trip``, which reads nothing.
        """
        def reading(locked: bool) -> Awaitable[list[Hold | LedgerError]]:
            return self._transaction(lambda conn: self._reserve_in_transaction(conn, requests, locked=locked),
                                     pipeline=True, synchronous_commit=self._options.reserve_synchronous_commit)

        if (len(requests) <= ONE_ROUND_TRIP_MAX_BATCH and len({r.hold_id for r in requests}) == len(requests)
                and self._balance_rows.issuperset(r.tenant_id for r in requests)):
            try:
                return await self._reserve_in_one_round_trip(requests)
            except psycopg.errors.CheckViolation as exc:  # some hold did not fit: decide each against locked rows
                if exc.diag.constraint_name != "balances_available_check":
                    raise
                return await reading(locked=True)
            except _RETRYABLE:  # a hold id held already (a retry), or a race: the reading path sorts it out
                pass
        try:
            return await reading(locked=False)
        except psycopg.errors.CheckViolation as exc:
            if exc.diag.constraint_name != "balances_available_check":
                raise
        except _NeedsLock:
            pass
        return await reading(locked=True)

    async def _reserve_in_one_round_trip(self, requests: Sequence[ReserveRequest]) -> list[Hold | LedgerError]:
        """The common case in one round trip: new hold ids, tenants whose balance rows exist, and credits enough for
        all. Nothing is read first: the server prices the holds from the books, the balance update takes their
        amounts, and every statement goes out with the commit. A hold id that exists already raises
        UniqueViolation, a hold that does not fit raises the balance CHECK; either rolls the batch back whole and
        the caller decides it again the reading way."""
        shapes: dict[tuple[str, MessageClass, int, int, float], int] = {}
        shape_numbers = []
        for request in requests:
            key = (request.tenant_id, request.message_class, request.emails, request.attachment_bytes,
                   float(request.ttl_s or 0))  # resolved by _validated: never None here
            shape_numbers.append(shapes.setdefault(key, len(shapes) + 1))
        hold_ids = [request.hold_id for request in requests]
        tenants = sorted({request.tenant_id for request in requests})
        debit, credit = ENTRY_ACCOUNTS[EntryKind.RESERVE]
        async with self._pool.connection() as conn:
            async with conn.pipeline(), conn.transaction():
                if not self._options.reserve_synchronous_commit:
                    await conn.execute("SET LOCAL synchronous_commit = off")
                inserted = await conn.execute(_INSERT_PRICED_HOLDS, (
                    [key[0] for key in shapes], [key[1].value for key in shapes], [key[2] for key in shapes],
                    [key[3] for key in shapes], [key[4] for key in shapes], ATTACHMENT_BILLING_UNIT_BYTES,
                    ATTACHMENT_BILLING_UNIT_BYTES, hold_ids, shape_numbers))
                await _query_balances(conn, tenants, lock=True)
                await conn.execute(_HOLD_FROM_BALANCES, (hold_ids,))
                await conn.execute(_INSERT_RESERVE_ENTRIES_OF_HOLDS,
                                   (hold_ids, EntryKind.RESERVE.value, debit.value, credit.value))
                await _notify_low_balance_crossings(conn, tenants)
            rows = {row[0]: row for row in await inserted.fetchall()}
        if len(rows) != len(requests):
            raise AssertionError("the default price book is missing")  # every book falls back to it
        holds: list[Hold | LedgerError] = []
        for request in requests:
            _, per_email, per_mb, amount, created_at, expires_at = rows[request.hold_id]
            holds.append(Hold(
                hold_id=request.hold_id, tenant_id=request.tenant_id, message_class=request.message_class,
                emails=request.emails, attachment_bytes=request.attachment_bytes,
                price=Price(per_email=per_email, per_attachment_mb=per_mb), amount=amount, state=HoldState.HELD,
                committed_amount=None, created_at=created_at, expires_at=expires_at, resolved_at=None))
        return holds

    async def _reserve_in_transaction(
        self, conn: AsyncConnection, requests: Sequence[ReserveRequest], *, locked: bool
    ) -> list[Hold | LedgerError]:
        results: list[Hold | LedgerError | None] = [None] * len(requests)
        first_by_hold_id: dict[str, int] = {}
        for index, request in enumerate(requests):
            first_by_hold_id.setdefault(request.hold_id, index)
        tenants = sorted({request.tenant_id for request in requests})

        # Earlier holds (retries), prices and (optimistically) balances in one round trip: in pipeline mode the
        # three queries go out before the first result is awaited.
        existing_cursor = await conn.execute(
            f"SELECT {_HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = ANY(%b)", (list(first_by_hold_id),)
        )
        prices_cursor = await _query_price_books(conn, tenants)
        balances_cursor = None if locked else await _query_balances(conn, tenants, lock=False)
        existing = {hold.hold_id: hold for hold in map(_hold_from_row, await existing_cursor.fetchall())}
        books, now = await _fetch_price_books(prices_cursor)

        new: list[int] = []
        for index in first_by_hold_id.values():
            request = requests[index]
            hold = existing.get(request.hold_id)
            if hold is None:
                new.append(index)
            elif _same_reserve(hold, request):
                results[index] = hold
            else:
                results[index] = _reserve_mismatch(request, hold)

        if new:
            new_tenants = sorted({requests[index].tenant_id for index in new})
            if balances_cursor is None:
                balances = await _fetch_balances(await _query_balances(conn, new_tenants, lock=True))
            else:
                balances = await _fetch_balances(balances_cursor)
            self._balance_rows.update(balances)
            await self._reserve_new(conn, requests, new, results, books, now, balances, locked=locked)

        for index, request in enumerate(requests):
            if results[index] is not None:
                continue
            # A hold id repeated inside this batch: same answer as its first occurrence, if it asked the same.
            first = requests[first_by_hold_id[request.hold_id]]
            first_result = results[first_by_hold_id[request.hold_id]]
            if _same_request(first, request) and first_result is not None:
                results[index] = first_result
            else:
                results[index] = IdempotencyMismatch(
                    "hold_id", request.hold_id, "the same batch holds it twice with different arguments"
                )
        return [result for result in results if result is not None]

    async def _reserve_new(
        self,
        conn: AsyncConnection,
        requests: Sequence[ReserveRequest],
        new: list[int],
        results: list[Hold | LedgerError | None],
        books: dict[str, PriceBook],
        now: datetime,
        balances: dict[str, _LockedBalance],
        *,
        locked: bool,
    ) -> None:
        # Requests that hold the same thing (tenant, class, size, TTL) share one "shape": its price, amount and
        # expiry are computed once, and sent once if a hold of it is made. A batch usually has a handful of shapes,
        # so the statements carry two values per hold instead of ten.
        templates: dict[tuple[str, MessageClass, int, int, float], Hold] = {}
        accepted: list[tuple[ReserveRequest, Hold]] = []
        for index in new:  # arrival order: the answers one-by-one reserves would get
            request = requests[index]
            tenant_id = request.tenant_id
            ttl_s = float(request.ttl_s or 0)  # resolved by _validated: never None here
            key = (tenant_id, request.message_class, request.emails, request.attachment_bytes, ttl_s)
            template = templates.get(key)
            if template is None:
                price = unit_price(books[tenant_id], request.message_class)
                template = templates[key] = Hold(
                    hold_id="",
                    tenant_id=tenant_id,
                    message_class=request.message_class,
                    emails=request.emails,
                    attachment_bytes=request.attachment_bytes,
                    price=price,
                    amount=hold_amount(price, request.emails, request.attachment_bytes),
                    state=HoldState.HELD,
                    committed_amount=None,
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_s),
                    resolved_at=None,
                )
            amount = template.amount
            balance = balances.get(tenant_id)
            available = balance.available if balance is not None else 0
            if amount > available:
                if not locked:
                    raise _NeedsLock
                results[index] = InsufficientCredits(tenant_id, amount, available)
                continue
            if balance is not None and amount > 0:
                balance.available -= amount
                balance.available_delta -= amount
                balance.held_delta += amount
            accepted.append((request, template))
        if not accepted:
            return

        # From here on nothing waits for a result: the statements and the commit reach the server together. The
        # holds go first, before the balance rows are locked (optimistic case), so the lock covers only the balance
        # update, the journal rows and the commit. Holds go in hold id order, so two batches racing on the same new
        # ids wait for each other rather than deadlock; the loser fails with a unique violation, is retried, and
        # then finds the winner's hold. Only the shapes of holds made are sent, numbered from 1.
        shapes: dict[int, tuple[int, Hold]] = {}  # id(template) -> (number, template)
        for _, template in accepted:
            if id(template) not in shapes:
                shapes[id(template)] = (len(shapes) + 1, template)
        made = [template for _, template in shapes.values()]
        hold_ids = [request.hold_id for request, _ in accepted]
        shape_numbers = [shapes[id(template)][0] for _, template in accepted]
        shape_tenants = [template.tenant_id for template in made]
        shape_amounts = [template.amount for template in made]
        await conn.execute(
            _INSERT_HOLDS,
            (
                shape_tenants,
                [template.message_class.value for template in made],
                [template.emails for template in made],
                [template.attachment_bytes for template in made],
                [template.price.per_email for template in made],
                [template.price.per_attachment_mb for template in made],
                shape_amounts,
                [template.expires_at for template in made],
                hold_ids,
                shape_numbers,
            ),
        )
        changed = sorted(tenant for tenant, b in balances.items() if b.changed)
        if changed and not locked:
            await _query_balances(conn, changed, lock=True)
        await _update_balances(conn, balances)
        debit, credit = ENTRY_ACCOUNTS[EntryKind.RESERVE]
        await conn.execute(
            _INSERT_RESERVE_ENTRIES,
            (
                shape_tenants,
                shape_amounts,
                hold_ids,
                shape_numbers,
                EntryKind.RESERVE.value,
                debit.value,
                credit.value,
            ),
        )
        await _notify_low_balance_crossings(conn, changed)

        holds = {request.hold_id: _copy_with_hold_id(template, request.hold_id) for request, template in accepted}
        for index in new:
            if results[index] is None:
                results[index] = holds[requests[index].hold_id]

    # ------------------------------------------------------------------ commit, release, outcomes, expiry

    async def get_hold(self, hold_id: str) -> Hold:
        """The hold named ``hold_id``; raises :class:`HoldNotFound`."""
        _require_id("hold_id", hold_id)
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = %s", (hold_id,))
            row = await cur.fetchone()
        if row is None:
            raise HoldNotFound(hold_id)
        return _hold_from_row(row)

    async def commit(self, hold_id: str, amount: int | None = None, request_id: str | None = None) -> Hold:
        """Spend ``amount`` of the hold (all of it when ``None``); the unused part returns to available.

        A hold resolves once: repeating the commit (same amount, and same ``request_id`` if one was given)
        returns the committed hold; a different amount under the same ``request_id`` raises
        :class:`IdempotencyMismatch`; any other commit or a released/expired hold raises
        :class:`HoldAlreadyResolved`.
        """
        _require_id("hold_id", hold_id)
        if request_id is not None:
            _require_id("request_id", request_id)
        if amount is not None and amount < 0:
            raise InvalidAmount("amount", amount, "must not be negative")

        async def work(conn: AsyncConnection) -> Hold:
            hold = await _lock_hold(conn, hold_id)
            spend = hold.amount if amount is None else amount
            if hold.state is HoldState.HELD:
                if spend > hold.amount:
                    raise InvalidAmount("amount", spend, f"must not exceed the hold's {hold.amount} credits")
                resolved = await _resolve(conn, [_Resolution(hold, HoldState.COMMITTED, spend, request_id)])
                return resolved[0]
            if hold.state is HoldState.COMMITTED:
                same_key = request_id is None or request_id == hold.resolution_request_id
                if same_key and spend == hold.committed_amount:
                    return hold
                if request_id is not None and request_id == hold.resolution_request_id:
                    raise IdempotencyMismatch(
                        "request_id", request_id, f"committed {hold.committed_amount} before, {spend} now"
                    )
            raise HoldAlreadyResolved(hold_id, hold.state)

        return await self._transaction(work)

    async def release(self, hold_id: str, reason: str = "") -> Hold:
        """Return the hold's credits to available. Releasing a released or expired hold returns it unchanged
        (its credits are back already); releasing a committed hold raises :class:`HoldAlreadyResolved`."""
        _require_id("hold_id", hold_id)

        async def work(conn: AsyncConnection) -> Hold:
            hold = await _lock_hold(conn, hold_id)
            if hold.state is HoldState.HELD:
                resolved = await _resolve(conn, [_Resolution(hold, HoldState.RELEASED, reason=reason or None)])
                return resolved[0]
            if hold.state is HoldState.COMMITTED:
                raise HoldAlreadyResolved(hold_id, hold.state)
            return hold

        return await self._transaction(work)

    async def apply_outcome(self, event_id: str, hold_id: str, outcome: Outcome | str) -> OutcomeApplied:
        """Apply one outcome event: ``sent`` commits the whole hold, ``failed`` releases it. The same event any
        number of times changes nothing after the first; see :class:`OutcomeResult` for every case."""
        result = (await self.apply_outcomes([OutcomeEvent(event_id, hold_id, _outcome(outcome))]))[0]
        if isinstance(result, LedgerError):
            raise result
        return result

    async def apply_outcomes(self, events: Sequence[OutcomeEvent]) -> list[OutcomeApplied | LedgerError]:
        """Apply a batch of outcome events (e.g. one JetStream fetch) in one transaction; per-event results in
        order. A malformed event or a reused event id gets its own error and never fails the others."""
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
                _require_id("event_id", event_id)
                _require_id("hold_id", hold_id)
                valid.append((index, OutcomeEvent(event_id, hold_id, _outcome(event.outcome))))
            except LedgerError as exc:
                results[index] = exc
        if valid:
            applied = await self._transaction(
                lambda conn: _apply_outcomes(conn, [event for _, event in valid]), pipeline=True
            )
            for (index, _), result in zip(valid, applied, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    async def expire_holds(self, now: datetime | None = None, limit: int = 1000) -> int:
        """One sweeper step: expire up to ``limit`` holds whose deadline is at or before ``now`` (the database's
        clock when ``None``) and return their credits; returns how many expired. Safe to run in several replicas
        at once: each takes holds no other sweeper has locked."""
        if limit < 1:
            raise InvalidAmount("limit", limit, "must be positive")

        async def work(conn: AsyncConnection) -> int:
            cur = await conn.execute(
                f"""SELECT {_HOLD_COLUMNS} FROM ledger.holds
                    WHERE state = 'held' AND expires_at <= COALESCE(%s::timestamptz, now())
                    ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED""",
                (now, limit),
            )
            due = [_hold_from_row(row) for row in await cur.fetchall()]
            if due:
                await _resolve(conn, [_Resolution(hold, HoldState.EXPIRED, reason="expired") for hold in due])
            return len(due)

        return await self._transaction(work)

    async def prune_processed_events(self, older_than_s: float, limit: int = 10_000) -> int:
        """Forget up to ``limit`` applied outcome events processed more than ``older_than_s`` ago; returns how many.
        Past the EVENTS stream's retention no redelivery can bring one back, and a late duplicate of a forgotten
        event still finds its hold resolved (``HOLD_ALREADY_RESOLVED``), so nothing is charged twice."""
        if older_than_s <= 0 or limit < 1:
            raise InvalidLedgerArgument("older_than_s", "the age and the limit must be positive")

        async def work(conn: AsyncConnection) -> int:
            cur = await conn.execute(
                """DELETE FROM ledger.processed_events WHERE event_id IN (
                       SELECT event_id FROM ledger.processed_events
                       WHERE processed_at < now() - make_interval(secs => %s) LIMIT %s)""",
                (older_than_s, limit),
            )
            return cur.rowcount

        return await self._transaction(work)

    async def refresh_planner_statistics(self) -> list[str]:
        """ANALYZE the ledger's tables whose statistics are stale by autovacuum's own rule (more than 50 rows +
        10 % changed since the last analyze), when the server does not run autovacuum; returns the tables analyzed.

        Without statistics the planner takes a young, fast-growing table for a small one, and the batch lookups by
        id (``hold_id = ANY(...)``, ``event_id = ANY(...)``) become sequential scans whose cost grows with the
        table: measured here, 165 scans reading 1.5 M rows for 20,000 settled emails. Where autovacuum runs it
        keeps the statistics fresh, and this does nothing."""
        async with self._pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                setting = await (await conn.execute("SELECT current_setting('autovacuum')")).fetchone()
                if setting is not None and setting[0] == "on":
                    return []
                rows = await (await conn.execute(
                    """SELECT relname FROM pg_stat_user_tables
                       WHERE schemaname = 'ledger' AND n_mod_since_analyze > 50 + 0.1 * n_live_tup
                       ORDER BY relname""")).fetchall()
                tables = [row[0] for row in rows]
                for table in tables:
                    await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("ledger", table)))
                return tables
            finally:
                await conn.set_autocommit(False)

    async def run_expiry_sweeper(self, stop: asyncio.Event, interval_s: float = 1.0, limit: int = 1000,
                                 statistics_every_s: float = 5.0, processed_event_retention_s: float = 8 * 86_400,
                                 prune_every_s: float = 60.0) -> None:
        """Expire due holds until ``stop`` is set: back to back while a step finds a full batch, else every
        ``interval_s``; every ``statistics_every_s`` also refresh stale planner statistics, and every
        ``prune_every_s`` forget applied outcome events older than ``processed_event_retention_s``. A failing step
        is logged and retried at the next interval."""
        loop = asyncio.get_running_loop()
        statistics_due = loop.time()
        prune_due = loop.time()
        while not stop.is_set():
            expired = 0
            try:
                expired = await self.expire_holds(limit=limit)
            except (psycopg.Error, OSError):
                logger.exception("hold expiry sweep failed")
            if loop.time() >= statistics_due:
                statistics_due = loop.time() + statistics_every_s
                try:
                    await self.refresh_planner_statistics()
                except (psycopg.Error, OSError):
                    logger.exception("refreshing the ledger's planner statistics failed")
            if loop.time() >= prune_due:
                prune_due = loop.time() + prune_every_s
                try:
                    pruned = step = 10_000  # a backlog goes in steps, each its own short transaction
                    while pruned >= step and not stop.is_set():
                        pruned = await self.prune_processed_events(processed_event_retention_s, step)
                except (psycopg.Error, OSError):
                    logger.exception("pruning the ledger's processed events failed")
            if expired >= limit:
                continue
            await pause_unless_stopped(stop, interval_s)

    # ------------------------------------------------------------------ journal

    async def list_transactions(
        self, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Transaction], str]:
        """The tenant's journal entries, newest first, and the token of the next page ("" on the last page).
        ``page_size`` 0 means the default; larger than the maximum is capped (AIP-158)."""
        _require_id("tenant_id", tenant_id)
        if page_size < 0:
            raise InvalidLedgerArgument("page_size", f"must not be negative (got {page_size})")
        size = min(page_size or self._options.default_page_size, self._options.max_page_size)
        before = _decode_page_token(page_token, tenant_id) if page_token else None
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"""SELECT {_ENTRY_COLUMNS} FROM ledger.entries
                    WHERE tenant_id = %s AND (%s::bigint IS NULL OR entry_id < %s::bigint)
                    ORDER BY entry_id DESC LIMIT %s""",
                (tenant_id, before, before, size + 1),
            )
            rows = await cur.fetchall()
        page = [_transaction_from_row(row) for row in rows[:size]]
        next_token = _encode_page_token(tenant_id, page[-1].entry_id) if len(rows) > size else ""
        return page, next_token

    # ------------------------------------------------------------------ price book

    async def get_price_book(self, tenant_id: str = DEFAULT_PRICE_BOOK) -> PriceBook:
        """The prices that apply to ``tenant_id`` (its overrides over the defaults), or the platform defaults."""
        _require_id("tenant_id", tenant_id)
        async with self._pool.connection() as conn:
            return (await _price_books(conn, [tenant_id]))[0][tenant_id]

    async def set_default_prices(self, book: PriceBook) -> PriceBook:
        """Replace the platform's default prices (``book.tenant_id`` is ignored)."""
        for name in ("otp_per_email", "transactional_per_email", "bulk_per_email", "per_attachment_mb"):
            _require_price(name, getattr(book, name))
        async with self._pool.connection() as conn:
            await conn.execute(
                """UPDATE ledger.price_books SET otp_per_email = %s, transactional_per_email = %s,
                       bulk_per_email = %s, per_attachment_mb = %s, updated_at = now()
                   WHERE tenant_id = %s""",
                (
                    book.otp_per_email,
                    book.transactional_per_email,
                    book.bulk_per_email,
                    book.per_attachment_mb,
                    DEFAULT_PRICE_BOOK,
                ),
            )
        return await self.get_price_book()

    async def set_price_overrides(self, tenant_id: str, overrides: PriceOverrides) -> PriceBook:
        """Replace the tenant's own prices (``None`` fields inherit the defaults); returns the effective book.
        Holds made before keep the price they were made with."""
        _require_id("tenant_id", tenant_id)
        if tenant_id == DEFAULT_PRICE_BOOK:
            raise InvalidLedgerArgument("tenant_id", "use set_default_prices for the platform defaults")
        values = (
            overrides.otp_per_email,
            overrides.transactional_per_email,
            overrides.bulk_per_email,
            overrides.per_attachment_mb,
        )
        for name, value in zip(
            ("otp_per_email", "transactional_per_email", "bulk_per_email", "per_attachment_mb"), values, strict=True
        ):
            if value is not None:
                _require_price(name, value)
        async with self._pool.connection() as conn:
            if all(value is None for value in values):
                await conn.execute("DELETE FROM ledger.price_books WHERE tenant_id = %s", (tenant_id,))
            else:
                await conn.execute(
                    """INSERT INTO ledger.price_books AS p
                           (tenant_id, otp_per_email, transactional_per_email, bulk_per_email, per_attachment_mb)
                       VALUES (%s, %s, %s, %s, %s)
                       ON CONFLICT (tenant_id) DO UPDATE SET
                           otp_per_email = excluded.otp_per_email,
                           transactional_per_email = excluded.transactional_per_email,
                           bulk_per_email = excluded.bulk_per_email,
                           per_attachment_mb = excluded.per_attachment_mb,
                           updated_at = now()""",
                    (tenant_id, *values),
                )
        return await self.get_price_book(tenant_id)

    async def quote(
        self, tenant_id: str, message_class: MessageClass | str, emails: int = 1, attachment_bytes: int = 0
    ) -> int:
        """What a reserve with these arguments would hold right now."""
        _require_positive("emails", emails, MAX_EMAILS_PER_HOLD)
        if not 0 <= attachment_bytes <= MAX_ATTACHMENT_BYTES:
            raise InvalidAmount("attachment_bytes", attachment_bytes, f"must be in [0, {MAX_ATTACHMENT_BYTES}]")
        book = await self.get_price_book(tenant_id)
        return hold_amount(unit_price(book, _message_class(message_class)), emails, attachment_bytes)

    # ------------------------------------------------------------------ notifications outbox

    async def pending_notifications(self, limit: int = 100) -> list[Notification]:
        """Outbox rows not yet marked published, oldest first (the publisher's input)."""
        if limit < 1:
            raise InvalidAmount("limit", limit, "must be positive")
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT notification_id, tenant_id, kind, payload, created_at FROM ledger.notifications
                   WHERE published_at IS NULL ORDER BY notification_id LIMIT %s""",
                (limit,),
            )
            rows = await cur.fetchall()
        return [Notification(row[0], row[1], NotificationKind(row[2]), row[3], row[4]) for row in rows]

    async def mark_notifications_published(self, notification_ids: Iterable[int]) -> None:
        """Record that these outbox rows were published, so they are not handed out again."""
        ids = list(notification_ids)
        if not ids:
            return
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE ledger.notifications SET published_at = now() "
                "WHERE notification_id = ANY(%b) AND published_at IS NULL",
                (ids,),
            )

    # ------------------------------------------------------------------ plumbing

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]], *, pipeline: bool = False,
                           synchronous_commit: bool = True) -> T:
        """Run ``work`` in one transaction, again from the start when Postgres aborted it for a deadlock,
        serialization failure or a racing insert of the same key (bounded attempts).

        With ``pipeline``, statements whose results ``work`` does not fetch are sent without waiting, together
        with the commit; their errors surface when the pipeline syncs at the end, and abort the transaction.
        Without ``synchronous_commit`` the commit does not wait for the WAL flush (this transaction only).
        """
        attempts = self._options.max_transaction_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self._pool.connection() as conn:
                    async with conn.pipeline() if pipeline else contextlib.nullcontext(), conn.transaction():
                        if not synchronous_commit:
                            await conn.execute("SET LOCAL synchronous_commit = off")
                        result = await work(conn)
                    return result  # only now: in a pipeline, errors surface when the transaction block syncs
            except _RETRYABLE:
                if attempt == attempts:
                    raise
                # Jitter so that two replicas that collided do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")

    @staticmethod
    async def _lock_balance(conn: AsyncConnection, tenant_id: str) -> tuple[Balance, bool]:
        cur = await conn.execute(
            """SELECT b.available, b.held - COALESCE(c.committed, 0), b.spent + COALESCE(c.committed, 0),
                      b.low_balance_threshold, b.low_balance_armed
               FROM ledger.balances b LEFT JOIN ledger.commit_totals c USING (tenant_id)
               WHERE b.tenant_id = %s FOR UPDATE OF b""",
            (tenant_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise AssertionError(f"balance row of {tenant_id} vanished")
        return Balance(tenant_id, row[0], row[1], row[2], row[3]), bool(row[4])


# ---------------------------------------------------------------------- SQL helpers shared by the operations


async def _price_books(conn: AsyncConnection, tenants: Sequence[str]) -> tuple[dict[str, PriceBook], datetime]:
    """The effective price book of each tenant, and the transaction's ``now()`` (when its holds are made)."""
    return await _fetch_price_books(await _query_price_books(conn, tenants))


# A reserve batch in one statement, priced by the server: the distinct shapes (1-based by position) with each
# shape's price from the tenant's book (or the default), and per hold its id and shape number. Holds go in hold id
# order (see _reserve_new). Returns what the caller cannot know without reading: prices, amounts and times.
_INSERT_PRICED_HOLDS = """
    WITH shape AS (
        SELECT s.tenant_id, s.message_class, s.emails, s.attachment_bytes, s.ttl_s, s.shape,
               COALESCE(CASE s.message_class WHEN 'otp' THEN o.otp_per_email
                                             WHEN 'transactional' THEN o.transactional_per_email
                                             ELSE o.bulk_per_email END,
                        CASE s.message_class WHEN 'otp' THEN d.otp_per_email
                                             WHEN 'transactional' THEN d.transactional_per_email
                                             ELSE d.bulk_per_email END) AS per_email,
               COALESCE(o.per_attachment_mb, d.per_attachment_mb) AS per_mb
        FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::float8[]) WITH ORDINALITY
            AS s(tenant_id, message_class, emails, attachment_bytes, ttl_s, shape)
        JOIN ledger.price_books AS d ON d.tenant_id = '-'
        LEFT JOIN ledger.price_books AS o ON o.tenant_id = s.tenant_id)
    INSERT INTO ledger.holds (hold_id, tenant_id, message_class, emails, attachment_bytes, price_per_email,
                              price_per_attachment_mb, amount, expires_at)
    SELECT a.hold_id, s.tenant_id, s.message_class, s.emails, s.attachment_bytes, s.per_email, s.per_mb,
           s.emails * (s.per_email + ((s.attachment_bytes + %b - 1) / %b) * s.per_mb),
           now() + make_interval(secs => s.ttl_s)
    FROM unnest(%b::text[], %b::bigint[]) AS a(hold_id, shape) JOIN shape s USING (shape)
    ORDER BY a.hold_id
    RETURNING hold_id, price_per_email, price_per_attachment_mb, amount, created_at, expires_at"""

# What the holds just inserted take from their tenants' balances (rows locked by the caller). The balance CHECK
# (available >= 0) refuses the whole batch when one of them does not fit.
_HOLD_FROM_BALANCES = """
    UPDATE ledger.balances AS b
    SET available = b.available - t.total, held = b.held + t.total, updated_at = now()
    FROM (SELECT tenant_id, sum(amount) AS total FROM ledger.holds WHERE hold_id = ANY(%b) GROUP BY tenant_id) AS t
    WHERE b.tenant_id = t.tenant_id AND t.total > 0"""

# _INSERT_RESERVE_ENTRIES for holds just inserted (amounts read back from them), in the order of the hold ids.
_INSERT_RESERVE_ENTRIES_OF_HOLDS = """
    WITH accepted AS (
        SELECT a.hold_id, a.position, h.tenant_id, h.amount
        FROM unnest(%b::text[]) WITH ORDINALITY AS a(hold_id, position) JOIN ledger.holds h USING (hold_id)
        WHERE h.amount > 0)""" + _RESERVE_ENTRIES_OF_ACCEPTED


async def _query_price_books(conn: AsyncConnection, tenants: Sequence[str]) -> psycopg.AsyncCursor[Any]:
    return await conn.execute(
        """SELECT t.tenant_id,
                  COALESCE(o.otp_per_email, d.otp_per_email),
                  COALESCE(o.transactional_per_email, d.transactional_per_email),
                  COALESCE(o.bulk_per_email, d.bulk_per_email),
                  COALESCE(o.per_attachment_mb, d.per_attachment_mb),
                  now()
           FROM unnest(%b::text[]) AS t(tenant_id)
           JOIN ledger.price_books AS d ON d.tenant_id = '-'
           LEFT JOIN ledger.price_books AS o ON o.tenant_id = t.tenant_id""",
        (list(tenants),),
    )


async def _fetch_price_books(cursor: psycopg.AsyncCursor[Any]) -> tuple[dict[str, PriceBook], datetime]:
    rows = await cursor.fetchall()
    return {row[0]: PriceBook(*row[:5]) for row in rows}, rows[0][5]


async def _query_balances(conn: AsyncConnection, tenants: Sequence[str], *, lock: bool) -> psycopg.AsyncCursor[Any]:
    """Read the balance rows of ``tenants``; with ``lock``, lock them in tenant order (every transaction locks
    balance rows in that order, so they never deadlock on them)."""
    query = "SELECT tenant_id, available FROM ledger.balances WHERE tenant_id = ANY(%b)"
    if lock:
        query += " ORDER BY tenant_id FOR UPDATE"
    return await conn.execute(query, (sorted(tenants),))


async def _fetch_balances(cursor: psycopg.AsyncCursor[Any]) -> dict[str, _LockedBalance]:
    return {row[0]: _LockedBalance(row[1]) for row in await cursor.fetchall()}


async def _lock_balances(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, _LockedBalance]:
    """Lock and read the balance rows of ``tenants``."""
    return await _fetch_balances(await _query_balances(conn, tenants, lock=True))


async def _update_balances(conn: AsyncConnection, balances: dict[str, _LockedBalance]) -> None:
    """Apply each changed balance's deltas (the rows are locked by the caller)."""
    changed = [(tenant, b) for tenant, b in balances.items() if b.changed]
    if not changed:
        return
    await conn.execute(
        """UPDATE ledger.balances AS b
           SET available = b.available + d.available_delta, held = b.held + d.held_delta,
               spent = b.spent + d.spent_delta, updated_at = now()
           FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[])
                AS d(tenant_id, available_delta, held_delta, spent_delta)
           WHERE b.tenant_id = d.tenant_id""",
        (
            [tenant for tenant, _ in changed],
            [b.available_delta for _, b in changed],
            [b.held_delta for _, b in changed],
            [b.spent_delta for _, b in changed],
        ),
    )


async def _notify_low_balance_crossings(conn: AsyncConnection, tenants: Sequence[str]) -> None:
    """Write a notification for each armed tenant whose available credits are now below its threshold, and
    disarm it (a top-up above the threshold re-arms it), so each crossing notifies once. Needs no result, so it
    pipelines with the writes before it."""
    if not tenants:
        return
    await conn.execute(
        """WITH crossed AS (
               UPDATE ledger.balances SET low_balance_armed = false
               WHERE tenant_id = ANY(%b) AND low_balance_armed AND available < low_balance_threshold
               RETURNING tenant_id, low_balance_threshold, available)
           INSERT INTO ledger.notifications (tenant_id, kind, payload)
           SELECT tenant_id, %b,
                  jsonb_build_object('tenant_id', tenant_id, 'threshold', low_balance_threshold,
                                     'available', available)
           FROM crossed""",
        (list(tenants), NotificationKind.LOW_BALANCE_CROSSED.value),
    )


async def _insert_entries(conn: AsyncConnection, entries: Sequence[_NewEntry]) -> None:
    if not entries:
        return
    await conn.execute(
        """INSERT INTO ledger.entries (tenant_id, kind, debit_account, credit_account, amount, hold_id, request_id,
                                       available_after)
           SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[],
                                %b::text[], %b::bigint[])""",
        (
            [e.tenant_id for e in entries],
            [str(e.kind) for e in entries],
            [str(ENTRY_ACCOUNTS[e.kind][0]) for e in entries],
            [str(ENTRY_ACCOUNTS[e.kind][1]) for e in entries],
            [e.amount for e in entries],
            [e.hold_id for e in entries],
            [e.request_id for e in entries],
            [e.available_after for e in entries],
        ),
    )


async def _insert_notifications(conn: AsyncConnection, notifications: Sequence[_NewNotification]) -> None:
    if not notifications:
        return
    await conn.execute(
        """INSERT INTO ledger.notifications (tenant_id, kind, payload)
           SELECT * FROM unnest(%b::text[], %b::text[], %s::jsonb[])""",
        (
            [n.tenant_id for n in notifications],
            [str(n.kind) for n in notifications],
            [Jsonb(n.payload) for n in notifications],
        ),
    )


def _low_balance(tenant_id: str, threshold: int, available: int) -> _NewNotification:
    return _NewNotification(
        tenant_id,
        NotificationKind.LOW_BALANCE_CROSSED,
        {"tenant_id": tenant_id, "threshold": threshold, "available": available},
    )


async def _lock_hold(conn: AsyncConnection, hold_id: str) -> Hold:
    cur = await conn.execute(f"SELECT {_HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = %s FOR UPDATE", (hold_id,))
    row = await cur.fetchone()
    if row is None:
        raise HoldNotFound(hold_id)
    return _hold_from_row(row)


async def _resolve(conn: AsyncConnection, resolutions: Sequence[_Resolution]) -> list[Hold]:
    """Move locked, held holds to their final state: journal entries, balance changes and the hold rows, in
    the caller's transaction. Returns the resolved holds in order."""
    balances = await _lock_balances(conn, sorted({r.hold.tenant_id for r in resolutions}))
    entries: list[_NewEntry] = []
    for resolution in resolutions:
        hold = resolution.hold
        balance = balances.get(hold.tenant_id)
        if balance is None:
            if hold.amount:
                raise AssertionError(f"hold {hold.hold_id} holds credits of a tenant without a balance")
            continue
        committed = resolution.committed_amount or 0
        returned = hold.amount - committed
        balance.held_delta -= hold.amount
        balance.spent_delta += committed
        balance.available_delta += returned
        if committed:
            entries.append(
                _NewEntry(
                    hold.tenant_id, EntryKind.COMMIT, committed, hold.hold_id, resolution.request_id, balance.available
                )
            )
        if returned:
            balance.available += returned
            kind = {
                HoldState.COMMITTED: EntryKind.COMMIT_REFUND,
                HoldState.RELEASED: EntryKind.RELEASE,
                HoldState.EXPIRED: EntryKind.EXPIRE,
            }[resolution.state]
            entries.append(
                _NewEntry(hold.tenant_id, kind, returned, hold.hold_id, resolution.request_id, balance.available)
            )
    cur = await conn.execute(
        """UPDATE ledger.holds AS h
           SET state = r.state, committed_amount = r.committed_amount, resolution_request_id = r.request_id,
               resolution_reason = r.reason, resolved_at = now()
           FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[])
                AS r(hold_id, state, committed_amount, request_id, reason)
           WHERE h.hold_id = r.hold_id AND h.state = 'held'
           RETURNING h.hold_id, h.resolved_at""",
        (
            [r.hold.hold_id for r in resolutions],
            [str(r.state) for r in resolutions],
            [r.committed_amount for r in resolutions],
            [r.request_id for r in resolutions],
            [r.reason for r in resolutions],
        ),
    )
    resolved_at = {row[0]: row[1] for row in await cur.fetchall()}
    if len(resolved_at) != len(resolutions):
        # The caller locked these holds as held; anything else means a bug, and the transaction must not commit.
        raise AssertionError("a hold to resolve was not held any more")
    await _insert_entries(conn, entries)
    await _update_balances(conn, balances)
    return [
        replace(
            r.hold,
            state=r.state,
            committed_amount=r.committed_amount if r.state is HoldState.COMMITTED else None,
            resolved_at=resolved_at[r.hold.hold_id],
            resolution_request_id=r.request_id,
            resolution_reason=r.reason,
        )
        for r in resolutions
    ]


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


async def _apply_outcomes(conn: AsyncConnection, events: Sequence[OutcomeEvent]) -> list[OutcomeApplied | LedgerError]:
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
    balances: dict[str, _LockedBalance] = {}  # releases: back to available, on the balance row
    committed: dict[str, int] = {}  # commits: held -> spent, on the tenant's commit_totals row
    processed_events: list[str] = []
    processed_holds: list[str] = []
    processed_outcomes: list[str] = []
    processed_results: list[str] = []
    notifications: list[_NewNotification] = []
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
                if outcome is Outcome.SENT:
                    result, kind, state_now[hold_id] = OutcomeResult.COMMITTED, "commit", "committed"
                    committed[tenant_id] = committed.get(tenant_id, 0) + amount
                else:
                    result, kind, state_now[hold_id] = OutcomeResult.RELEASED, "release", "released"
                    balance = balances.get(tenant_id)
                    if balance is None:
                        balance = balances[tenant_id] = _LockedBalance(0)
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
            if outcome is Outcome.SENT and state in ("expired", "released"):
                notifications.append(
                    _NewNotification(
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
            await _query_balances(conn, list(balances), lock=True)
        await conn.execute(_RESOLVE_OUTCOME_HOLDS, (resolved_holds, resolved_states, resolved_by))
        await _update_balances(conn, balances)
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
    await _insert_notifications(conn, notifications)
    return results


# ---------------------------------------------------------------------- conversions and validation


def _copy_with_hold_id(template: Hold, hold_id: str) -> Hold:
    """``template`` with another hold id. Builds the frozen dataclass by filling its ``__dict__`` instead of
    running ``__init__`` (one ``object.__setattr__`` per field): this runs once per reserve on the hot path, where
    it is a measurable share of the ledger's CPU."""
    hold = object.__new__(Hold)
    hold.__dict__.update(template.__dict__)
    hold.__dict__["hold_id"] = hold_id
    return hold


def _hold_from_row(row: Sequence[Any]) -> Hold:
    return Hold(
        hold_id=row[0],
        tenant_id=row[1],
        message_class=MessageClass(row[2]),
        emails=row[3],
        attachment_bytes=row[4],
        price=Price(per_email=row[5], per_attachment_mb=row[6]),
        amount=row[7],
        state=HoldState(row[8]),
        committed_amount=row[9],
        created_at=row[10],
        expires_at=row[11],
        resolved_at=row[12],
        resolution_request_id=row[13],
        resolution_reason=row[14],
    )


def _transaction_from_row(row: Sequence[Any]) -> Transaction:
    return Transaction(
        entry_id=row[0],
        tenant_id=row[1],
        kind=EntryKind(row[2]),
        debit_account=Account(row[3]),
        credit_account=Account(row[4]),
        amount=row[5],
        hold_id=row[6],
        request_id=row[7],
        available_after=row[8],
        created_at=row[9],
    )


def _same_request(a: ReserveRequest, b: ReserveRequest) -> bool:
    return (a.tenant_id, a.message_class, a.emails, a.attachment_bytes) == (
        b.tenant_id,
        b.message_class,
        b.emails,
        b.attachment_bytes,
    )


def _same_reserve(hold: Hold, request: ReserveRequest) -> bool:
    """A retry of the reserve that made ``hold`` (the TTL is not compared: a default may change between tries)."""
    return (hold.tenant_id, hold.message_class, hold.emails, hold.attachment_bytes) == (
        request.tenant_id,
        request.message_class,
        request.emails,
        request.attachment_bytes,
    )


def _reserve_mismatch(request: ReserveRequest, hold: Hold) -> IdempotencyMismatch:
    return IdempotencyMismatch(
        "hold_id",
        request.hold_id,
        f"held {hold.emails} {hold.message_class} email(s) of {hold.attachment_bytes} attachment bytes for "
        f"{hold.tenant_id} before",
    )


def _require_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidLedgerArgument(name, f"must be a non-empty string of at most {MAX_ID_LENGTH} characters")


def _require_positive(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise InvalidAmount(name, value, f"must be an integer in [1, {maximum}]")


def _require_price(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UNIT_PRICE:
        raise InvalidAmount(name, value, f"must be an integer in [0, {MAX_UNIT_PRICE}]")


def _message_class(value: MessageClass | str) -> MessageClass:
    try:
        return MessageClass(value)
    except ValueError:
        raise InvalidLedgerArgument(
            "message_class", f"must be one of {', '.join(MessageClass)} (got {value!r})"
        ) from None


def _outcome(value: Outcome | str) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise InvalidLedgerArgument("outcome", f"must be one of {', '.join(Outcome)} (got {value!r})") from None


def _encode_page_token(tenant_id: str, last_entry_id: int) -> str:
    raw = json.dumps({"t": tenant_id, "before": last_entry_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, tenant_id: str) -> int:
    """The entry id a page token continues before; the token must come from a listing of the same tenant."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        before = data["before"]
        token_tenant = data["t"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidPageToken() from None
    if token_tenant != tenant_id or not isinstance(before, int) or isinstance(before, bool):
        raise InvalidPageToken()
    return before
