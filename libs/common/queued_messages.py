"""The public summary of a queued email, as its ``ACCEPTED`` event carries it to reports: built from the SendTask by
every producer of queued email (ingest for single sends, the campaigns expander for campaign emails)."""

from __future__ import annotations

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["accepted_event", "message_resource"]


def message_resource(task: queue_pb2.SendTask, *, credits: int, request_id: str = "",
                     state: int = messages_pb2.MESSAGE_STATE_ACCEPTED, send_time: Timestamp | None = None,
                     campaign_id: str = "", subject: str | None = None) -> messages_pb2.Message:
    """The public Message for an accepted task (created when it was accepted); with a ``send_time``, a scheduled
    one (state SCHEDULED unless ``state`` says otherwise). ``subject`` is the rendered one when the task travels
    with placeholders (a campaign's email sent unrendered)."""
    if send_time is not None and state == messages_pb2.MESSAGE_STATE_ACCEPTED:
        state = messages_pb2.MESSAGE_STATE_SCHEDULED
    message = messages_pb2.Message(name=f"messages/{task.message_id}", id=task.message_id,
                                   message_class=task.message_class, state=state,
                                   subject=task.subject if subject is None else subject, credits=credits)
    if campaign_id:
        message.campaign = f"campaigns/{campaign_id}"
    getattr(message, "from").CopyFrom(getattr(task, "from"))
    if task.to:
        message.to.extend(task.to)
    if task.cc:
        message.cc.extend(task.cc)
    if task.bcc:
        message.bcc.extend(task.bcc)
    if task.tags:
        message.tags.extend(task.tags)
    if task.metadata:
        message.metadata.update(task.metadata)
    if task.attachments:
        message.attachment_ids.extend(a.attachment_id for a in task.attachments)
    if request_id:
        message.request_id = request_id
    message.create_time.CopyFrom(task.accepted_time)
    message.update_time.CopyFrom(task.accepted_time)
    if send_time is not None:
        message.send_time.CopyFrom(send_time)
    return message


def accepted_event(task: queue_pb2.SendTask, message: messages_pb2.Message,
                   attributes: dict[str, str] | None = None) -> queue_pb2.EventEnvelope:
    """The ACCEPTED event, carrying the message summary for the status store (and, in ``attributes``, decisions
    taken at accept, such as attachments sent as links)."""
    envelope = queue_pb2.EventEnvelope(tenant_id=task.tenant_id, message_id=task.message_id,
                                       message_class=task.message_class, hold_id=task.message_id)
    envelope.message.CopyFrom(message)
    event = envelope.event
    event.event_id = f"{task.message_id}:accepted"
    event.message = message.name
    event.type = messages_pb2.MESSAGE_EVENT_TYPE_ACCEPTED
    event.event_time.CopyFrom(message.create_time)
    if attributes:
        event.attributes.update(attributes)
    return envelope
