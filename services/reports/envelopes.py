"""The EVENTS stream's wire format (``esp.internal.v1.EventEnvelope``) to and from the reports domain.

Every producer (ingest, sender, this service's webhook receiver) publishes EventEnvelope protobufs; this module
is the only place the consumer and the receiver touch those messages.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.message_classes import class_name_of, proto_of
from libs.providers.events import DeliveryEvent, EventKind
from services.reports.models import AcceptedMessage, EventType, Mailbox, MessageEventRecord

_EVENT_TYPE_PREFIX = "MESSAGE_EVENT_TYPE_"
_OUTCOME_PREFIX = "ATTEMPT_OUTCOME_"

_EVENT_TYPE_BY_KIND: dict[EventKind, EventType] = {
    EventKind.DELIVERED: EventType.DELIVERED,
    EventKind.BOUNCED: EventType.BOUNCED,
    EventKind.DEFERRED: EventType.DEFERRED,
    EventKind.REJECTED: EventType.REJECTED,
    EventKind.COMPLAINED: EventType.COMPLAINED,
    EventKind.OPENED: EventType.OPENED,
    EventKind.CLICKED: EventType.CLICKED,
    EventKind.UNSUBSCRIBED: EventType.UNSUBSCRIBED,
}


class UndecodableEvent(ValueError):
    """A stream message that is not a usable EventEnvelope (it can never succeed: drop it)."""


def event_type_name(event_type: EventType) -> str:
    """The MessageEventType name of a domain event type (protobuf constructors take enum names)."""
    return _EVENT_TYPE_PREFIX + event_type.value.upper()


def timestamp_to_datetime(stamp: Timestamp) -> datetime:
    """An aware UTC datetime from a protobuf Timestamp (``Timestamp.ToDatetime`` exactly, without its checks)."""
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Enum names resolved once: the consumer decodes every event of the stream, and protobuf's Name() lookups and
# the domain enums' constructors were a visible part of that.
_EVENT_TYPES: dict[int, EventType] = {
    value: EventType(name.removeprefix(_EVENT_TYPE_PREFIX).lower())
    for name, value in messages_pb2.MessageEventType.items() if value != messages_pb2.MESSAGE_EVENT_TYPE_UNSPECIFIED
}
_OUTCOMES: dict[int, str] = {
    value: name.removeprefix(_OUTCOME_PREFIX).lower() for name, value in messages_pb2.AttemptOutcome.items()
}
_OUTCOMES[0] = ""


def decode_envelope(payload: bytes, fallback_event_id: str = "") -> MessageEventRecord:
    """Decode one stream message.

    Args:
        payload: the serialised EventEnvelope.
        fallback_event_id: used when the producer left ``event.event_id`` empty (the Nats-Msg-Id header, say);
            without either, a digest of the payload, so a replay of the same bytes is still a duplicate.

    Raises:
        UndecodableEvent: the payload is not an EventEnvelope, or lacks the tenant, message or event type.
    """
    envelope = queue_pb2.EventEnvelope()
    try:
        envelope.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise UndecodableEvent(f"not an EventEnvelope: {exc}") from exc
    event = envelope.event
    tenant_id, message_id = envelope.tenant_id, envelope.message_id
    if not tenant_id or not message_id:
        raise UndecodableEvent("EventEnvelope without tenant_id or message_id")
    event_type = _EVENT_TYPES.get(event.type)
    if event_type is None:
        if event.type == messages_pb2.MESSAGE_EVENT_TYPE_UNSPECIFIED:
            raise UndecodableEvent("EventEnvelope without an event type")
        raise UndecodableEvent(f"unknown event type {event.type}")
    event_id = event.event_id or fallback_event_id or "sha256:" + hashlib.sha256(payload).hexdigest()
    message_class = class_name_of(envelope.message_class)
    accepted = None
    try:
        event_time = timestamp_to_datetime(event.event_time) if event.HasField("event_time") else datetime.now(UTC)
        if event_type is EventType.ACCEPTED and envelope.HasField("message"):
            accepted = _accepted(envelope.message, message_class, event_time)
            message_class = accepted.message_class or message_class
    except OverflowError as exc:  # a timestamp outside datetime's range
        raise UndecodableEvent(f"EventEnvelope with an impossible time: {exc}") from exc
    record = _record(event, tenant_id, message_id, event_id, event_type, event_time, message_class, accepted)
    if envelope.provider_cost_micros:
        record = record._replace(provider_cost_micros=envelope.provider_cost_micros)
    return record


def record_from_message_event(event: messages_pb2.MessageEvent, tenant_id: str, message_id: str,
                              message_class: str) -> MessageEventRecord:
    """A domain event from a MessageEvent whose tenant and message were found later (unmatched webhooks)."""
    event_type = EventType(messages_pb2.MessageEventType.Name(event.type).removeprefix(_EVENT_TYPE_PREFIX).lower())
    return _record(event, tenant_id, message_id, event.event_id, event_type,
                   timestamp_to_datetime(event.event_time), message_class, None)


def _record(event: messages_pb2.MessageEvent, tenant_id: str, message_id: str, event_id: str,
            event_type: EventType, event_time: datetime, message_class: str,
            accepted: AcceptedMessage | None) -> MessageEventRecord:
    attributes = event.attributes
    return MessageEventRecord(
        event_id=event_id,
        tenant_id=tenant_id,
        message_id=message_id,
        event_type=event_type,
        event_time=event_time,
        message_class=message_class,
        provider=event.provider,
        provider_message_id=event.provider_message_id,
        recipient=event.recipient,
        reason=event.reason,
        attempt=event.attempt,
        outcome=_OUTCOMES.get(event.outcome) or "",
        latency_ms=event.latency_ms,
        bounce_type=event.bounce_type,
        url=event.url,
        attributes=dict(attributes) if attributes else {},
        accepted=accepted,
    )


def _mailbox(address: common_pb2.EmailAddress) -> Mailbox:
    return Mailbox(email=address.email, name=address.name)


def _accepted(message: messages_pb2.Message, envelope_class: str, event_time: datetime) -> AcceptedMessage:
    metadata = message.metadata
    return AcceptedMessage(
        message_class=class_name_of(message.message_class) or envelope_class,
        sender=_mailbox(getattr(message, "from")),
        to=tuple(map(_mailbox, message.to)),
        cc=tuple(map(_mailbox, message.cc)) if message.cc else (),
        bcc=tuple(map(_mailbox, message.bcc)) if message.bcc else (),
        subject=message.subject,
        tags=tuple(message.tags),
        metadata=dict(metadata) if metadata else {},
        attachment_ids=tuple(message.attachment_ids),
        request_id=message.request_id,
        credits=message.credits,
        campaign=message.campaign,
        create_time=timestamp_to_datetime(message.create_time) if message.HasField("create_time") else event_time,
        send_time=timestamp_to_datetime(message.send_time) if message.HasField("send_time") else None,
    )


def delivery_event_id(provider_name: str, event: DeliveryEvent) -> str:
    """Our event id for a provider callback: stable across the provider's retries of the same callback, so it
    works both as the stream's Nats-Msg-Id and as the consumer's dedupe key."""
    return f"webhook:{provider_name}:{event.event_id}"


def message_event_from_delivery(provider_name: str, event: DeliveryEvent, message_id: str) -> messages_pb2.MessageEvent:
    """The MessageEvent a verified provider callback becomes."""
    attributes: dict[str, str] = {"provider_type": event.provider_type}
    if event.diagnostic:
        attributes["diagnostic"] = event.diagnostic
    if event.message_id:
        attributes["callback_message_id"] = event.message_id
    if event.tenant_id:
        attributes["callback_tenant_id"] = event.tenant_id
    proto = messages_pb2.MessageEvent(
        event_id=delivery_event_id(provider_name, event),
        message=f"messages/{message_id}" if message_id else "",
        type=event_type_name(_EVENT_TYPE_BY_KIND[event.kind]),
        provider=provider_name,
        provider_message_id=event.provider_message_id or "",
        recipient=event.recipient,
        reason=event.reason or "",
        bounce_type=event.bounce_type.value if event.bounce_type is not None else "",
        url=event.url or "",
        attributes=attributes,
    )
    proto.event_time.FromDatetime(event.occurred_at)
    return proto


def envelope_for(tenant_id: str, message_id: str, message_class: str,
                 event: messages_pb2.MessageEvent) -> queue_pb2.EventEnvelope:
    """Wrap an event of a known message for the EVENTS stream."""
    stamped = messages_pb2.MessageEvent()
    stamped.CopyFrom(event)
    stamped.message = f"messages/{message_id}"
    return queue_pb2.EventEnvelope(
        tenant_id=tenant_id,
        message_id=message_id,
        event=stamped,
        message_class=proto_of(message_class),
    )

