"""CancelMessage: a message is cancelled until it is handed to a provider.

1. **authorise** — the key holds the ``send`` scope and belongs to a tenant;
2. **withdraw** (Postgres, one transaction, ``MessageStore.withdraw``) — the message row is locked (another
   tenant's, or none: NOT_FOUND); while its SEND task is still held in the outbox (scheduled, not due yet) the row
   is deleted and the final CANCELLED event queued in its place: no sender ever gets the email, reports records
   CANCELLED and the ledger releases the hold. Answer: the message, state CANCELLED;
3. otherwise the SEND task is queued already: **look up its state** (reports). Sent, failed or cancelled already
   → FAILED_PRECONDITION naming the state. Else **halt it** (``libs.common.campaign_halts.cancel_message``): every
   sender drops it within 200 ms with a final CANCELLED event, unless a provider call for it is under way (then
   it is sent). Answer: the message in its current state; the CANCELLED state follows when a sender drops it.

Idempotency (AIP-155): a retry with the same ``request_id`` answers as the first cancel did. A message withdrawn
by an earlier cancel answers FAILED_PRECONDITION (state CANCELLED) to a cancel with another request_id.
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from libs.common.auth import Principal
from libs.common.campaign_halts import cancel_message
from libs.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from libs.common.jetstream import Topology
from libs.common.message_classes import MessageClass
from libs.common.outbox import OutboxRow
from libs.common.telemetry import current_traceparent
from services.ingest.payloads import cancelled_event
from services.ingest.store import CancelTarget, MessageStore

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({
    messages_pb2.MESSAGE_STATE_SENT, messages_pb2.MESSAGE_STATE_DELIVERED, messages_pb2.MESSAGE_STATE_BOUNCED,
    messages_pb2.MESSAGE_STATE_FAILED, messages_pb2.MESSAGE_STATE_COMPLAINED, messages_pb2.MESSAGE_STATE_CANCELLED,
})
"""States past which a message cannot be cancelled: a provider had it, or it ended without one."""
HALT_MARGIN_S = 3600.0
"""A halt outlives the message's useful life (``RetryPolicy.max_age_s``, counted from when it was queued: after
that a sender fails it rather than send it) by this much, for clocks that disagree."""


class MessageStates(Protocol):
    """Reports, as CancelMessage asks it where a queued message is."""

    async def state(self, tenant_id: str, message_id: str) -> int | None:
        """The message's ``esp.v1.MessageState``; None while none of its events is recorded."""
        ...


class Canceller:
    """Runs CancelMessage's steps."""

    def __init__(self, *, store: MessageStore, states: MessageStates, redis: aioredis.Redis,
                 topology: Topology) -> None:
        self.store = store
        self.states = states
        self.redis = redis
        self.topology = topology

    async def cancel(self, principal: Principal, name: str, request_id: str = "") -> messages_pb2.Message:
        """Cancel the message ``name`` ("messages/{id}") of ``principal``'s tenant (see the module docstring)."""
        tenant_id = _authorise(principal)
        message_id = _message_id(name)
        withdrawal = await self.store.withdraw(tenant_id, message_id, request_id, self._cancelled_row)
        if withdrawal is None:
            raise NotFound(f"{name} does not exist", reason="MESSAGE_NOT_FOUND", metadata={"message": name})
        target = withdrawal.target
        if withdrawal.withdrawn:
            # Withdrawn before any sender had it. The halt only covers a crash of the publisher between its publish
            # and its delete, after which the row (withdrawn now) would already have been queued.
            await self._halt(target, quietly=True)
            return target.answer(messages_pb2.MESSAGE_STATE_CANCELLED)
        if request_id and target.cancel_request_id == request_id and target.cancel_state is not None:
            return target.answer(target.cancel_state)
        if target.cancel_state == messages_pb2.MESSAGE_STATE_CANCELLED:
            raise not_cancellable(name, messages_pb2.MESSAGE_STATE_CANCELLED)
        state = await self.states.state(tenant_id, message_id)
        if state is None:  # queued a moment ago: reports has not recorded its ACCEPTED event yet
            state = target.message.state
        if state in FINAL_STATES:
            raise not_cancellable(name, state)
        await self._halt(target, quietly=False)
        if request_id:
            await self.store.record_cancel(tenant_id, message_id, request_id, state)
        return target.answer(state)

    def _cancelled_row(self, task: queue_pb2.SendTask) -> OutboxRow:
        event = cancelled_event(task, "message cancelled")
        return OutboxRow(self.topology.events_subject(task.tenant_id, final=True), event.event.event_id,
                         event.SerializeToString(), traceparent=current_traceparent())

    async def _halt(self, target: CancelTarget, *, quietly: bool) -> None:
        """Have every sender drop the message for as long as it could still reach one."""
        lifetime_s = MessageClass.from_proto(target.task.message_class).policy.retry.max_age_s + HALT_MARGIN_S
        try:
            await cancel_message(self.redis, target.task.message_id, lifetime_s=lifetime_s,
                                 namespace=self.topology.namespace)
        except Exception:
            if not quietly:
                raise
            log.warning("could not mirror the cancellation of %s to the senders", target.task.message_id,
                        exc_info=True)


def _authorise(principal: Principal) -> str:
    principal.require("send")
    if not principal.tenant_id:
        raise PermissionDenied("cancelling acts for a tenant: use one of the tenant's API keys",
                               reason="TENANT_KEY_REQUIRED")
    return principal.tenant_id


def _message_id(name: str) -> str:
    message_id = name.removeprefix("messages/")
    if message_id == name or not message_id or "/" in message_id:
        raise InvalidArgument("name must look like messages/{id}",
                              field_violations=[FieldViolation("name", "expected messages/{id}")])
    return message_id


def not_cancellable(name: str, state: int) -> FailedPrecondition:
    """The error for a message past cancelling, naming its state."""
    state_name = messages_pb2.MessageState.Name(state)
    return FailedPrecondition(
        f"{name} cannot be cancelled: it is {state_name.removeprefix('MESSAGE_STATE_')}",
        reason="MESSAGE_NOT_CANCELLABLE", metadata={"message": name, "state": state_name})
