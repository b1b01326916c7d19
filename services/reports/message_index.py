"""Finding our message from what a provider's callback says about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from libs.common.suppressions import normalise_email


@dataclass(frozen=True)
class MessageRef:
    """The message a delivery event is about."""

    tenant_id: str
    message_id: str
    message_class: str


async def resolve_message(conn: psycopg.AsyncConnection, provider: str, provider_message_id: str,
                          recipient: str, message_id: str, tenant_id: str = "") -> MessageRef | None:
    """The message a callback is about: by the provider's message id (recorded from SENT events), else by our
    own id when the callback carries it back (and, when it carries our tenant id too, only if that matches).
    None while neither is known."""
    if provider_message_id:
        cur = await conn.execute(
            """SELECT p.tenant_id, p.message_id, p.recipient, coalesce(m.message_class, '')
               FROM reports.provider_messages p
               LEFT JOIN reports.messages m USING (tenant_id, message_id)
               WHERE p.provider = %s AND p.provider_message_id = %s LIMIT 1000""",
            (provider, provider_message_id),
        )
        ref = pick_by_recipient(await cur.fetchall(), recipient)
        if ref is not None:
            return ref
    if message_id:
        cur = await conn.execute(
            "SELECT tenant_id, message_id, message_class FROM reports.messages WHERE message_id = %s LIMIT 2",
            (message_id,),
        )
        rows = await cur.fetchall()
        # Ids are UUIDs; two tenants sharing one would make the callback ambiguous.
        if len(rows) == 1 and (not tenant_id or rows[0][0] == tenant_id):
            return MessageRef(*rows[0])
    return None


def pick_by_recipient(rows: Sequence[tuple[Any, ...]], recipient: str) -> MessageRef | None:
    """Choose among (tenant, message, recipient, class) rows sharing one provider id (batch sends put many of our
    messages under one provider id): the only row, else the one for ``recipient``, else one without a recipient."""
    if not rows:
        return None
    if len(rows) == 1:
        tenant_id, message_id, _recipient, message_class = rows[0]
        return MessageRef(tenant_id, message_id, message_class)
    wanted = normalise_email(recipient)
    for wanted_recipient in (wanted, ""):
        for tenant_id, message_id, row_recipient, message_class in rows:
            if row_recipient == wanted_recipient:
                return MessageRef(tenant_id, message_id, message_class)
    return None
