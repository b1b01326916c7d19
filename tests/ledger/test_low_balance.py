"""Low-balance notifications: once per crossing below the threshold, re-armed by a top-up above it."""

from __future__ import annotations

import pytest

from services.ledger.errors import InvalidAmount
from services.ledger.ledger import Ledger
from services.ledger.models import Balance, MessageClass, NotificationKind


async def crossings(ledger: Ledger) -> list[dict[str, object]]:
    notifications = await ledger.pending_notifications()
    return [n.payload for n in notifications if n.kind is NotificationKind.LOW_BALANCE_CROSSED]


async def test_falling_below_the_threshold_notifies_once(ledger: Ledger) -> None:
    await ledger.top_up("acme", 20, "t1")
    await ledger.set_low_balance_threshold("acme", 10)

    for i in range(4):  # 20 -> 15 -> 10 -> 5 (crossing) -> 0
        await ledger.reserve("acme", f"m{i}", MessageClass.OTP)

    assert await crossings(ledger) == [{"tenant_id": "acme", "threshold": 10, "available": 5}]


async def test_a_release_back_above_the_threshold_does_not_rearm(ledger: Ledger) -> None:
    await ledger.top_up("acme", 12, "t1")
    await ledger.set_low_balance_threshold("acme", 10)
    await ledger.reserve("acme", "m1", MessageClass.OTP)  # 7: crossing
    await ledger.release("m1")  # back to 12
    await ledger.reserve("acme", "m2", MessageClass.OTP)  # 7 again: no new crossing

    assert len(await crossings(ledger)) == 1


async def test_a_top_up_above_the_threshold_rearms_it(ledger: Ledger) -> None:
    await ledger.top_up("acme", 12, "t1")
    await ledger.set_low_balance_threshold("acme", 10)
    await ledger.reserve("acme", "m1", MessageClass.OTP)  # 7: crossing
    await ledger.top_up("acme", 1, "t2")  # 8: still below, stays disarmed
    await ledger.reserve("acme", "m2", MessageClass.BULK)  # 7
    await ledger.top_up("acme", 10, "t3")  # 17: re-armed
    await ledger.reserve("acme", "m3", MessageClass.TRANSACTIONAL)  # 14
    await ledger.reserve("acme", "m4", MessageClass.OTP)  # 9: second crossing

    assert [c["available"] for c in await crossings(ledger)] == [7, 9]


async def test_setting_a_threshold_above_the_balance_notifies_at_once(ledger: Ledger) -> None:
    await ledger.top_up("acme", 5, "t1")

    balance = await ledger.set_low_balance_threshold("acme", 10)
    await ledger.set_low_balance_threshold("acme", 10)

    assert balance == Balance("acme", available=5, held=0, spent=0, low_balance_threshold=10)
    assert len(await crossings(ledger)) == 1


async def test_published_notifications_are_not_handed_out_again(ledger: Ledger) -> None:
    await ledger.top_up("acme", 5, "t1")
    await ledger.set_low_balance_threshold("acme", 10)

    pending = await ledger.pending_notifications()
    await ledger.mark_notifications_published(n.notification_id for n in pending)

    assert len(pending) == 1
    assert await ledger.pending_notifications() == []


async def test_no_threshold_means_no_notifications(ledger: Ledger) -> None:
    await ledger.top_up("acme", 5, "t1")
    await ledger.set_low_balance_threshold("acme", 10)
    await ledger.set_low_balance_threshold("acme", None)
    await ledger.mark_notifications_published(n.notification_id for n in await ledger.pending_notifications())

    await ledger.reserve("acme", "m1", MessageClass.OTP)

    assert await crossings(ledger) == []


async def test_a_negative_threshold_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidAmount):
        await ledger.set_low_balance_threshold("acme", -1)
