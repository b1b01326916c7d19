"""Encoding accepted emails as the JetStream payloads (SendTask, EventEnvelope) and the idempotency hash."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.timestamps import to_timestamp
from services.ingest.model import EmailDraft, Mailbox, StoredAttachment

CLASS_TO_PROTO = {
    "otp": common_pb2.MESSAGE_CLASS_OTP,
    "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
    "bulk": common_pb2.MESSAGE_CLASS_BULK,
}
PROTO_TO_CLASS = {v: k for k, v in CLASS_TO_PROTO.items()}


def request_fingerprint(draft: EmailDraft) -> bytes:
    """sha256 of the request's content, request_id excluded: equal requests have equal fingerprints."""

    def boxes(items: tuple[Mailbox, ...]) -> list[list[str]]:
        return [[b.email, b.name] for b in items]

    content = [draft.message_class, [draft.sender.email, draft.sender.name], boxes(draft.to), boxes(draft.cc),
               boxes(draft.bcc), boxes(draft.reply_to), draft.subject, draft.text_body, draft.html_body,
               sorted(draft.headers.items()), list(draft.tags), sorted(draft.metadata.items()),
               list(draft.attachment_ids)]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()).digest()


def _addresses(boxes: tuple[Mailbox, ...]) -> list[common_pb2.EmailAddress]:
    return [common_pb2.EmailAddress(email=b.email, name=b.name) for b in boxes]



LINK_BYTES = 2048
"""Room one attachment takes as a download link (a pre-signed URL in the text and the HTML body)."""


def estimated_message_bytes(draft: EmailDraft, attachments: list[StoredAttachment], *,
                            as_links: bool = False) -> int:
    """Size of the MIME message as providers measure it: base64 grows attachments by 4/3, plus line breaks.

    With ``as_links`` the attachments count as the download links that replace them.
    """
    body = len(draft.text_body.encode()) + len(draft.html_body.encode()) + len(draft.subject.encode())
    if as_links:
        carried = LINK_BYTES * len(attachments)
    else:
        carried = sum((a.size_bytes + 2) // 3 * 4 * 78 // 76 for a in attachments)
    return 2048 + body * 4 // 3 + carried


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def accepted_now() -> tuple[datetime, Timestamp]:
    """The current time as a datetime (for Postgres) and as the equal Timestamp (for the payloads), to the
    microsecond. Built from one clock reading: ``Timestamp.FromDatetime`` costs several µs of Python per email."""
    now_us = time.time_ns() // 1000
    seconds, micros = divmod(now_us, 1_000_000)
    return _EPOCH + timedelta(microseconds=now_us), Timestamp(seconds=seconds, nanos=micros * 1000)


def build_send_task(message_id: uuid.UUID | str, tenant_id: str, draft: EmailDraft,
                    attachments: list[StoredAttachment], accepted_at: datetime | Timestamp, *,
                    attachments_as_links: bool = False) -> queue_pb2.SendTask:
    """The SEND stream payload: the whole email, so a sender needs no lookup. ``message_bytes`` is the size the
    providers will see (with links instead of attachments when ``attachments_as_links``)."""
    return queue_pb2.SendTask(
        message_id=str(message_id),
        tenant_id=tenant_id,
        message_class=CLASS_TO_PROTO[draft.message_class],
        to=_addresses(draft.to),
        cc=_addresses(draft.cc),
        bcc=_addresses(draft.bcc),
        reply_to=_addresses(draft.reply_to),
        subject=draft.subject,
        text_body=draft.text_body,
        html_body=draft.html_body,
        headers=dict(draft.headers),
        tags=list(draft.tags),
        metadata=dict(draft.metadata),
        attachments=[
            queue_pb2.AttachmentRef(attachment_id=a.id, s3_key=a.s3_key, filename=a.filename,
                                    content_type=a.content_type, size_bytes=a.size_bytes)
            for a in attachments
        ],
        message_bytes=estimated_message_bytes(draft, attachments, as_links=attachments_as_links),
        accepted_time=accepted_at if isinstance(accepted_at, Timestamp) else to_timestamp(accepted_at),
        attachments_as_links=attachments_as_links,
        **{"from": common_pb2.EmailAddress(email=draft.sender.email, name=draft.sender.name)},
    )


def message_resource(task: queue_pb2.SendTask, *, request_id: str, credits: int,
                     state: int = messages_pb2.MESSAGE_STATE_ACCEPTED) -> messages_pb2.Message:
    """The public Message for an accepted task (created when it was accepted)."""
    message = messages_pb2.Message(
        name=f"messages/{task.message_id}",
        id=task.message_id,
        message_class=task.message_class,
        state=state,
        to=task.to,
        cc=task.cc,
        bcc=task.bcc,
        subject=task.subject,
        tags=task.tags,
        metadata=task.metadata,
        attachment_ids=[a.attachment_id for a in task.attachments],
        request_id=request_id,
        credits=credits,
        create_time=task.accepted_time,
        update_time=task.accepted_time,
    )
    getattr(message, "from").CopyFrom(getattr(task, "from"))
    return message


def accepted_event(task: queue_pb2.SendTask, message: messages_pb2.Message,
                   attributes: dict[str, str] | None = None) -> queue_pb2.EventEnvelope:
    """The ACCEPTED event, carrying the message summary for the status store (and, in ``attributes``, decisions
    taken at accept, such as attachments sent as links)."""
    event = messages_pb2.MessageEvent(
        event_id=f"{task.message_id}:accepted",
        message=message.name,
        type=messages_pb2.MESSAGE_EVENT_TYPE_ACCEPTED,
        event_time=message.create_time,
        attributes=attributes or {},
    )
    return queue_pb2.EventEnvelope(
        tenant_id=task.tenant_id, message_id=task.message_id, event=event, message_class=task.message_class,
        message=message, hold_id=task.message_id,
    )
