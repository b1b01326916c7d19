"""The price book: per-class prices per email and per started MiB, tenant overrides, fixed at reserve time."""

from __future__ import annotations

import pytest

from services.ledger.errors import InvalidAmount
from services.ledger.ledger import Ledger
from services.ledger.models import DEFAULT_PRICE_BOOK, MessageClass, Price, PriceBook, PriceOverrides
from services.ledger.pricing import hold_amount, started_attachment_mib

MIB = 1024 * 1024


@pytest.mark.parametrize(("size", "units"), [(0, 0), (1, 1), (MIB, 1), (MIB + 1, 2), (150 * MIB, 150)])
def test_attachments_are_billed_per_started_mib(size: int, units: int) -> None:
    assert started_attachment_mib(size) == units


def test_a_hold_costs_each_email_its_price_plus_its_attachment_mib() -> None:
    assert hold_amount(Price(per_email=3, per_attachment_mb=2), emails=10, attachment_bytes=MIB + 1) == 10 * (3 + 4)


async def test_the_default_price_book_prices_each_class(ledger: Ledger) -> None:
    assert await ledger.get_price_book() == PriceBook(DEFAULT_PRICE_BOOK, 5, 3, 1, 1)
    assert await ledger.quote("acme", "otp") == 5
    assert await ledger.quote("acme", "bulk", emails=1000, attachment_bytes=2 * MIB) == 3000


async def test_tenant_overrides_replace_only_the_prices_they_set(ledger: Ledger) -> None:
    book = await ledger.set_price_overrides("acme", PriceOverrides(bulk_per_email=2, per_attachment_mb=7))

    assert book == PriceBook("acme", otp_per_email=5, transactional_per_email=3, bulk_per_email=2, per_attachment_mb=7)
    assert await ledger.get_price_book("other") == PriceBook("other", 5, 3, 1, 1)


async def test_a_reserve_is_priced_with_the_tenants_overrides(ledger: Ledger) -> None:
    await ledger.set_price_overrides("acme", PriceOverrides(otp_per_email=9, per_attachment_mb=4))
    await ledger.top_up("acme", 100, "t1")

    hold = await ledger.reserve("acme", "m1", MessageClass.OTP, emails=2, attachment_bytes=MIB + 1)

    assert (hold.price, hold.amount) == (Price(per_email=9, per_attachment_mb=4), 2 * (9 + 2 * 4))


async def test_the_price_is_fixed_when_the_hold_is_made(ledger: Ledger) -> None:
    await ledger.top_up("acme", 100, "t1")
    await ledger.reserve("acme", "m1", MessageClass.TRANSACTIONAL)

    await ledger.set_price_overrides("acme", PriceOverrides(transactional_per_email=50))
    await ledger.set_default_prices(PriceBook(DEFAULT_PRICE_BOOK, 40, 40, 40, 40))
    committed = await ledger.commit("m1")

    assert (committed.price.per_email, committed.committed_amount) == (3, 3)
    assert (await ledger.reserve("acme", "m2", MessageClass.TRANSACTIONAL)).amount == 50
    assert (await ledger.reserve("acme", "m3", MessageClass.BULK)).amount == 40


async def test_clearing_every_override_restores_the_defaults(ledger: Ledger) -> None:
    await ledger.set_price_overrides("acme", PriceOverrides(otp_per_email=1))

    assert await ledger.set_price_overrides("acme", PriceOverrides()) == PriceBook("acme", 5, 3, 1, 1)


async def test_negative_prices_are_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidAmount):
        await ledger.set_price_overrides("acme", PriceOverrides(bulk_per_email=-1))
    with pytest.raises(InvalidAmount):
        await ledger.set_default_prices(PriceBook(DEFAULT_PRICE_BOOK, 1, 1, -1, 1))


async def test_a_free_class_makes_holds_of_zero_credits(ledger: Ledger) -> None:
    await ledger.set_price_overrides("acme", PriceOverrides(bulk_per_email=0))

    hold = await ledger.reserve("acme", "m1", MessageClass.BULK)
    committed = await ledger.commit("m1")

    assert (hold.amount, committed.committed_amount) == (0, 0)
    assert (await ledger.list_transactions("acme"))[0] == []
