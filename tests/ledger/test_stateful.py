"""Random sequences of ledger operations, with restarts between steps, against a model of what must happen.

After every step: the journal balances, the kept balances equal the journal's, nothing is negative, every hold
was resolved at most once, each tenant's balance equals its top-ups minus what was committed, and the database
agrees with the model on every balance and every hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from psycopg_pool import AsyncConnectionPool

from libs.common.db import create_pool, migrate_services
from services.ledger.errors import HoldAlreadyResolved, InsufficientCredits
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.models import Hold, HoldState, MessageClass, OutcomeResult, PriceOverrides
from tests.ledger.books import check_books

T = TypeVar("T")
MIB = 1024 * 1024
TENANTS = ("acme", "beta")
DEFAULT_PER_EMAIL = {MessageClass.OTP: 5, MessageClass.TRANSACTIONAL: 3, MessageClass.BULK: 1}
DEFAULT_PER_MB = 1


@dataclass
class ModelTenant:
    available: int = 0
    held: int = 0
    spent: int = 0
    topped_up: int = 0


@dataclass
class ModelHold:
    tenant: str
    message_class: MessageClass
    emails: int
    attachment_bytes: int
    amount: int
    expires_at: datetime
    state: HoldState = HoldState.HELD
    committed: int | None = None


class LedgerMachine(RuleBasedStateMachine):
    """Drives one Ledger on a fresh database; the model says what every balance and hold must be."""

    # Set by the test: makes an empty database (the session's new_database fixture).
    new_dsn: ClassVar[Callable[[], str]]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dsn = type(self).new_dsn()
        self.run(migrate_services(self.dsn, ["ledger"]))
        self.pool, self.ledger = self.run(self.open())
        self.tenants = {tenant: ModelTenant() for tenant in TENANTS}
        self.holds: dict[str, ModelHold] = {}
        self.top_ups: dict[tuple[str, str], int] = {}
        self.events: dict[str, tuple[str, str, OutcomeResult]] = {}
        self.overrides: dict[tuple[str, MessageClass], int] = {}
        self.counter = 0
        self.steps_since_restart = 0
        for tenant in TENANTS:  # funded from the start, so early steps already make holds to resolve
            self.top_up(tenant, 60)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    async def open(self) -> tuple[AsyncConnectionPool, Ledger]:
        pool = await create_pool(self.dsn, min_size=1, max_size=4, name="ledger-stateful")
        return pool, Ledger(pool, LedgerOptions())

    async def shut(self) -> None:
        await self.ledger.close()
        await self.pool.close()

    def teardown(self) -> None:
        self.run(self.shut())
        self.loop.close()

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def price(self, tenant: str, message_class: MessageClass, emails: int, attachment_bytes: int) -> int:
        per_email = self.overrides.get((tenant, message_class), DEFAULT_PER_EMAIL[message_class])
        return emails * (per_email + -(-attachment_bytes // MIB) * DEFAULT_PER_MB)

    def holds_in(self, *states: HoldState) -> list[str]:
        return sorted(hold_id for hold_id, hold in self.holds.items() if hold.state in states)

    def resolve(self, hold_id: str, state: HoldState, committed: int | None = None) -> None:
        hold = self.holds[hold_id]
        tenant = self.tenants[hold.tenant]
        hold.state, hold.committed = state, committed
        tenant.held -= hold.amount
        tenant.spent += committed or 0
        tenant.available += hold.amount - (committed or 0)

    # ------------------------------------------------------------------ rules

    @rule(tenant=st.sampled_from(TENANTS), amount=st.integers(1, 40))
    def top_up(self, tenant: str, amount: int) -> None:
        request_id = self.next_id("t")
        balance = self.run(self.ledger.top_up(tenant, amount, request_id))
        model = self.tenants[tenant]
        model.available += amount
        model.topped_up += amount
        self.top_ups[(tenant, request_id)] = amount
        assert balance.available == model.available

    @precondition(lambda self: self.top_ups)
    @rule(data=st.data())
    def repeat_a_top_up(self, data: st.DataObject) -> None:
        (tenant, request_id), amount = data.draw(st.sampled_from(sorted(self.top_ups.items())))
        balance = self.run(self.ledger.top_up(tenant, amount, request_id))
        assert balance.available == self.tenants[tenant].available

    @rule(
        tenant=st.sampled_from(TENANTS),
        message_class=st.sampled_from(list(MessageClass)),
        emails=st.integers(1, 3),
        attachment_bytes=st.sampled_from([0, 1, MIB, MIB + 1]),
        ttl_s=st.sampled_from([60, 3600, 7200]),
        concurrent=st.integers(1, 6),
    )
    def reserve(
        self,
        tenant: str,
        message_class: MessageClass,
        emails: int,
        attachment_bytes: int,
        ttl_s: int,
        concurrent: int,
    ) -> None:
        hold_ids = [self.next_id("h") for _ in range(concurrent)]

        async def reserve_all() -> list[Hold | BaseException]:
            return await asyncio.gather(
                *(self.ledger.reserve(tenant, h, message_class, emails, attachment_bytes, ttl_s) for h in hold_ids),
                return_exceptions=True,
            )

        results = self.run(reserve_all())
        model = self.tenants[tenant]
        amount = self.price(tenant, message_class, emails, attachment_bytes)
        fitting = min(concurrent, model.available // amount) if amount else concurrent
        holds = [r for r in results if isinstance(r, Hold)]
        refusals = [r for r in results if not isinstance(r, Hold)]
        assert len(holds) == fitting, results
        for refusal in refusals:
            assert isinstance(refusal, InsufficientCredits), refusal
            assert refusal.shortfall == amount - (model.available - fitting * amount)
        for hold in holds:
            assert hold.amount == amount
            self.holds[hold.hold_id] = ModelHold(
                tenant, message_class, emails, attachment_bytes, amount, hold.expires_at
            )
        model.available -= fitting * amount
        model.held += fitting * amount

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def repeat_a_reserve(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.holds)))
        model = self.holds[hold_id]
        hold = self.run(
            self.ledger.reserve(model.tenant, hold_id, model.message_class, model.emails, model.attachment_bytes)
        )
        assert (hold.state, hold.amount, hold.committed_amount) == (model.state, model.amount, model.committed)

    @precondition(lambda self: self.holds_in(HoldState.HELD))
    @rule(data=st.data(), partial=st.booleans())
    def commit(self, data: st.DataObject, partial: bool) -> None:
        hold_id = data.draw(st.sampled_from(self.holds_in(HoldState.HELD)))
        model = self.holds[hold_id]
        amount = data.draw(st.integers(0, model.amount)) if partial else None
        hold = self.run(self.ledger.commit(hold_id, amount, request_id=self.next_id("c")))
        committed = model.amount if amount is None else amount
        self.resolve(hold_id, HoldState.COMMITTED, committed)
        assert (hold.state, hold.committed_amount) == (HoldState.COMMITTED, committed)

    @precondition(lambda self: self.holds_in(HoldState.HELD))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(self.holds_in(HoldState.HELD)))
        hold = self.run(self.ledger.release(hold_id, "test"))
        self.resolve(hold_id, HoldState.RELEASED)
        assert hold.state is HoldState.RELEASED

    @precondition(lambda self: self.holds_in(HoldState.COMMITTED, HoldState.RELEASED, HoldState.EXPIRED))
    @rule(data=st.data())
    def try_to_resolve_again(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(self.holds_in(HoldState.COMMITTED, HoldState.RELEASED, HoldState.EXPIRED)))
        model = self.holds[hold_id]
        try:
            self.run(self.ledger.commit(hold_id, request_id=self.next_id("c")))
            raise AssertionError(f"second commit of {model.state} hold {hold_id} succeeded")
        except HoldAlreadyResolved:
            pass
        try:
            released = self.run(self.ledger.release(hold_id))
            assert model.state is not HoldState.COMMITTED and released.state is model.state
        except HoldAlreadyResolved:
            assert model.state is HoldState.COMMITTED

    @precondition(lambda self: self.holds_in(HoldState.HELD))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(self.holds_in(HoldState.HELD)))
        now = self.holds[hold_id].expires_at
        due = [h for h in self.holds_in(HoldState.HELD) if self.holds[h].expires_at <= now]
        expired = self.run(self.ledger.expire_holds(now=now))
        for due_id in due:
            self.resolve(due_id, HoldState.EXPIRED)
        assert expired == len(due)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), outcome=st.sampled_from(["sent", "failed"]), deliveries=st.integers(1, 3))
    def deliver_an_outcome(self, data: st.DataObject, outcome: str, deliveries: int) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.holds)))
        event_id = self.next_id("e")
        model = self.holds[hold_id]
        if model.state is HoldState.HELD:
            if outcome == "sent":
                expected = OutcomeResult.COMMITTED
                self.resolve(hold_id, HoldState.COMMITTED, model.amount)
            else:
                expected = OutcomeResult.RELEASED
                self.resolve(hold_id, HoldState.RELEASED)
        elif model.state is HoldState.EXPIRED:
            expected = OutcomeResult.HOLD_EXPIRED
        else:
            expected = OutcomeResult.HOLD_ALREADY_RESOLVED
        results = [self.run(self.ledger.apply_outcome(event_id, hold_id, outcome)) for _ in range(deliveries)]
        self.events[event_id] = (hold_id, outcome, expected)
        assert [(r.result, r.duplicate) for r in results] == [(expected, i > 0) for i in range(deliveries)]

    @precondition(lambda self: self.events)
    @rule(data=st.data())
    def redeliver_an_old_event(self, data: st.DataObject) -> None:
        event_id = data.draw(st.sampled_from(sorted(self.events)))
        hold_id, outcome, expected = self.events[event_id]
        applied = self.run(self.ledger.apply_outcome(event_id, hold_id, outcome))
        assert (applied.result, applied.duplicate) == (expected, True)

    @rule(tenant=st.sampled_from(TENANTS), message_class=st.sampled_from(list(MessageClass)), price=st.integers(0, 7))
    def change_a_price(self, tenant: str, message_class: MessageClass, price: int) -> None:
        self.overrides[(tenant, message_class)] = price
        fields = {f"{c}_per_email": self.overrides.get((tenant, c)) for c in MessageClass}
        self.run(self.ledger.set_price_overrides(tenant, PriceOverrides(**fields)))

    @precondition(lambda self: self.steps_since_restart >= 3)
    @rule()
    def restart(self) -> None:
        """A process restart: the ledger and its pool go away; new ones open on the same database. (Not back to
        back: a few operations run between two restarts.)"""
        self.run(self.shut())
        self.pool, self.ledger = self.run(self.open())
        self.steps_since_restart = 0

    # ------------------------------------------------------------------ invariants

    @invariant()
    def count_steps(self) -> None:
        self.steps_since_restart += 1

    @invariant()
    def books_agree_with_the_model(self) -> None:
        books = self.run(check_books(self.pool))
        for name, model in self.tenants.items():
            kept = books[name].kept if name in books else {"available": 0, "held": 0, "spent": 0}
            assert kept == {"available": model.available, "held": model.held, "spent": model.spent}, name
            assert kept["available"] >= 0
            assert kept["available"] + kept["held"] == model.topped_up - model.spent

    @invariant()
    def holds_agree_with_the_model(self) -> None:
        async def holds() -> dict[str, tuple[str, int | None]]:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT hold_id, state, committed_amount FROM ledger.holds")
                return {row[0]: (row[1], row[2]) for row in await cur.fetchall()}

        assert self.run(holds()) == {h: (str(m.state), m.committed) for h, m in self.holds.items()}


def test_random_operation_sequences_keep_every_invariant(new_database: Callable[[], str]) -> None:
    LedgerMachine.new_dsn = new_database
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
