"""Reading message status and timelines, always within one tenant (another tenant's message is NOT_FOUND)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import NotFound
from services.reports.models import EventType, Mailbox, MessageEventRecord, MessageState, MessageStatus, Page
from services.reports.pagination import decode_page_token, page_of, page_size

_MESSAGE_COLUMNS = """tenant_id, message_id, state, message_class, sender, to_addrs, cc_addrs, bcc_addrs, subject,
    tags, metadata, attachment_ids, request_id, credits, campaign, provider, provider_message_id, attempts,
    create_time, update_time, accepted_seen, send_time"""
_EVENT_COLUMNS = """event_id, tenant_id, message_id, event_type, event_time, provider, provider_message_id,
    recipient, reason, attempt, outcome, latency_ms, bounce_type, url, attributes"""


class MessageReader:
    """Message status and timeline queries."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def get(self, tenant_id: str, message_id: str) -> MessageStatus:
        """One message of the tenant; NOT_FOUND when the tenant has no such message."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM reports.messages WHERE tenant_id = %s AND message_id = %s",
                (tenant_id, message_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise _not_found(message_id)
        return _message(row)

    async def list(self, tenant_id: str, requested_page_size: int, page_token: str, *,
                   state: MessageState | None = None, tag: str = "") -> Page[MessageStatus]:
        """The tenant's messages, newest first, optionally only those in ``state`` or carrying ``tag``."""
        size = page_size(requested_page_size)
        parameters = ("messages", tenant_id, state.value if state else "", tag)
        cursor = decode_page_token(page_token, parameters, 2, times=(0,))
        where = ["tenant_id = %s"]
        params: list[Any] = [tenant_id]
        if state is not None:
            where.append("state = %s")
            params.append(state.value)
        if tag:
            where.append("tags @> ARRAY[%s]::text[]")
            params.append(tag)
        if cursor is not None:
            where.append("(create_time, message_id) < (%s::timestamptz, %s)")
            params += [datetime.fromisoformat(cursor[0]), cursor[1]]
        params.append(size + 1)
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"""SELECT {_MESSAGE_COLUMNS} FROM reports.messages WHERE {' AND '.join(where)}
                    ORDER BY create_time DESC, message_id DESC LIMIT %s""",
                params,
            )
            rows = await cur.fetchall()
        return page_of(rows, size, _message, lambda last: [last.create_time.isoformat(), last.message_id], parameters)

    async def events(self, tenant_id: str, message_id: str, requested_page_size: int,
                     page_token: str) -> Page[MessageEventRecord]:
        """A message's events in the order they happened; NOT_FOUND when the tenant has no such message."""
        size = page_size(requested_page_size)
        parameters = ("events", tenant_id, message_id)
        cursor = decode_page_token(page_token, parameters, 2, times=(0,))
        where = "tenant_id = %s AND message_id = %s"
        params: list[Any] = [tenant_id, message_id]
        if cursor is not None:
            where += " AND (event_time, event_id) > (%s::timestamptz, %s)"
            params += [datetime.fromisoformat(cursor[0]), cursor[1]]
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM reports.messages WHERE tenant_id = %s AND message_id = %s", (tenant_id, message_id)
            )
            if await cur.fetchone() is None:
                raise _not_found(message_id)
            dict_cur = conn.cursor(row_factory=dict_row)
            await dict_cur.execute(
                f"""SELECT {_EVENT_COLUMNS} FROM reports.events WHERE {where}
                    ORDER BY event_time, event_id LIMIT %s""",
                [*params, size + 1],
            )
            rows = await dict_cur.fetchall()
        return page_of(rows, size, _event, lambda last: [last.event_time.isoformat(), last.event_id], parameters)


def _not_found(message_id: str) -> NotFound:
    return NotFound(f"messages/{message_id} does not exist", reason="MESSAGE_NOT_FOUND",
                    metadata={"message": f"messages/{message_id}"})


def _mailbox(value: Mapping[str, Any]) -> Mailbox:
    return Mailbox(email=str(value.get("email", "")), name=str(value.get("name", "")))


def _message(row: Mapping[str, Any]) -> MessageStatus:
    return MessageStatus(
        tenant_id=row["tenant_id"],
        message_id=row["message_id"],
        state=MessageState(row["state"]),
        message_class=row["message_class"],
        sender=_mailbox(row["sender"] or {}),
        to=tuple(_mailbox(m) for m in row["to_addrs"]),
        cc=tuple(_mailbox(m) for m in row["cc_addrs"]),
        bcc=tuple(_mailbox(m) for m in row["bcc_addrs"]),
        subject=row["subject"],
        tags=tuple(row["tags"]),
        metadata={str(k): str(v) for k, v in (row["metadata"] or {}).items()},
        attachment_ids=tuple(row["attachment_ids"]),
        request_id=row["request_id"],
        credits=row["credits"],
        campaign=row["campaign"],
        provider=row["provider"],
        provider_message_id=row["provider_message_id"],
        attempts=row["attempts"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        accepted_seen=row["accepted_seen"],
        send_time=row["send_time"],
    )


def _event(row: Mapping[str, Any]) -> MessageEventRecord:
    return MessageEventRecord(
        event_id=row["event_id"],
        tenant_id=row["tenant_id"],
        message_id=row["message_id"],
        event_type=EventType(row["event_type"]),
        event_time=row["event_time"],
        provider=row["provider"],
        provider_message_id=row["provider_message_id"],
        recipient=row["recipient"],
        reason=row["reason"],
        attempt=row["attempt"],
        outcome=row["outcome"],
        latency_ms=row["latency_ms"],
        bounce_type=row["bounce_type"],
        url=row["url"],
        attributes={str(k): str(v) for k, v in (row["attributes"] or {}).items()},
    )
