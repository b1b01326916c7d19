"""Suppression lists: addresses a tenant never sends to again, for every topic of its mail or for one topic.

Postgres (``reports.suppressions``) is the truth. Each tenant's suppressions of every topic are mirrored in two
Redis sets so the ingest service can refuse suppressed recipients with one ``SISMEMBER`` per recipient at accept:
``libs.common.suppressions.suppression_key`` holds every suppressed address (what bulk mail checks) and
``libs.common.suppressions.suppression_key_for_every_class`` every one whose reason is not ``unsubscribe`` (what
OTP and transactional mail check: an unsubscribe stops marketing only, ``SuppressionReason.stops_every_class``).
An address's row follows its strongest reason: an unsubscribed address that then hard-bounces or complains has its
row replaced by the stronger suppression (:func:`insert_suppressions`), so a rebuild puts it in both sets.

A suppression scoped to a topic (a one-click unsubscribe from a campaign whose unsubscribe policy names one, or a
manual one) is a row of its own, ``(tenant, email, topic)`` beside the address's row for every topic, and goes to
the topic's set only (``libs.common.suppressions.suppression_key_for_topic``), which bulk mail of that topic checks
(campaign expansion, the senders' re-check). Its resource name is ``suppressions/{email}~{topic}``
(:func:`suppression_id`); ``suppressions/{email}`` stays the one for every topic.
Writes keep Postgres and Redis in step and, when one of them fails half-way, err on the side of suppressing: additions
reach Redis *before* the Postgres commit, removals only *after* it. A full rebuild from Postgres
(:func:`resync_redis`) runs at service start.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from libs.common.suppressions import (
    is_topic,
    normalise_email,
    normalise_topic,
    suppressed_among,
    suppression_index_key,
    suppression_key,
    suppression_key_for_every_class,
    suppression_key_for_topic,
)
from services.reports.models import Page, Suppression, SuppressionReason
from services.reports.pagination import decode_page_token, page_of, page_size

log = logging.getLogger(__name__)

_REDIS_CHUNK = 1000
# Rows committed while a tenant's set was being rebuilt may be missing from the rebuilt set; every row created
# this long before the rebuild started is added again afterwards (transactions are far shorter than this).
_RESYNC_CATCH_UP = timedelta(minutes=5)
_MAX_EMAIL_LENGTH = 320
TOPIC_SEPARATOR = "~"
"""Between the address and the topic in a topic-scoped suppression's id (``suppressions/{email}~{topic}``): never in
a domain nor in a topic, and unreserved in URLs (RFC 3986), so the name needs no escaping."""
MAX_NOTE_CHARS = 1024
"""Longest note a client may give a suppression (the mesh's own notes, a provider and its reason, are shorter)."""
_NOT_IN_A_NOTE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters a note may not hold: NUL, which a Postgres text column cannot store at all, and the others
no one types. A note is free text, so unlike an id it may hold tabs and line breaks."""
_TOPIC_REASONS = frozenset({SuppressionReason.UNSUBSCRIBE, SuppressionReason.MANUAL})
"""The reasons a topic-scoped suppression may have: a bounce or complaint is about the address, for every topic."""


async def is_suppressed(redis: Redis, namespace: str, tenant_id: str, email: str, topic: str = "") -> bool:
    """Whether ``email`` is on the tenant's suppression list for any reason (case-insensitive), for every topic or,
    when ``topic`` is given, for that one. One Redis round trip."""
    return bool(await suppressed_among(redis, namespace, tenant_id, [email], topic=topic))


def validated_email(email: str) -> str:
    """The normalised address, or INVALID_ARGUMENT when it cannot be an address."""
    normalised = normalise_email(email)
    local, at, domain = normalised.rpartition("@")
    if (not at or not local or not domain or len(normalised) > _MAX_EMAIL_LENGTH
            or any(c.isspace() for c in normalised) or TOPIC_SEPARATOR in domain):
        raise InvalidArgument(
            f"{email!r} is not an email address",
            field_violations=[FieldViolation("suppression.email", "must be an email address")],
        )
    return normalised


def validated_topic(topic: str, field: str = "suppression.topic") -> str:
    """The normalised topic ('' for every topic), or INVALID_ARGUMENT naming ``field`` when it cannot be a topic."""
    normalised = normalise_topic(topic)
    if normalised and not is_topic(normalised):
        raise InvalidArgument(
            f"{topic!r} is not a topic",
            reason="INVALID_TOPIC",
            field_violations=[FieldViolation(field, "must be 1-64 characters of a-z, 0-9, '.', '_' and '-', "
                                                    "starting with a letter or digit")],
        )
    return normalised


def validated_note(note: str, field: str = "suppression.note") -> str:
    """``note`` when a suppression may keep it; INVALID_ARGUMENT naming ``field`` when it holds NUL or another control
    character but tab and line breaks, or is longer than ``MAX_NOTE_CHARS``."""
    if len(note) > MAX_NOTE_CHARS:
        raise InvalidArgument(f"{field} is longer than {MAX_NOTE_CHARS} characters",
                              field_violations=[FieldViolation(field, f"at most {MAX_NOTE_CHARS} characters")])
    if _NOT_IN_A_NOTE.search(note):
        raise InvalidArgument(f"{field} holds a control character",
                              field_violations=[FieldViolation(field, "no NUL or control characters but tab and "
                                                                      "line breaks")])
    return note


def suppression_id(email: str, topic: str = "") -> str:
    """The id in a suppression's resource name: the address for every topic, ``{email}~{topic}`` for one."""
    return f"{email}{TOPIC_SEPARATOR}{topic}" if topic else email


def split_suppression_id(resource_id: str) -> tuple[str, str]:
    """(normalised address, normalised topic) of a suppression id (:func:`suppression_id`); INVALID_ARGUMENT when
    the part after ``~`` is not a topic. A ``~`` is read as the separator only after the address's ``@`` (a local
    part may hold one; a domain never does)."""
    local, at, domain = resource_id.rpartition("@")
    if TOPIC_SEPARATOR not in domain:
        return normalise_email(resource_id), ""
    domain, _, topic = domain.partition(TOPIC_SEPARATOR)
    return normalise_email(f"{local}{at}{domain}"), validated_topic(topic, "name")


def _check_scope(reason: SuppressionReason, topic: str) -> None:
    """A topic-scoped suppression must be an unsubscribe or a manual one."""
    if topic and reason not in _TOPIC_REASONS:
        raise InvalidArgument(
            f"a {reason.value} suppression is for every topic; only unsubscribe and manual ones may name a topic",
            field_violations=[FieldViolation("suppression.topic", f"must be empty for reason {reason.value}")],
        )


async def add_to_redis(redis: Redis, namespace: str, suppressions: Iterable[Suppression]) -> None:
    """``SADD`` each suppression's normalised address to the Redis sets it belongs in; one pipeline, idempotent.

    A suppression for every topic goes to its tenant's set of every suppressed address and, unless its reason is
    ``unsubscribe``, to the tenant's set for every class; a topic-scoped one to its tenant's set for that topic only.
    """
    by_key: dict[str, set[str]] = defaultdict(set)
    for suppression in suppressions:
        email = normalise_email(suppression.email)
        tenant_id = suppression.tenant_id
        if suppression.topic:
            by_key[suppression_key_for_topic(namespace, tenant_id, suppression.topic)].add(email)
            continue
        by_key[suppression_key(namespace, tenant_id)].add(email)
        if suppression.reason.stops_every_class:
            by_key[suppression_key_for_every_class(namespace, tenant_id)].add(email)
    if not by_key:
        return
    pipe = redis.pipeline(transaction=False)
    for key, emails in by_key.items():
        members = sorted(emails)
        for start in range(0, len(members), _REDIS_CHUNK):
            pipe.sadd(key, *members[start:start + _REDIS_CHUNK])
    pipe.sadd(suppression_index_key(namespace), *by_key)
    await pipe.execute()


async def insert_suppressions(conn: psycopg.AsyncConnection, rows: Sequence[Suppression]) -> int:
    """Insert suppressions that are not there yet; returns how many were new. Runs in the caller's transaction.

    A suppression is one per (tenant, address, topic): a topic-scoped one is a row beside the address's row for
    every topic, and neither replaces the other. An existing suppression keeps its first reason, except that one for
    a reason stopping every class replaces an ``unsubscribe`` (which stops bulk only): the row then follows the
    strongest reason (its reason, note, source message and create time become the new one's), so a rebuild of the
    Redis sets puts the address in the set for every class, and a rebuild running meanwhile catches it up (it
    re-adds recently created rows). Within ``rows``, an address's suppression stopping every class wins over its
    unsubscribe of the same topic."""
    if not rows:
        return 0
    strongest: dict[tuple[str, str, str], Suppression] = {}
    for row in rows:
        held = strongest.get((row.tenant_id, row.email, row.topic))
        if held is None or row.reason.stops_every_class or not held.reason.stops_every_class:
            strongest[(row.tenant_id, row.email, row.topic)] = row
    ordered = sorted(strongest.values(), key=lambda r: (r.tenant_id, r.email, r.topic))
    cur = await conn.execute(
        """INSERT INTO reports.suppressions AS s (tenant_id, email, reason, note, source_message_id, topic)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
           ON CONFLICT (tenant_id, email, topic) DO UPDATE
               SET reason = excluded.reason, note = excluded.note, source_message_id = excluded.source_message_id,
                   create_time = now()
               WHERE s.reason = 'unsubscribe' AND excluded.reason <> 'unsubscribe'
           RETURNING (xmax = 0) AS inserted""",
        (
            [r.tenant_id for r in ordered],
            [r.email for r in ordered],
            [r.reason.value for r in ordered],
            [r.note for r in ordered],
            [r.source_message_id for r in ordered],
            [r.topic for r in ordered],
        ),
    )
    # xmax is 0 for a row this statement inserted, and set for one it updated (an unsubscribe made stronger).
    return sum(1 for (inserted,) in await cur.fetchall() if inserted)


class SuppressionStore:
    """The suppression list API of one tenant at a time (Postgres and Redis kept in step)."""

    def __init__(self, pool: AsyncConnectionPool, redis: Redis, namespace: str) -> None:
        self._pool = pool
        self._redis = redis
        self._namespace = namespace

    async def list(self, tenant_id: str, requested_page_size: int, page_token: str,
                   topic: str = "") -> Page[Suppression]:
        """The tenant's suppressions ordered by address (an address's suppression for every topic first, then its
        topics'); only those scoped to ``topic`` when it is given."""
        size = page_size(requested_page_size)
        topic = validated_topic(topic, "topic")
        # Unfiltered, the fingerprint is the one of tokens issued before topics existed, and their one-value cursor
        # (the last address, whose row was for every topic) resumes as (address, '').
        parameters = ("suppressions", tenant_id) + ((f"topic={topic}",) if topic else ())
        cursor = _cursor(page_token, parameters)
        after_email, after_topic = cursor if cursor else ("", "")
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            if topic:  # one topic: the partial index by topic (its predicate spelled out for generic plans)
                await cur.execute(
                    f"""SELECT {_COLUMNS} FROM reports.suppressions
                        WHERE tenant_id = %s AND topic = %s AND topic <> '' AND email > %s
                        ORDER BY email LIMIT %s""",
                    (tenant_id, topic, after_email, size + 1),
                )
            else:
                await cur.execute(
                    f"""SELECT {_COLUMNS} FROM reports.suppressions
                        WHERE tenant_id = %s AND (email, topic) > (%s, %s) ORDER BY email, topic LIMIT %s""",
                    (tenant_id, after_email, after_topic, size + 1),
                )
            rows = await cur.fetchall()
        return page_of(rows, size, _suppression, lambda last: [last.email, last.topic], parameters)

    async def get(self, tenant_id: str, email: str, topic: str = "") -> Suppression:
        """One suppression (for every topic, or scoped to ``topic``); NOT_FOUND when there is none."""
        normalised, topic = normalise_email(email), validated_topic(topic)
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"""SELECT {_COLUMNS} FROM reports.suppressions
                    WHERE tenant_id = %s AND email = %s AND topic = %s""",
                (tenant_id, normalised, topic),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"suppressions/{suppression_id(normalised, topic)} does not exist",
                           reason="SUPPRESSION_NOT_FOUND")
        return _suppression(row)

    async def create(self, tenant_id: str, email: str, reason: SuppressionReason, note: str = "",
                     topic: str = "") -> Suppression:
        """Suppress an address, for every topic or for ``topic`` only; ALREADY_EXISTS when that suppression exists
        already. A topic-scoped suppression is an unsubscribe or a manual one, and ``note`` is text a suppression may
        keep (:func:`validated_note`): INVALID_ARGUMENT otherwise."""
        normalised, topic, note = validated_email(email), validated_topic(topic), validated_note(note)
        _check_scope(reason, topic)
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"""INSERT INTO reports.suppressions (tenant_id, email, reason, note, topic)
                    VALUES (%s, %s, %s, %s, %s)
                    ON CONFLICT (tenant_id, email, topic) DO NOTHING
                    RETURNING {_COLUMNS}""",
                (tenant_id, normalised, reason.value, note, topic),
            )
            row = await cur.fetchone()
            if row is None:
                raise AlreadyExists(f"suppressions/{suppression_id(normalised, topic)} already exists",
                                    reason="SUPPRESSION_EXISTS")
            # Before the commit: if Redis is down the suppression is not created at all.
            await add_to_redis(self._redis, self._namespace,
                               [Suppression(tenant_id, normalised, reason, topic=topic)])
        return _suppression(row)

    async def ensure(self, tenant_id: str, email: str, reason: SuppressionReason, note: str = "",
                     topic: str = "") -> bool:
        """Suppress an address (for every topic, or for ``topic`` only) unless it already is (an existing
        suppression keeps its first reason); True when it was new. Idempotent, for requests that may be repeated
        (one-click unsubscribe): the Redis sets of ``reason`` and ``topic`` get the address either way, before the
        commit, so a mirror that had lost it is repaired too. A reason stopping every class replaces an existing
        ``unsubscribe`` of the same topic (:func:`insert_suppressions`)."""
        normalised, topic = validated_email(email), validated_topic(topic)
        _check_scope(reason, topic)
        suppression = Suppression(tenant_id, normalised, reason, note, topic=topic)
        async with self._pool.connection() as conn, conn.transaction():
            added = await insert_suppressions(conn, [suppression])
            await add_to_redis(self._redis, self._namespace, [suppression])
        return added > 0

    async def delete(self, tenant_id: str, email: str, topic: str = "") -> None:
        """Lift a suppression (the one for every topic, or the one scoped to ``topic``; the other stays); NOT_FOUND
        when there is none."""
        normalised, topic = normalise_email(email), validated_topic(topic)
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM reports.suppressions WHERE tenant_id = %s AND email = %s AND topic = %s",
                (tenant_id, normalised, topic),
            )
            if cur.rowcount == 0:
                raise NotFound(f"suppressions/{suppression_id(normalised, topic)} does not exist",
                               reason="SUPPRESSION_NOT_FOUND")
        # After the commit: a failure here leaves the address suppressed in Redis until the next resync, which
        # is the safe side.
        pipe = self._redis.pipeline(transaction=False)
        if topic:
            pipe.srem(suppression_key_for_topic(self._namespace, tenant_id, topic), normalised)
        else:
            pipe.srem(suppression_key(self._namespace, tenant_id), normalised)
            pipe.srem(suppression_key_for_every_class(self._namespace, tenant_id), normalised)
        await pipe.execute()


_COLUMNS = "tenant_id, email, reason, note, source_message_id, create_time, topic"
"""The columns a :class:`Suppression` is read from."""


def _cursor(page_token: str, parameters: tuple[str, ...]) -> tuple[str, str] | None:
    """The (address, topic) a listing resumes after; a token issued before topics existed (its cursor the address
    alone) resumes after the address's suppression for every topic."""
    try:
        cursor = decode_page_token(page_token, parameters, 2)
    except InvalidArgument as refused:
        try:
            legacy = decode_page_token(page_token, parameters, 1)
        except InvalidArgument:
            raise refused from None
        return (legacy[0], "") if legacy else None
    return (cursor[0], cursor[1]) if cursor else None


async def resync_redis(pool: AsyncConnectionPool, redis: Redis, namespace: str) -> int:
    """Rebuild the Redis sets of every tenant from Postgres (every address suppressed for every topic; those
    suppressed for every class; one set per topic of those suppressed for that topic); drop sets with no
    suppressions left behind them.

    Each set is built under a temporary key and renamed over the live one, so readers never see it half-built.
    Returns the number of tenants with suppressions.
    """
    started = datetime.now(UTC)
    run = secrets.token_hex(4)
    tenants: list[str] = []
    built: set[str] = set()
    async with pool.connection() as conn:
        # A server-side cursor streams the table instead of loading every address into memory.
        async with conn.transaction(), conn.cursor(name=f"supp_resync_{run}") as cur:
            await cur.execute("SELECT tenant_id, email, reason, topic FROM reports.suppressions "
                              "ORDER BY tenant_id, email, topic")
            current: str | None = None
            batches: dict[str, list[str]] = {}
            async for tenant_id, email, reason, topic in cur:
                if tenant_id != current:
                    if current is not None:
                        built |= await _finish_tenant(redis, run, batches)
                    current = tenant_id
                    batches = {key_of(namespace, tenant_id): [] for key_of in _SET_KEYS}
                    tenants.append(tenant_id)
                    await redis.delete(*(_resync_key(key, run) for key in batches))
                if topic:
                    keys = [suppression_key_for_topic(namespace, tenant_id, topic)]
                    if keys[0] not in batches:  # the tenant's first suppression of this topic
                        batches[keys[0]] = []
                        await redis.delete(_resync_key(keys[0], run))
                else:
                    keys = [suppression_key(namespace, tenant_id)]
                    if SuppressionReason(reason).stops_every_class:
                        keys.append(suppression_key_for_every_class(namespace, tenant_id))
                for key in keys:
                    batches[key].append(email)
                    if len(batches[key]) >= _REDIS_CHUNK:
                        await redis.sadd(_resync_key(key, run), *batches[key])
                        batches[key] = []
            if current is not None:
                built |= await _finish_tenant(redis, run, batches)
        cur2 = await conn.execute(
            "SELECT tenant_id, email, reason, topic FROM reports.suppressions WHERE create_time >= %s",
            (started - _RESYNC_CATCH_UP,),
        )
        catch_up = [Suppression(tenant_id, email, SuppressionReason(reason), topic=topic)
                    for tenant_id, email, reason, topic in await cur2.fetchall()]
    known = set(built)
    for suppression in catch_up:
        if suppression.topic:
            known.add(suppression_key_for_topic(namespace, suppression.tenant_id, suppression.topic))
            continue
        known.add(suppression_key(namespace, suppression.tenant_id))
        if suppression.reason.stops_every_class:
            known.add(suppression_key_for_every_class(namespace, suppression.tenant_id))
    stale = [name for name in await _written_sets(redis, namespace) if name not in known]
    if stale:
        await redis.delete(*stale)
        await redis.srem(suppression_index_key(namespace), *stale)
    if known:
        await redis.sadd(suppression_index_key(namespace), _INDEX_SENTINEL, *known)
    else:
        await redis.sadd(suppression_index_key(namespace), _INDEX_SENTINEL)
    await add_to_redis(redis, namespace, catch_up)
    log.info("suppression sets resynced", extra={"tenants": len(tenants), "dropped": len(stale)})
    return len(tenants)


_SET_KEYS = (suppression_key, suppression_key_for_every_class)
"""The key functions of a tenant's two sets of suppressions for every topic (its topics' sets are found as its rows
are read)."""

_INDEX_SENTINEL = "-"
"""A member of the index once it is complete (a resync has run since it was introduced)."""


async def _written_sets(redis: Redis, namespace: str) -> list[str]:
    """The names of the suppression sets in Redis: from the index, or — once, before any resync wrote the index —
    by scanning the keyspace (sets written before the index existed)."""
    index = suppression_index_key(namespace)
    members = {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(index)}
    if _INDEX_SENTINEL in members:
        return sorted(members - {_INDEX_SENTINEL})
    found = set(members)
    async for key in redis.scan_iter(match=suppression_key(namespace, "*"), count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        if ":resync:" not in name:
            found.add(name)
    return sorted(found)


def _resync_key(key: str, run: str) -> str:
    """Where a resync builds the set ``key`` before renaming it over the live one."""
    return f"{key}:resync:{run}"


async def _finish_tenant(redis: Redis, run: str, batches: Mapping[str, list[str]]) -> set[str]:
    """Rename the tenant's rebuilt sets over the live ones (deleting a live set that has nothing left); returns the
    keys of the sets that exist now."""
    built: set[str] = set()
    for key, batch in batches.items():
        temporary = _resync_key(key, run)
        if batch:
            await redis.sadd(temporary, *batch)
        if await redis.exists(temporary):
            await redis.rename(temporary, key)
            built.add(key)
        else:  # only unsubscribes (or topic-scoped suppressions) left: nothing in this set any more
            await redis.delete(key)
    return built


def _suppression(row: Mapping[str, object]) -> Suppression:
    return Suppression(
        tenant_id=str(row["tenant_id"]),
        email=str(row["email"]),
        reason=SuppressionReason(str(row["reason"])),
        note=str(row["note"]),
        source_message_id=str(row["source_message_id"]),
        create_time=row["create_time"],  # type: ignore[arg-type]
        topic=str(row["topic"]),
    )
