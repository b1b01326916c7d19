"""Builders for EVENTS stream envelopes as ingest and the sender publish them, and small async test helpers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2

T = TypeVar("T")

CLASSES = {
    "otp": common_pb2.MESSAGE_CLASS_OTP,
    "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
    "bulk": common_pb2.MESSAGE_CLASS_BULK,
}


def new_id(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4()}"


def at(hour: int, minute: int = 0, second: int = 0, *, day: int = 1) -> datetime:
    """A fixed moment in March 2024 (UTC), so stats land in known hours."""
    return datetime(2024, 3, day, hour, minute, second, tzinfo=UTC)


def _event(event_type: int, when: datetime, **fields: object) -> messages_pb2.MessageEvent:
    event = messages_pb2.MessageEvent(event_id=str(fields.pop("event_id", new_id("ev-"))), type=event_type,
                                      **fields)  # type: ignore[arg-type]
    event.event_time.FromDatetime(when)
    return event


def accepted(tenant: str, message_id: str, when: datetime, *, message_class: str = "transactional",
             to: Sequence[str] = ("alice@example.com",), tags: Sequence[str] = (), subject: str = "Hello",
             credits: int = 3, event_id: str | None = None, campaign: str = "") -> queue_pb2.EventEnvelope:
    """The ACCEPTED event ingest publishes, with the message as accepted (``campaign``: "campaigns/{id}")."""
    message = messages_pb2.Message(
        name=f"messages/{message_id}", id=message_id, message_class=CLASSES[message_class],
        state=messages_pb2.MESSAGE_STATE_ACCEPTED,
        to=[common_pb2.EmailAddress(email=a, name=a.split("@")[0].title()) for a in to],
        subject=subject, tags=list(tags), metadata={"order": "42"}, request_id=f"req-{message_id}",
        credits=credits, campaign=campaign,
    )
    getattr(message, "from").CopyFrom(common_pb2.EmailAddress(email="shop@example.net", name="Shop"))
    message.create_time.FromDatetime(when)
    event = _event(messages_pb2.MESSAGE_EVENT_TYPE_ACCEPTED, when, event_id=event_id or new_id("ev-"),
                   message=f"messages/{message_id}")
    return queue_pb2.EventEnvelope(tenant_id=tenant, message_id=message_id, event=event,
                                   message_class=CLASSES[message_class], message=message)


def sender_event(tenant: str, message_id: str, event_type: int, when: datetime, *,
                 message_class: str = "transactional", final: bool = False, **fields: object,
                 ) -> queue_pb2.EventEnvelope:
    """An event as the sender (or a webhook) publishes it: ATTEMPTED, SENT, DEFERRED, FAILED, DELIVERED ..."""
    event = _event(event_type, when, message=f"messages/{message_id}", **fields)
    return queue_pb2.EventEnvelope(tenant_id=tenant, message_id=message_id, event=event,
                                   message_class=CLASSES[message_class], final=final)


def attempted(tenant: str, message_id: str, when: datetime, *, provider: str, latency_ms: int,
              outcome: int = messages_pb2.ATTEMPT_OUTCOME_ACCEPTED, attempt: int = 1,
              message_class: str = "transactional") -> queue_pb2.EventEnvelope:
    return sender_event(tenant, message_id, messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED, when, provider=provider,
                        latency_ms=latency_ms, outcome=outcome, attempt=attempt, message_class=message_class)


def sent(tenant: str, message_id: str, when: datetime, *, provider: str, provider_message_id: str,
         message_class: str = "transactional") -> queue_pb2.EventEnvelope:
    return sender_event(tenant, message_id, messages_pb2.MESSAGE_EVENT_TYPE_SENT, when, provider=provider,
                        provider_message_id=provider_message_id, message_class=message_class, final=True)


async def eventually(probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 15.0,
                     what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy (bounded by ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: T | None = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s}s (last: {last!r})")
