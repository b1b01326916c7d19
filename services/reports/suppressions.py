"""Suppression lists: addresses a tenant never sends to again.

Postgres (``reports.suppressions``) is the truth. Each tenant's list is mirrored in the Redis set
``libs.common.suppressions.suppression_key`` so the ingest service can refuse suppressed recipients with one
``SMISMEMBER`` at accept (``libs.common.suppressions.suppressed_among``; :func:`is_suppressed` asks it of one).
Writes keep the two in step and, when one of them fails half-way, err on the side of suppressing: additions
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
from libs.common.suppressions import normalise_email, suppressed_among, suppression_index_key, suppression_key
from services.reports.models import Page, Suppression, SuppressionReason
from services.reports.pagination import decode_page_token, page_of, page_size

log = logging.getLogger(__name__)

_REDIS_CHUNK = 1000
# Rows committed while a tenant's set was being rebuilt may be missing from the rebuilt set; every row created
# this long before the rebuild started is added again afterwards (transactions are far shorter than this).
_RESYNC_CATCH_UP = timedelta(minutes=5)
_MAX_EMAIL_LENGTH = 320


async def is_suppressed(redis: Redis, namespace: str, tenant_id: str, email: str) -> bool:
    """Whether ``email`` is on the tenant's suppression list (case-insensitive). One Redis round trip."""
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


async def add_to_redis(redis: Redis, namespace: str, emails_by_tenant: Mapping[str, Iterable[str]]) -> None:
    """``SADD`` normalised addresses to their tenants' sets in one pipeline (idempotent)."""
    pipe = redis.pipeline(transaction=False)
    written: list[str] = []
    for tenant_id, emails in emails_by_tenant.items():
        members = sorted({normalise_email(e) for e in emails})
        for start in range(0, len(members), _REDIS_CHUNK):
            pipe.sadd(suppression_key(namespace, tenant_id), *members[start:start + _REDIS_CHUNK])
        if members:
            written.append(suppression_key(namespace, tenant_id))
    if written:
        pipe.sadd(suppression_index_key(namespace), *written)
        await pipe.execute()


async def insert_suppressions(conn: psycopg.AsyncConnection, rows: Sequence[Suppression]) -> int:
    """Insert suppressions that are not there yet (an existing one keeps its first reason); returns how many
    were new. Runs in the caller's transaction."""
    if not rows:
        return 0
    ordered = sorted({(r.tenant_id, r.email): r for r in rows}.values(), key=lambda r: (r.tenant_id, r.email))
    cur = await conn.execute(
        """INSERT INTO reports.suppressions (tenant_id, email, reason, note, source_message_id)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
           ON CONFLICT (tenant_id, email) DO NOTHING""",
        (
            [r.tenant_id for r in ordered],
            [r.email for r in ordered],
            [r.reason.value for r in ordered],
            [r.note for r in ordered],
            [r.source_message_id for r in ordered],
        ),
    )
    return cur.rowcount


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
            await add_to_redis(self._redis, self._namespace, {tenant_id: [normalised]})
        return _suppression(row)

    async def ensure(self, tenant_id: str, email: str, reason: SuppressionReason, note: str = "") -> bool:
        """Suppress an address unless it already is (an existing suppression keeps its first reason); True when
        it was new. Idempotent, for requests that may be repeated (one-click unsubscribe): the Redis mirror gets
        the address either way, before the commit, so a mirror that had lost it is repaired too."""
        normalised = validated_email(email)
        async with self._pool.connection() as conn, conn.transaction():
            added = await insert_suppressions(conn, [Suppression(tenant_id, normalised, reason, note)])
            await add_to_redis(self._redis, self._namespace, {tenant_id: [normalised]})
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
        await self._redis.srem(suppression_key(self._namespace, tenant_id), normalised)


async def resync_redis(pool: AsyncConnectionPool, redis: Redis, namespace: str) -> int:
    """Rebuild every tenant's Redis set from Postgres; drop sets of tenants with no suppressions left.

    Each set is built under a temporary key and renamed over the live one, so readers never see it half-built.
    Returns the number of tenants with suppressions.
    """
    started = datetime.now(UTC)
    run = secrets.token_hex(4)
    tenants: list[str] = []
    async with pool.connection() as conn:
        # A server-side cursor streams the table instead of loading every address into memory.
        async with conn.transaction(), conn.cursor(name=f"supp_resync_{run}") as cur:
            await cur.execute("SELECT tenant_id, email FROM reports.suppressions ORDER BY tenant_id, email")
            current: str | None = None
            batch: list[str] = []
            async for tenant_id, email in cur:
                if tenant_id != current:
                    if current is not None:
                        await _finish_tenant(redis, namespace, current, run, batch)
                    current, batch = tenant_id, []
                    tenants.append(tenant_id)
                    await redis.delete(_resync_key(namespace, tenant_id, run))
                batch.append(email)
                if len(batch) >= _REDIS_CHUNK:
                    await redis.sadd(_resync_key(namespace, tenant_id, run), *batch)
                    batch = []
            if current is not None:
                await _finish_tenant(redis, namespace, current, run, batch)
        catch_up: dict[str, list[str]] = defaultdict(list)
        cur2 = await conn.execute(
            "SELECT tenant_id, email FROM reports.suppressions WHERE create_time >= %s",
            (started - _RESYNC_CATCH_UP,),
        )
        for tenant_id, email in await cur2.fetchall():
            catch_up[tenant_id].append(email)
    known = {suppression_key(namespace, t) for t in (*tenants, *catch_up)}
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


def _resync_key(namespace: str, tenant_id: str, run: str) -> str:
    return f"{suppression_key(namespace, tenant_id)}:resync:{run}"


async def _finish_tenant(redis: Redis, namespace: str, tenant_id: str, run: str, batch: list[str]) -> None:
    temporary = _resync_key(namespace, tenant_id, run)
    if batch:
        await redis.sadd(temporary, *batch)
    await redis.rename(temporary, suppression_key(namespace, tenant_id))


def _suppression(row: Mapping[str, object]) -> Suppression:
    return Suppression(
        tenant_id=str(row["tenant_id"]),
        email=str(row["email"]),
        reason=SuppressionReason(str(row["reason"])),
        note=str(row["note"]),
        source_message_id=str(row["source_message_id"]),
        create_time=row["create_time"],  # type: ignore[arg-type]
    )
