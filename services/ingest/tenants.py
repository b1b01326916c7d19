"""Tenants and API keys: keys are shown once, stored as hashes, scoped, listable and revocable.

Key format: ``esp_live_<key id>_<secret>``; ``esp_live_<key id>`` is the recognisable, non-secret prefix used to
find the key, and only sha256(secret) is stored (the secret has 192 bits of entropy, so a slow hash adds nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.auth import PLATFORM_ADMIN, Principal
from libs.common.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from services.ingest.model import TenantPolicy
from services.ingest.validation import RESERVED_HEADER_PREFIX, RESERVED_HEADERS, header_name_ok

T = TypeVar("T")
log = logging.getLogger(__name__)

TOUCH_INTERVAL_S = 60.0
"""A key's last use is written at most this often per replica: a busy key costs Postgres nothing."""

KEY_PREFIX = "esp_live_"
SCOPES = ("send", "read", "admin")
_KEY_SHAPE = re.compile(r"^esp_live_([a-z0-9]{12})_([A-Za-z0-9_-]{32})$")
_SECRET_ALPHABET = string.ascii_letters + string.digits
_TENANT_ID = re.compile(r"^[a-z][a-z0-9-]{2,62}$")


@dataclass(frozen=True)
class ApiKeyRecord:
    """A stored key, without its secret."""

    id: str
    tenant_id: str
    display_name: str
    scopes: tuple[str, ...]
    revoked: bool
    created_at: datetime
    last_used_at: datetime | None

    @property
    def prefix(self) -> str:
        """The key's non-secret, recognisable prefix (``esp_live_<key id>``), shown in listings."""
        return KEY_PREFIX + self.id


@dataclass(frozen=True)
class Tenant:
    """A customer account and its sending policy."""

    id: str
    display_name: str
    policy: TenantPolicy
    created_at: datetime


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _tenant_from_row(row: Mapping[str, Any]) -> Tenant:
    policy = TenantPolicy(
        tenant_id=str(row["id"]),
        rate_per_second={
            "otp": float(row["otp_rate_per_second"]),
            "transactional": float(row["transactional_rate_per_second"]),
            "bulk": float(row["bulk_rate_per_second"]),
        },
        daily_quota=int(row["daily_quota"]),
        large_attachment_policy=str(row["large_attachment_policy"]),
        allowed_headers=frozenset(row["allowed_headers"]),
        disabled=bool(row["disabled"]),
    )
    return Tenant(str(row["id"]), str(row["display_name"]), policy, row["created_at"])


class TenantStore:
    """Tenants and keys in Postgres, with a short in-process cache for the per-request key check."""

    def __init__(self, pool: AsyncConnectionPool, *, cache_ttl_s: float = 2.0, admin_token: str = "") -> None:
        self.pool = pool
        self.cache_ttl_s = cache_ttl_s
        self.admin_token = admin_token
        self._keys: dict[str, tuple[float, bytes, Principal, bool, bool]] = {}
        self._tenants: dict[str, tuple[float, Tenant]] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._touched: dict[str, float] = {}
        self._touching: set[asyncio.Future[None]] = set()

    # -- tenants ---------------------------------------------------------------------------------------------
    async def create_tenant(self, tenant_id: str, display_name: str = "", *, daily_quota: int = 0,
                            rates: Mapping[str, float] | None = None, large_attachment_policy: str = "link",
                            allowed_headers: tuple[str, ...] = ()) -> Tenant:
        """Create a tenant with its sending policy; INVALID_ARGUMENT for a bad id or policy, ALREADY_EXISTS when the id
        is taken."""
        if not _TENANT_ID.match(tenant_id):
            raise InvalidArgument("bad tenant id", field_violations=[FieldViolation(
                "tenant_id", "3 to 63 characters: lowercase letters, digits and dashes, starting with a letter")])
        rates = rates or {}
        _check_policy({"daily_quota": daily_quota, "large_attachment_policy": large_attachment_policy,
                       "allowed_headers": allowed_headers,
                       **{f"{c}_rate_per_second": r for c, r in rates.items()}})
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """INSERT INTO ingest.tenants (id, display_name, daily_quota, otp_rate_per_second,
                       transactional_rate_per_second, bulk_rate_per_second, large_attachment_policy, allowed_headers)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id""",
                (tenant_id, display_name, daily_quota, rates.get("otp", 0), rates.get("transactional", 0),
                 rates.get("bulk", 0), large_attachment_policy, list(allowed_headers)),
            )
            if await cur.fetchone() is None:
                raise AlreadyExists(f"tenant {tenant_id!r} exists", reason="TENANT_EXISTS")
        return await self.get_tenant(tenant_id, fresh=True)

    async def update_tenant(self, tenant_id: str, **changes: object) -> Tenant:
        """Change the given fields (names that are not tenant fields are ignored) and return the tenant as stored;
        NOT_FOUND for an unknown tenant, INVALID_ARGUMENT for a bad policy. This replica's cache is dropped; the
        others see the change within ``cache_ttl_s``."""
        allowed = {"display_name", "daily_quota", "otp_rate_per_second", "transactional_rate_per_second",
                   "bulk_rate_per_second", "large_attachment_policy", "allowed_headers", "disabled"}
        sets = {k: v for k, v in changes.items() if k in allowed}
        _check_policy(sets)
        if sets:
            assignments = ", ".join(f"{k} = %s" for k in sets)
            async with self.pool.connection() as conn:
                cur = await conn.execute(f"UPDATE ingest.tenants SET {assignments} WHERE id = %s RETURNING id",
                                         (*sets.values(), tenant_id))
                if await cur.fetchone() is None:
                    raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")
        self._tenants.pop(tenant_id, None)
        return await self.get_tenant(tenant_id, fresh=True)

    async def get_tenant(self, tenant_id: str, *, fresh: bool = False) -> Tenant:
        """The tenant, from the cache unless it is older than ``cache_ttl_s`` (or ``fresh`` asks for Postgres)."""
        cached = self._tenants.get(tenant_id)
        if cached and not fresh and time.monotonic() - cached[0] < self.cache_ttl_s:
            return cached[1]
        if fresh:
            return await self._load_tenant(tenant_id)
        return await _single_flight(self._loading, ("tenant", tenant_id), lambda: self._load_tenant(tenant_id))

    async def _load_tenant(self, tenant_id: str) -> Tenant:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM ingest.tenants WHERE id = %s", (tenant_id,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")
        tenant = _tenant_from_row(row)
        self._tenants[tenant_id] = (time.monotonic(), tenant)
        return tenant

    async def list_tenants(self, limit: int, after: str = "") -> list[Tenant]:
        """Up to ``limit`` tenants with ids after ``after``, in id order, read from Postgres."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM ingest.tenants WHERE id > %s ORDER BY id LIMIT %s", (after, limit))
            return [_tenant_from_row(r) for r in await cur.fetchall()]

    # -- keys ------------------------------------------------------------------------------------------------
    async def create_key(self, tenant_id: str, scopes: tuple[str, ...], display_name: str = "") -> tuple[
            ApiKeyRecord, str]:
        """Create a key; return it and its full secret, which is never available again."""
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise InvalidArgument("bad scopes", field_violations=[FieldViolation(
                "api_key.scopes", f"one or more of {', '.join(SCOPES)}")])
        await self.get_tenant(tenant_id)
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        # Letters and digits only (190 bits): the whole key selects with one double-click.
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))
        async with self.pool.connection() as conn:
            await conn.execute(
                """INSERT INTO ingest.api_keys (id, tenant_id, display_name, secret_sha256, scopes)
                   VALUES (%s, %s, %s, %s, %s)""",
                (key_id, tenant_id, display_name, _hash(secret), list(scopes)),
            )
        record = await self.get_key(tenant_id, key_id)
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        """One key of the tenant, without its secret; NOT_FOUND when the tenant has no such key."""
        keys = await self._select_keys("tenant_id = %s AND id = %s", (tenant_id, key_id), 1)
        if not keys:
            raise NotFound(f"API key {key_id!r} not found", reason="API_KEY_NOT_FOUND")
        return keys[0]

    async def list_keys(self, tenant_id: str, limit: int, after: str = "") -> list[ApiKeyRecord]:
        """Up to ``limit`` of the tenant's keys with ids after ``after``, in id order, revoked ones included."""
        return await self._select_keys("tenant_id = %s AND id > %s", (tenant_id, after), limit)

    async def _select_keys(self, where: str, args: tuple[object, ...], limit: int) -> list[ApiKeyRecord]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT id, tenant_id, display_name, scopes, revoked_at, created_at, last_used_at
                    FROM ingest.api_keys WHERE {where} ORDER BY id LIMIT %s""", (*args, limit))
            rows = await cur.fetchall()
        return [ApiKeyRecord(r["id"], r["tenant_id"], r["display_name"], tuple(r["scopes"]),
                             r["revoked_at"] is not None, r["created_at"], r["last_used_at"]) for r in rows]

    async def revoke_key(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        """Revoke a key (a second revocation keeps the first time) and return it; NOT_FOUND when the tenant has no such
        key. This replica forgets it at once; the others within ``cache_ttl_s``."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = %s AND id = %s",
                (tenant_id, key_id),
            )
        self._keys.pop(key_id, None)
        return await self.get_key(tenant_id, key_id)

    async def authenticate(self, presented: str) -> Principal:
        """The principal of a presented key or admin token; UNAUTHENTICATED for anything else."""
        if self.admin_token and hmac.compare_digest(presented.encode(), self.admin_token.encode()):
            return Principal(tenant_id="", scopes=frozenset({PLATFORM_ADMIN}), key_id="admin")
        match = _KEY_SHAPE.match(presented)
        if match is None:
            raise Unauthenticated("malformed API key", reason="INVALID_API_KEY")
        key_id, secret = match.groups()
        cached = self._keys.get(key_id)
        if cached is None or time.monotonic() - cached[0] >= self.cache_ttl_s:
            # Concurrent requests with an expired key share one lookup (no stampede on Postgres).
            cached = await _single_flight(self._loading, ("key", key_id), lambda: self._load_key(key_id))
        _at, digest, principal, revoked, disabled = cached
        if not hmac.compare_digest(digest, _hash(secret)):
            raise Unauthenticated("unknown API key", reason="INVALID_API_KEY")
        if revoked:
            raise Unauthenticated("this API key was revoked", reason="API_KEY_REVOKED")
        if disabled:
            raise PermissionDenied("this tenant is disabled", reason="TENANT_DISABLED")
        now = time.monotonic()
        if now - self._touched.get(key_id, -TOUCH_INTERVAL_S) >= TOUCH_INTERVAL_S:
            self._touched[key_id] = now
            touch = asyncio.ensure_future(self._touch(key_id))
            self._touching.add(touch)
            touch.add_done_callback(self._touching.discard)
        return principal

    async def _touch(self, key_id: str) -> None:
        """Record that the key was used (shown in listings as last_used_time)."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute("UPDATE ingest.api_keys SET last_used_at = now() WHERE id = %s", (key_id,))
        except Exception:
            log.warning("could not record the use of key %s", key_id, exc_info=True)

    async def _load_key(self, key_id: str) -> tuple[float, bytes, Principal, bool, bool]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT k.secret_sha256, k.tenant_id, k.scopes, k.revoked_at IS NOT NULL, t.disabled
                   FROM ingest.api_keys k JOIN ingest.tenants t ON t.id = k.tenant_id WHERE k.id = %s""",
                (key_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise Unauthenticated("unknown API key", reason="INVALID_API_KEY")
        digest, tenant_id, scopes, revoked, disabled = row
        loaded = (time.monotonic(), bytes(digest), Principal(tenant_id, frozenset(scopes), key_id), bool(revoked),
                  bool(disabled))
        self._keys[key_id] = loaded
        return loaded


def _check_policy(fields: Mapping[str, object]) -> None:
    """Refuse policy values the accept path could not apply (INVALID_ARGUMENT naming each)."""
    problems: list[FieldViolation] = []
    for name, value in fields.items():
        if name.endswith("_rate_per_second") and not (isinstance(value, int | float) and 0 <= value < math.inf):
            problems.append(FieldViolation(f"tenant.{name}", "a finite number >= 0 (0 = the platform default)"))
        elif name == "daily_quota" and not (isinstance(value, int) and value >= 0):
            problems.append(FieldViolation("tenant.daily_quota", "an integer >= 0 (0 = unlimited)"))
        elif name == "large_attachment_policy" and value not in ("link", "reject"):
            problems.append(FieldViolation("tenant.large_attachment_policy", "link or reject"))
        elif name == "allowed_headers":
            for header in value:  # type: ignore[attr-defined]
                if not header_name_ok(header) or header.lower() in RESERVED_HEADERS or header.lower().startswith(
                        RESERVED_HEADER_PREFIX):
                    problems.append(FieldViolation("tenant.allowed_headers", f"{header!r} cannot be allowed"))
    if problems:
        raise InvalidArgument("invalid tenant settings", reason="INVALID_TENANT", field_violations=problems)


async def _single_flight(loading: dict[tuple[str, str], asyncio.Future[Any]], key: tuple[str, str],
                         load: Callable[[], Awaitable[T]]) -> T:
    """Run ``load`` once for all concurrent callers asking for ``key``."""
    running = loading.get(key)
    if running is None:
        running = asyncio.ensure_future(load())
        loading[key] = running
        running.add_done_callback(lambda done: (loading.pop(key, None), done.cancelled() or done.exception()))
    return cast(T, await asyncio.shield(running))
