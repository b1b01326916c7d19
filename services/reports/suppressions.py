"""Suppression lists: addresses a tenant never sends to again.

Postgres (``reports.suppressions``) is the truth. Each tenant's list is mirrored in two Redis sets so the ingest
service can refuse suppressed recipients with one ``SISMEMBER`` per recipient at accept:
``libs.common.suppressions.suppression_key`` holds every suppressed address (what bulk mail checks) and
``libs.common.suppressions.suppression_key_for_every_class`` every one whose reason is not ``unsubscribe`` (what
OTP and transactional mail check: an unsubscribe stops marketing only, ``SuppressionReason.stops_every_class``).
An address's row follows its strongest reason: an unsubscribed address that then hard-bounces or complains has its
row replaced by the stronger suppression (:func:`insert_suppressions`), so a rebuild puts it in both sets.
Writes keep Postgres and Redis in step and, when one of them fails half-way, err on the side of suppressing: additions
reach Redis *before* the Postgres commit, removals only *after* it. A full rebuild from Postgres
(:func:`resync_redis`) runs at service start.
"""

from __future__ import annotations

import logging
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
    normalise_email,
    suppressed_among,
    suppression_index_key,
    suppression_key,
    suppression_key_for_every_class,
)
from services.reports.models import Page, Suppression, SuppressionReason
from services.reports.pagination import decode_page_token, page_of, page_size

log = logging.getLogger(__name__)

_REDIS_CHUNK = 1000
# Rows committed while a tenant's set was being rebuilt may be missing from the rebuilt set; every row created
# this long before the rebuild started is added again afterwards (transactions are far shorter than this).
_RESYNC_CATCH_UP = timedelta(minutes=5)
_MAX_EMAIL_LENGTH = 320


async def is_suppressed(redis: Redis, namespace: str, tenant_id: str, email: str) -> bool:
    """Whether ``email`` is on the tenant's suppression list for any reason (case-insensitive). One Redis round
    trip."""
    return bool(await suppressed_among(redis, namespace, tenant_id, [email]))


def validated_email(email: str) -> str:
    """The normalised address, or INVALID_ARGUMENT when it cannot be an address."""
    normalised = normalise_email(email)
    local, at, domain = normalised.rpartition("@")
    if not at or not local or not domain or len(normalised) > _MAX_EMAIL_LENGTH or any(c.isspace() for c in normalised):
        raise InvalidArgument(
            f"{email!r} is not an email address",
            field_violations=[FieldViolation("suppression.email", "must be an email address")],
        )
    return normalised


async def add_to_redis(redis: Redis, namespace: str, suppressions: Iterable[Suppression]) -> None:
    """``SADD`` each suppression's normalised address to its tenant's set of every suppressed address and, unless
    its reason is ``unsubscribe``, to the tenant's set for every class; one pipeline, idempotent."""
    every: dict[str, set[str]] = defaultdict(set)
    every_class: dict[str, set[str]] = defaultdict(set)
    for suppression in suppressions:
        email = normalise_email(suppression.email)
        every[suppression.tenant_id].add(email)
        if suppression.reason.stops_every_class:
            every_class[suppression.tenant_id].add(email)
    pipe = redis.pipeline(transaction=False)
    written: list[str] = []
    for key_of, by_tenant in ((suppression_key, every), (suppression_key_for_every_class, every_class)):
        for tenant_id, emails in by_tenant.items():
            key = key_of(namespace, tenant_id)
            members = sorted(emails)
            for start in range(0, len(members), _REDIS_CHUNK):
                pipe.sadd(key, *members[start:start + _REDIS_CHUNK])
            written.append(key)
    if written:
        pipe.sadd(suppression_index_key(namespace), *written)
        await pipe.execute()


async def insert_suppressions(conn: psycopg.AsyncConnection, rows: Sequence[Suppression]) -> int:
    """Insert suppressions that are not there yet; returns how many were new. Runs in the caller's transaction.

    An existing suppression keeps its first reason, except that one for a reason stopping every class replaces an
    ``unsubscribe`` (which stops bulk only): the row then follows the strongest reason (its reason, note, source
    message and create time become the new one's), so a rebuild of the Redis sets puts the address in the set for
    every class, and a rebuild running meanwhile catches it up (it re-adds recently created rows). Within
    ``rows``, an address's suppression stopping every class wins over its unsubscribe."""
    if not rows:
        return 0
    strongest: dict[tuple[str, str], Suppression] = {}
    for row in rows:
        held = strongest.get((row.tenant_id, row.email))
        if held is None or row.reason.stops_every_class or not held.reason.stops_every_class:
            strongest[(row.tenant_id, row.email)] = row
    ordered = sorted(strongest.values(), key=lambda r: (r.tenant_id, r.email))
    cur = await conn.execute(
        """INSERT INTO reports.suppressions AS s (tenant_id, email, reason, note, source_message_id)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
           ON CONFLICT (tenant_id, email) DO UPDATE
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

    async def list(self, tenant_id: str, requested_page_size: int, page_token: str) -> Page[Suppression]:
        """The tenant's suppressions ordered by address."""
        size = page_size(requested_page_size)
        parameters = ("suppressions", tenant_id)
        cursor = decode_page_token(page_token, parameters, 1)
        after = cursor[0] if cursor else ""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT tenant_id, email, reason, note, source_message_id, create_time
                   FROM reports.suppressions WHERE tenant_id = %s AND email > %s ORDER BY email LIMIT %s""",
                (tenant_id, after, size + 1),
            )
            rows = await cur.fetchall()
        return page_of(rows, size, _suppression, lambda last: [last.email], parameters)

    async def get(self, tenant_id: str, email: str) -> Suppression:
        """One suppression; NOT_FOUND when the address is not suppressed."""
        normalised = normalise_email(email)
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT tenant_id, email, reason, note, source_message_id, create_time
                   FROM reports.suppressions WHERE tenant_id = %s AND email = %s""",
                (tenant_id, normalised),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"suppressions/{normalised} does not exist", reason="SUPPRESSION_NOT_FOUND")
        return _suppression(row)

    async def create(self, tenant_id: str, email: str, reason: SuppressionReason, note: str = "") -> Suppression:
        """Suppress an address; ALREADY_EXISTS when it is suppressed already."""
        normalised = validated_email(email)
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """INSERT INTO reports.suppressions (tenant_id, email, reason, note) VALUES (%s, %s, %s, %s)
                   ON CONFLICT (tenant_id, email) DO NOTHING
                   RETURNING tenant_id, email, reason, note, source_message_id, create_time""",
                (tenant_id, normalised, reason.value, note),
            )
            row = await cur.fetchone()
            if row is None:
                raise AlreadyExists(f"suppressions/{normalised} already exists", reason="SUPPRESSION_EXISTS")
            # Before the commit: if Redis is down the suppression is not created at all.
            await add_to_redis(self._redis, self._namespace, [Suppression(tenant_id, normalised, reason)])
        return _suppression(row)

    async def ensure(self, tenant_id: str, email: str, reason: SuppressionReason, note: str = "") -> bool:
        """Suppress an address unless it already is (an existing suppression keeps its first reason); True when
        it was new. Idempotent, for requests that may be repeated (one-click unsubscribe): the Redis sets of
        ``reason`` get the address either way, before the commit, so a mirror that had lost it is repaired too. A
        reason stopping every class replaces an existing ``unsubscribe`` (:func:`insert_suppressions`)."""
        normalised = validated_email(email)
        suppression = Suppression(tenant_id, normalised, reason, note)
        async with self._pool.connection() as conn, conn.transaction():
            added = await insert_suppressions(conn, [suppression])
            await add_to_redis(self._redis, self._namespace, [suppression])
        return added > 0

    async def delete(self, tenant_id: str, email: str) -> None:
        """Lift a suppression; NOT_FOUND when the address is not suppressed."""
        normalised = normalise_email(email)
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM reports.suppressions WHERE tenant_id = %s AND email = %s", (tenant_id, normalised)
            )
            if cur.rowcount == 0:
                raise NotFound(f"suppressions/{normalised} does not exist", reason="SUPPRESSION_NOT_FOUND")
        # After the commit: a failure here leaves the address suppressed in Redis until the next resync, which
        # is the safe side.
        pipe = self._redis.pipeline(transaction=False)
        pipe.srem(suppression_key(self._namespace, tenant_id), normalised)
        pipe.srem(suppression_key_for_every_class(self._namespace, tenant_id), normalised)
        await pipe.execute()


async def resync_redis(pool: AsyncConnectionPool, redis: Redis, namespace: str) -> int:
    """Rebuild both Redis sets of every tenant from Postgres (every suppressed address; those suppressed for every
    class); drop sets with no suppressions left behind them.

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
            await cur.execute("SELECT tenant_id, email, reason FROM reports.suppressions ORDER BY tenant_id, email")
            current: str | None = None
            batches: dict[str, list[str]] = {}
            async for tenant_id, email, reason in cur:
                if tenant_id != current:
                    if current is not None:
                        built |= await _finish_tenant(redis, run, batches)
                    current = tenant_id
                    batches = {key_of(namespace, tenant_id): [] for key_of in _SET_KEYS}
                    tenants.append(tenant_id)
                    await redis.delete(*(_resync_key(key, run) for key in batches))
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
            "SELECT tenant_id, email, reason FROM reports.suppressions WHERE create_time >= %s",
            (started - _RESYNC_CATCH_UP,),
        )
        catch_up = [Suppression(tenant_id, email, SuppressionReason(reason))
                    for tenant_id, email, reason in await cur2.fetchall()]
    known = built | {suppression_key(namespace, s.tenant_id) for s in catch_up}
    known |= {suppression_key_for_every_class(namespace, s.tenant_id) for s in catch_up if s.reason.stops_every_class}
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
"""The key functions of a tenant's two suppression sets."""

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
        else:  # only unsubscribes left: nothing is suppressed for every class any more
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
    )
