"""Outcome events on the EVENTS stream, published without waiting one by one and made durable together.

A delivery publishes all its events at its end and ``flush`` waits for JetStream's acks of all of them before
the emails are acked: an email is only acked once its outcome is durable. Event ids are deterministic
(``<message>:sent``, ``<message>:a:<n>``, ``<message>:rejected:<recipient>`` …) and travel as ``Nats-Msg-Id``,
so re-announcing an outcome after a crash is dropped by the stream's dedupe window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from nats.aio.client import Client as NATS

from libs.common.jetstream import AckedPublisher, Topology
from libs.common.telemetry import inject_headers
from libs.providers.model import Outcome

ATTEMPT_OUTCOME = {Outcome.ACCEPTED: messages_pb2.ATTEMPT_OUTCOME_ACCEPTED,
                   Outcome.THROTTLED: messages_pb2.ATTEMPT_OUTCOME_THROTTLED,
                   Outcome.RETRYABLE: messages_pb2.ATTEMPT_OUTCOME_RETRYABLE,
                   Outcome.PERMANENT: messages_pb2.ATTEMPT_OUTCOME_PERMANENT,
                   Outcome.AMBIGUOUS: messages_pb2.ATTEMPT_OUTCOME_AMBIGUOUS}
PUBLISH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AttemptFacts:
    """What an event says about the provider call it reports (empty for events about no call)."""

    provider: str = ""
    provider_message_id: str = ""
    attempt: int = 0
    outcome: Outcome | None = None
    latency_ms: float = 0.0
    attributes: Mapping[str, str] = field(default_factory=dict)
    provider_cost_micros: int = 0
    """On SENT: the provider's price for the email when it was sent (for cost analytics)."""


NO_ATTEMPT = AttemptFacts()


class EventPublisher:
    """Stages message events for one delivery batch; ``flush`` makes them durable."""

    def __init__(self, nc: NATS, topology: Topology, *, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.publisher = AckedPublisher(nc)
        self.topology = topology
        self.timeout_s = timeout_s
        """How long the stream may take to acknowledge a delivery's events before the delivery counts as failed."""

    def envelope(self, task: queue_pb2.SendTask, event_type: int, *, event_id: str, final: bool, reason: str,
                 facts: AttemptFacts, recipient: str = "") -> queue_pb2.EventEnvelope:
        """The event as it goes on the stream; ``recipient`` for an event about one recipient only."""
        # Fields are set one by one and only when not empty: a bulk delivery builds hundreds of these, and
        # protobuf keyword construction, empty map arguments and Timestamp.GetCurrentTime cost ~5x as much.
        envelope = queue_pb2.EventEnvelope(tenant_id=task.tenant_id, message_id=task.message_id, final=final,
                                           message_class=task.message_class, hold_id=task.message_id)
        event = envelope.event
        event.event_id = event_id
        event.message = f"messages/{task.message_id}"
        event.type = event_type
        event.event_time.seconds, event.event_time.nanos = divmod(time.time_ns(), 1_000_000_000)
        if reason:
            event.reason = reason[:1000]
        if recipient:
            event.recipient = recipient
        if facts.provider:
            event.provider = facts.provider
        if facts.provider_message_id:
            event.provider_message_id = facts.provider_message_id
        if facts.attempt:
            event.attempt = facts.attempt
        if facts.outcome:
            event.outcome = ATTEMPT_OUTCOME[facts.outcome]
        if facts.latency_ms:
            event.latency_ms = int(facts.latency_ms)
        if facts.attributes:
            event.attributes.update(facts.attributes)
        if facts.provider_cost_micros:
            envelope.provider_cost_micros = facts.provider_cost_micros
        return envelope

    async def stage(self, task: queue_pb2.SendTask, event_type: int, *, event_id: str, final: bool = False,
                    reason: str = "", facts: AttemptFacts = NO_ATTEMPT, recipient: str = "",
                    trace: Mapping[str, str] | None = None) -> asyncio.Future[None]:
        """Publish without waiting for the stream's ack; the returned future resolves when it is durable.
        ``trace`` is the trace context the email was queued with (else the current span's is used)."""
        envelope = self.envelope(task, event_type, event_id=event_id, final=final, reason=reason, facts=facts,
                                 recipient=recipient)
        headers = dict(trace) if trace else dict(inject_headers({}))
        return await self.publisher.publish(self.topology.events_subject(task.tenant_id, final=final),
                                            envelope.SerializeToString(), event_id, headers)

    async def flush(self, pending: list[asyncio.Future[None]]) -> None:
        """Wait until every staged event is durable; raises if any was not (the email must then not be acked)."""
        if not pending:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*pending), self.timeout_s)
        except BaseException:
            self.publisher.forget(pending)
            raise
