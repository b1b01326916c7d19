"""A cancelled campaign's email releases its credit hold: the ledger's outcome consumer reads the final CANCELLED
event the sender publishes as a failure (nothing was sent, nothing is charged)."""

from __future__ import annotations

import asyncio

from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, credits_pb2, messages_pb2

from libs.common.jetstream import publish
from services.ledger.models import FinalOutcome
from services.ledger.outcome_consumer import outcome_of
from tests.ledger_service.test_ledger_service import ADMIN, LedgerService, ledger_service  # noqa: F401 - fixture


def _cancelled_event(tenant: str, hold_id: str, *, final: bool = True) -> queue_pb2.EventEnvelope:
    return queue_pb2.EventEnvelope(
        tenant_id=tenant, message_id=hold_id, hold_id=hold_id, final=final,
        message_class=common_pb2.MESSAGE_CLASS_BULK,
        event=messages_pb2.MessageEvent(event_id=f"{hold_id}:cancelled", reason="campaign cancelled",
                                        type=messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED))


def test_a_final_cancelled_event_is_a_failed_outcome_for_its_hold():
    outcome = outcome_of(_cancelled_event("acme", "m-9"))

    assert outcome is not None
    assert (outcome.event_id, outcome.hold_id, outcome.outcome) == ("m-9:cancelled", "m-9", FinalOutcome.FAILED)
    assert outcome_of(_cancelled_event("acme", "m-9", final=False)) is None


async def test_a_cancelled_event_releases_the_hold(ledger_service: LedgerService):  # noqa: F811 - the fixture
    await ledger_service.stub.TopUp(credits_pb2.TopUpRequest(tenant="tenants/gamma", amount=50, request_id="t1"),
                                    metadata=ADMIN)
    await ledger_service.stub.ReserveCredits(credits_pb2.ReserveCreditsRequest(
        tenant="tenants/gamma", hold_id="m-3", message_class=common_pb2.MESSAGE_CLASS_BULK))
    await publish(ledger_service.js, ledger_service.topology.events_subject("gamma", final=True),
                  _cancelled_event("gamma", "m-3").SerializeToString(), msg_id="m-3:cancelled")

    deadline = asyncio.get_running_loop().time() + 10
    while True:
        balance = await ledger_service.stub.GetBalance(credits_pb2.GetBalanceRequest(tenant="tenants/gamma"),
                                                       metadata=ADMIN)
        if balance.held == 0 and balance.available == 50:
            break
        assert asyncio.get_running_loop().time() < deadline, f"hold not released: {balance}"
        await asyncio.sleep(0.05)
    assert balance.spent == 0
