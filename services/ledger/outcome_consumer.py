"""The settlement worker's consumer of final outcome events: it turns each JetStream batch into ledger outcome events
(sent → commit the hold, failed for good or cancelled → release it) and settles them with one
:meth:`Ledger.apply_outcomes <services.ledger.ledger.Ledger.apply_outcomes>` call (the settling itself is
:mod:`services.ledger.outcomes`)."""

from __future__ import annotations

import logging

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from nats.aio.msg import Msg

from services.ledger.errors import LedgerError
from services.ledger.ledger import Ledger
from services.ledger.models import FinalOutcome, OutcomeEvent

log = logging.getLogger(__name__)

_OUTCOME_OF = {
    messages_pb2.MESSAGE_EVENT_TYPE_SENT: FinalOutcome.SENT,
    messages_pb2.MESSAGE_EVENT_TYPE_FAILED: FinalOutcome.FAILED,
    messages_pb2.MESSAGE_EVENT_TYPE_DEAD_LETTERED: FinalOutcome.FAILED,
    # Dropped before any provider had it (its campaign was cancelled): nothing was sent, the hold is released.
    messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED: FinalOutcome.FAILED,
}


def outcome_of(envelope: queue_pb2.EventEnvelope) -> OutcomeEvent | None:
    """The ledger-relevant outcome an event carries, if any (only final sent, failed and cancelled events move
    credits)."""
    outcome = _OUTCOME_OF.get(envelope.event.type)
    if outcome is None or not envelope.final:
        return None
    return OutcomeEvent(envelope.event.event_id, envelope.hold_id or envelope.message_id, outcome)


class OutcomeConsumer:
    """Handles one JetStream batch in one ledger transaction, then acks; a failure leaves the batch unacked."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def handle(self, msgs: list[Msg]) -> None:
        """Settle the final outcomes among ``msgs`` in one transaction, then ack them all."""
        events: list[OutcomeEvent] = []
        for msg in msgs:
            try:
                envelope = queue_pb2.EventEnvelope.FromString(msg.data)
            except Exception:
                log.error("dropping an undecodable event on %s", msg.subject)
                continue
            event = outcome_of(envelope)
            if event is not None:
                events.append(event)
        if events:
            for result in await self.ledger.apply_outcomes(events):
                if isinstance(result, LedgerError):
                    # A malformed event will never apply; redelivering it would only block the stream.
                    log.error("outcome event refused: %s", result.message, extra={"reason": result.reason})
        for msg in msgs:
            await msg.ack()
