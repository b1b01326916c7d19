"""Reserving: holding the price of a message (or a campaign chunk) from the tenant's available credits, priced now
from the price book. Reserve is keyed by ``hold_id`` (global): a repeat returns the first hold, the same id with
different arguments raises :class:`~services.ledger.errors.IdempotencyMismatch`.

Concurrency
    Reserves go through a :class:`~libs.common.batching.GroupCommitter`: concurrent calls coalesce into batches
    (sharded by tenant, so batches in flight at once lock disjoint balance rows), and each batch is one transaction
    made of a few array statements sent in pipeline mode. A batch is decided optimistically against balances read
    without a lock; its writes and commit then go to the server together, taking the row locks only there (in
    tenant order), so no lock waits on this process. ``CHECK (available >= 0)`` catches a concurrent spend; then,
    and whenever some request does not fit, the batch is redone with the rows locked first, so a refusal always
    comes from an authoritative balance. Several replicas stay correct because every change is applied under the
    row lock and checked by the database. Racing inserts of one hold id are retried.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta

import psycopg
from psycopg import AsyncConnection

from libs.common.batching import BatchingOptions, GroupCommitter
from services.ledger.balances import LockedBalance, fetch_balances, query_balances, update_balances
from services.ledger.database import RETRYABLE, Database
from services.ledger.errors import (
    IdempotencyMismatch,
    InsufficientCredits,
    InvalidAmount,
    InvalidLedgerArgument,
    LedgerError,
)
from services.ledger.holds import HOLD_COLUMNS, hold_from_row
from services.ledger.models import (
    ATTACHMENT_BILLING_UNIT_BYTES,
    ENTRY_ACCOUNTS,
    EntryKind,
    Hold,
    HoldState,
    MessageClass,
    Price,
    PriceBook,
    ReserveRequest,
)
from services.ledger.notifications import notify_low_balance_crossings
from services.ledger.price_book import fetch_price_books, query_price_books
from services.ledger.pricing import hold_amount, unit_price
from services.ledger.validation import (
    MAX_ATTACHMENT_BYTES,
    MAX_EMAILS_PER_HOLD,
    parse_message_class,
    require_id,
    require_positive,
)

ONE_ROUND_TRIP_MAX_BATCH = 32
"""Largest reserve batch sent in one round trip (``_reserve_in_one_round_trip``). A small batch — an OTP, a trickle
of single sends — waits mostly for round trips; a large one costs the server more when it prices the holds and
reads their amounts back than the round trip it saves (hot-tenant batches of 1,000: ≈ 15 % fewer reserves/s)."""


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


class _NeedsLock(Exception):
    """An optimistic reserve batch found a request that does not fit: it is redone with the rows locked."""


class Reserves:
    """The reserves of one :class:`~services.ledger.ledger.Ledger`: validation, grouping into batches, and
    deciding and writing each batch."""

    def __init__(
        self,
        db: Database,
        *,
        default_hold_ttl_s: float,
        max_hold_ttl_s: float,
        batching: BatchingOptions,
        synchronous_commit: bool,
    ) -> None:
        self._db = db
        self._default_hold_ttl_s = default_hold_ttl_s
        self._max_hold_ttl_s = max_hold_ttl_s
        self._synchronous_commit = synchronous_commit
        self._balance_rows: set[str] = set()
        """Tenants whose balance row exists (rows are never deleted): their reserves may skip reading it."""
        # Sharded by tenant: concurrent batches lock disjoint balance rows, and one tenant's reserves always
        # coalesce into the same batches.
        self._committer: GroupCommitter[ReserveRequest, Hold] = GroupCommitter(
            self._reserve_batch, batching, shard_key=lambda request: request.tenant_id,
            # An urgent class's (OTP's) hold never waits behind a campaign's reserves queued in this process.
            urgent=lambda request: request.message_class.policy.urgent, name="ledger-reserve",
        )

    async def close(self) -> None:
        """Finish the reserves already queued and stop."""
        await self._committer.close()

    async def reserve(
        self,
        tenant_id: str,
        hold_id: str,
        message_class: MessageClass | str,
        emails: int = 1,
        attachment_bytes: int = 0,
        ttl_s: float | None = None,
    ) -> Hold:
        """:meth:`Ledger.reserve <services.ledger.ledger.Ledger.reserve>`."""
        request = self._validated(tenant_id, hold_id, message_class, emails, attachment_bytes, ttl_s)
        return await self._committer.submit(request)

    async def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[Hold | LedgerError]:
        """:meth:`Ledger.reserve_many <services.ledger.ledger.Ledger.reserve_many>`."""
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
        urgent = all(request.message_class.policy.urgent for _, request in valid)
        outcomes = await self._committer.submit_many([request for _, request in valid], urgent=urgent)
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
        require_id("tenant_id", tenant_id)
        require_id("hold_id", hold_id)
        checked_class = message_class if isinstance(message_class, MessageClass) else parse_message_class(message_class)
        require_positive("emails", emails, MAX_EMAILS_PER_HOLD)
        if attachment_bytes.__class__ is not int or not 0 <= attachment_bytes <= MAX_ATTACHMENT_BYTES:
            raise InvalidAmount(
                "attachment_bytes", attachment_bytes, f"must be an integer in [0, {MAX_ATTACHMENT_BYTES}]"
            )
        if ttl_s is None:
            ttl_s = self._default_hold_ttl_s
        elif not 0 < ttl_s <= self._max_hold_ttl_s:
            raise InvalidLedgerArgument(
                "ttl_s", f"must be in (0, {self._max_hold_ttl_s}] seconds (got {ttl_s})"
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
            return self._db.transaction(lambda conn: self._reserve_in_transaction(conn, requests, locked=locked),
                                        pipeline=True, synchronous_commit=self._synchronous_commit)

        if (len(requests) <= ONE_ROUND_TRIP_MAX_BATCH and len({r.hold_id for r in requests}) == len(requests)
                and self._balance_rows.issuperset(r.tenant_id for r in requests)):
            try:
                return await self._reserve_in_one_round_trip(requests)
            except psycopg.errors.CheckViolation as exc:  # some hold did not fit: decide each against locked rows
                if exc.diag.constraint_name != "balances_available_check":
                    raise
                return await reading(locked=True)
            except RETRYABLE:  # a hold id held already (a retry), or a race: the reading path sorts it out
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
        async with self._db.pool.connection() as conn:
            async with conn.pipeline(), conn.transaction():
                if not self._synchronous_commit:
                    await conn.execute("SET LOCAL synchronous_commit = off")
                inserted = await conn.execute(_INSERT_PRICED_HOLDS, (
                    [key[0] for key in shapes], [key[1].value for key in shapes], [key[2] for key in shapes],
                    [key[3] for key in shapes], [key[4] for key in shapes], ATTACHMENT_BILLING_UNIT_BYTES,
                    ATTACHMENT_BILLING_UNIT_BYTES, hold_ids, shape_numbers))
                await query_balances(conn, tenants, lock=True)
                await conn.execute(_HOLD_FROM_BALANCES, (hold_ids,))
                await conn.execute(_INSERT_RESERVE_ENTRIES_OF_HOLDS,
                                   (hold_ids, EntryKind.RESERVE.value, debit.value, credit.value))
                await notify_low_balance_crossings(conn, tenants)
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
            f"SELECT {HOLD_COLUMNS} FROM ledger.holds WHERE hold_id = ANY(%b)", (list(first_by_hold_id),)
        )
        prices_cursor = await query_price_books(conn, tenants)
        balances_cursor = None if locked else await query_balances(conn, tenants, lock=False)
        existing = {hold.hold_id: hold for hold in map(hold_from_row, await existing_cursor.fetchall())}
        books, now = await fetch_price_books(prices_cursor)

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
                balances = await fetch_balances(await query_balances(conn, new_tenants, lock=True))
            else:
                balances = await fetch_balances(balances_cursor)
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
        balances: dict[str, LockedBalance],
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
            await query_balances(conn, changed, lock=True)
        await update_balances(conn, balances)
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
        await notify_low_balance_crossings(conn, changed)

        holds = {request.hold_id: _copy_with_hold_id(template, request.hold_id) for request, template in accepted}
        for index in new:
            if results[index] is None:
                results[index] = holds[requests[index].hold_id]


def _copy_with_hold_id(template: Hold, hold_id: str) -> Hold:
    """``template`` with another hold id. Builds the frozen dataclass by filling its ``__dict__`` instead of
    running ``__init__`` (one ``object.__setattr__`` per field): this runs once per reserve on the hot path, where
    it is a measurable share of the ledger's CPU."""
    hold = object.__new__(Hold)
    hold.__dict__.update(template.__dict__)
    hold.__dict__["hold_id"] = hold_id
    return hold


def _what_is_held(reserve: Hold | ReserveRequest) -> tuple[str, MessageClass, int, int]:
    """What a repeated reserve must repeat (the TTL is not compared: a default may change between tries)."""
    return reserve.tenant_id, reserve.message_class, reserve.emails, reserve.attachment_bytes


def _same_request(a: ReserveRequest, b: ReserveRequest) -> bool:
    return _what_is_held(a) == _what_is_held(b)


def _same_reserve(hold: Hold, request: ReserveRequest) -> bool:
    """A retry of the reserve that made ``hold``."""
    return _what_is_held(hold) == _what_is_held(request)


def _reserve_mismatch(request: ReserveRequest, hold: Hold) -> IdempotencyMismatch:
    return IdempotencyMismatch(
        "hold_id",
        request.hold_id,
        f"held {hold.emails} {hold.message_class} email(s) of {hold.attachment_bytes} attachment bytes for "
        f"{hold.tenant_id} before",
    )

