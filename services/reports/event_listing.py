"""The events API's reads: a tenant's recorded message events, oldest first, filtered, in keyset pages.

The tenant's events are read by time (index ``events_by_tenant_time``), or one message's by its timeline index;
tag, campaign and recipient filters are applied through the message row on the way. ``events_query`` is the one
query builder, shared with the CSV export (``exports.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from psycopg_pool import AsyncConnectionPool

from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.suppressions import normalise_email
from services.reports.customer_events import CUSTOMER_TYPES
from services.reports.models import EventType, Page
from services.reports.pagination import decode_page_token, page_of, page_size

__all__ = ["EventFilter", "EventReader", "ListedEvent", "check_range", "events_query", "listed_event"]

_BY_NAME: Mapping[str, EventType] = {name: event_type for event_type, name in CUSTOMER_TYPES.items()}


@dataclass(frozen=True)
class EventFilter:
    """What ListEvents asks for; every filter given must match."""

    types: Sequence[str] = ()
    message_id: str = ""
    recipient: str = ""
    tag: str = ""
    campaign: str = ""
    """``campaigns/{id}``."""
    start_time: datetime | None = None
    end_time: datetime | None = None

    def event_types(self) -> list[str]:
        """The recorded type names asked for; INVALID_ARGUMENT naming each unknown or non-message type."""
        unknown = [t for t in self.types if t not in _BY_NAME]
        if unknown:
            raise InvalidArgument(
                f"unknown message event types: {', '.join(unknown)}",
                field_violations=[FieldViolation("types", f"{t!r} is not a message.* event type") for t in unknown])
        return sorted({_BY_NAME[t].value for t in self.types})

    def parameters(self) -> list[str]:
        """What a page token is bound to (AIP-158: the same filters on every page)."""
        bounds = [t.isoformat() if t else "" for t in (self.start_time, self.end_time)]
        return [",".join(sorted(self.types)), self.message_id, self.recipient, self.tag, self.campaign, *bounds]


class ListedEvent(NamedTuple):
    """One recorded event with what its message row says (the fields of ``customer_events.customer_event``)."""

    event_id: str
    event_type: EventType
    event_time: datetime
    message_id: str
    sequence: int
    recipient: str
    provider: str
    tags: Sequence[str]
    metadata: Mapping[str, str]
    campaign: str
    message_class: str
    reason: str
    bounce_type: str
    url: str
    attempt: int


_SELECT = """
SELECT e.event_id, e.event_type, e.event_time, e.message_id, e.seq,
       CASE WHEN e.recipient <> '' THEN e.recipient ELSE coalesce(m.to_addrs->0->>'email', '') END,
       e.provider, coalesce(m.tags, '{}'), coalesce(m.metadata, '{}'), coalesce(m.campaign, ''),
       coalesce(m.message_class, ''), e.reason, e.bounce_type, e.url, e.attempt
FROM reports.events e
LEFT JOIN reports.messages m ON m.tenant_id = e.tenant_id AND m.message_id = e.message_id
WHERE e.tenant_id = %s AND e.event_type = ANY(%s)"""


def check_range(query: EventFilter) -> None:
    """INVALID_ARGUMENT unless the range, when both ends are given, ends after it starts."""
    if query.start_time and query.end_time and query.end_time <= query.start_time:
        raise InvalidArgument("end_time must be after start_time",
                              field_violations=[FieldViolation("end_time", "must be after start_time")])


def events_query(tenant_id: str, query: EventFilter, after: tuple[datetime | str, str] | None,
                 limit: int) -> tuple[str, list[object]]:
    """The SQL and arguments reading the tenant's events matching ``query``, oldest first (time, then event id),
    after the keyset ``after`` (the last row's time and event id), at most ``limit`` rows: one page of ListEvents
    and of an export alike. INVALID_ARGUMENT for an unknown event type."""
    types = query.event_types() or sorted(t.value for t in CUSTOMER_TYPES)
    sql = _SELECT
    args: list[object] = [tenant_id, types]
    if query.message_id:
        sql += " AND e.message_id = %s"
        args.append(query.message_id)
    if query.recipient:
        # An event about one recipient matches that recipient only; a whole-message event (no recipient of
        # its own) matches any To address of its message.
        sql += """ AND CASE WHEN e.recipient <> '' THEN lower(e.recipient) = %s ELSE EXISTS (
            SELECT FROM jsonb_array_elements(m.to_addrs) AS t WHERE lower(t->>'email') = %s) END"""
        args += [normalise_email(query.recipient)] * 2
    if query.tag:
        sql += " AND %s = ANY(m.tags)"
        args.append(query.tag)
    if query.campaign:
        sql += " AND m.campaign = %s"
        args.append(query.campaign)
    if query.start_time:
        sql += " AND e.event_time >= %s"
        args.append(query.start_time)
    if query.end_time:
        sql += " AND e.event_time < %s"
        args.append(query.end_time)
    if after is not None:
        sql += " AND (e.event_time, e.event_id) > (%s::timestamptz, %s)"
        args += after
    sql += " ORDER BY e.event_time, e.event_id LIMIT %s"
    args.append(limit)
    return sql, args


class EventReader:
    """Lists a tenant's events."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def list(self, tenant_id: str, query: EventFilter, requested_size: int, token: str) -> Page[ListedEvent]:
        """One page of the tenant's events matching ``query``, oldest first (time, then event id)."""
        size = page_size(requested_size)
        parameters = [tenant_id, *query.parameters()]
        cursor = decode_page_token(token, parameters, 2, times=(0,))
        check_range(query)
        after = (cursor[0], cursor[1]) if cursor is not None else None  # Postgres reads the time's ISO form
        sql, args = events_query(tenant_id, query, after, size + 1)
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(sql, args)).fetchall()
        return page_of(rows, size, listed_event, lambda e: [e.event_time.isoformat(), e.event_id], parameters)

    async def pages(self, tenant_id: str, query: EventFilter,
                    rows_per_page: int) -> AsyncIterator[Sequence[ListedEvent]]:
        """Every event of the tenant matching ``query``, oldest first, in keyset pages of ``rows_per_page``: the
        export's read. Each page is one short query on a connection held only for it, so a slow reader holds no
        connection or transaction open; memory is one page whatever the total."""
        check_range(query)
        after: tuple[datetime | str, str] | None = None
        while True:
            sql, args = events_query(tenant_id, query, after, rows_per_page)
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql, args)).fetchall()
            if not rows:
                return
            page = [listed_event(row) for row in rows]
            yield page
            if len(rows) < rows_per_page:
                return
            after = (page[-1].event_time, page[-1].event_id)


def listed_event(row: Sequence[Any]) -> ListedEvent:
    """A row of ``events_query`` as a ListedEvent."""
    (event_id, event_type, event_time, message_id, seq, recipient, provider, tags, metadata, campaign,
     message_class, reason, bounce_type, url, attempt) = row
    return ListedEvent(event_id, EventType(event_type), event_time, message_id, seq, recipient, provider,
                       tuple(tags), metadata or {}, campaign, message_class, reason, bounce_type, url, attempt)
