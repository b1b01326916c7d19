"""Webhook endpoints: the tenant's configuration, validated, and their signing secrets, sealed at rest.

A signing secret is generated here, shown once (create, rotate) and stored only sealed (``libs.common.secret_box``,
bound to its endpoint). Rotating adds a secret and gives the previous ones an expiry: until then deliveries carry a
signature per secret, so a receiver can switch keys without refusing a delivery.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from libs.common.event_types import unknown_event_types
from libs.common.secret_box import SecretBox
from services.webhooks.destinations import DestinationPolicy, RefusedDestination
from services.webhooks.signing import new_secret, secret_bytes

__all__ = ["MAX_BATCH_SIZE", "MAX_OVERLAP", "Endpoint", "EndpointSpec", "EndpointStore", "SigningKeys"]

MAX_BATCH_SIZE = 100
MAX_ENDPOINTS_PER_TENANT = 50
MAX_OVERLAP = timedelta(days=7)
DEFAULT_OVERLAP = timedelta(hours=24)
_TAG = re.compile(r"^[^\x00-\x1f]{1,128}$")
UPDATABLE = ("url", "description", "event_types", "tags", "enabled", "max_batch_size")


@dataclass(frozen=True)
class EndpointSpec:
    """What a tenant sets on an endpoint."""

    url: str
    description: str = ""
    event_types: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    enabled: bool = True
    max_batch_size: int = 1


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as stored."""

    id: str
    tenant_id: str
    spec: EndpointSpec
    disabled_reason: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    last_success_time: datetime | None = None
    failing_since: datetime | None = None
    pending_deliveries: int = 0
    signing_secret: str = field(default="", repr=False)
    """Set only in what create and rotate return."""


def _secret_context(endpoint_id: str) -> str:
    return f"webhooks.endpoint_secrets/{endpoint_id}"


async def validate_spec(spec: EndpointSpec, policy: DestinationPolicy, prefix: str = "webhook_endpoint") -> None:
    """INVALID_ARGUMENT naming every rule ``spec`` breaks."""
    violations: list[FieldViolation] = []
    try:
        await policy.check(spec.url)
    except RefusedDestination as exc:
        violations.append(FieldViolation(f"{prefix}.url", str(exc)))
    for name in unknown_event_types(spec.event_types):
        violations.append(FieldViolation(f"{prefix}.event_types", f"{name!r} is not an event type"))
    for tag in spec.tags:
        if not _TAG.match(tag):
            violations.append(FieldViolation(f"{prefix}.tags", "a tag is 1-128 characters without control characters"))
    if len(spec.description) > 1000:
        violations.append(FieldViolation(f"{prefix}.description", "at most 1000 characters"))
    if not 1 <= spec.max_batch_size <= MAX_BATCH_SIZE:
        violations.append(FieldViolation(f"{prefix}.max_batch_size", f"between 0 and {MAX_BATCH_SIZE}"))
    if violations:
        raise InvalidArgument("; ".join(v.description for v in violations), field_violations=violations)


_COLUMNS = """e.id, e.tenant_id, e.url, e.description, e.event_types, e.tags, e.enabled, e.disabled_reason,
    e.max_batch_size, e.create_time, e.update_time, e.last_success_time, e.failing_since,
    (SELECT count(*) FROM webhooks.deliveries d WHERE d.endpoint_id = e.id AND d.state = 'pending') AS pending"""


def _endpoint(row: Mapping[str, Any]) -> Endpoint:
    spec = EndpointSpec(row["url"], row["description"], tuple(row["event_types"]), tuple(row["tags"]),
                        row["enabled"], row["max_batch_size"])
    return Endpoint(row["id"], row["tenant_id"], spec, row["disabled_reason"], row["create_time"],
                    row["update_time"], row["last_success_time"], row["failing_since"], row["pending"])


class EndpointStore:
    """The tenant-facing operations on endpoints; every one confined to the caller's tenant."""

    def __init__(self, pool: AsyncConnectionPool, box: SecretBox, policy: DestinationPolicy,
                 keys: SigningKeys | None = None) -> None:
        self._pool = pool
        self._box = box
        self._policy = policy
        self._keys = keys

    async def create(self, tenant_id: str, spec: EndpointSpec, request_id: str = "") -> Endpoint:
        """A new endpoint with a fresh secret (returned this once). The same ``request_id`` again returns the
        endpoint it created, without its secret."""
        await validate_spec(spec, self._policy)
        endpoint_id = uuid.uuid4().hex
        secret = new_secret()
        async with self._pool.connection() as conn, conn.transaction():
            if request_id:
                earlier = await conn.execute(
                    "SELECT id FROM webhooks.endpoints WHERE tenant_id = %s AND request_id = %s",
                    (tenant_id, request_id))
                found = await earlier.fetchone()
                if found:
                    return await self.get(tenant_id, found[0])
            count = await (await conn.execute("SELECT count(*) FROM webhooks.endpoints WHERE tenant_id = %s",
                                              (tenant_id,))).fetchone()
            if count and count[0] >= MAX_ENDPOINTS_PER_TENANT:
                raise FailedPrecondition(f"a tenant has at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints",
                                         reason="TOO_MANY_ENDPOINTS")
            await conn.execute(
                """INSERT INTO webhooks.endpoints (id, tenant_id, url, description, event_types, tags, enabled,
                       max_batch_size, request_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (endpoint_id, tenant_id, spec.url, spec.description, list(spec.event_types), list(spec.tags),
                 spec.enabled, spec.max_batch_size, request_id))
            await conn.execute("INSERT INTO webhooks.endpoint_secrets (endpoint_id, sealed) VALUES (%s, %s)",
                               (endpoint_id, self._box.seal(secret.encode(), context=_secret_context(endpoint_id))))
        return replace(await self.get(tenant_id, endpoint_id), signing_secret=secret)

    async def get(self, tenant_id: str, endpoint_id: str) -> Endpoint:
        """One endpoint; NOT_FOUND when the tenant has none by that id."""
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM webhooks.endpoints e WHERE e.tenant_id = %s AND e.id = %s",
                              (tenant_id, endpoint_id))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"webhookEndpoints/{endpoint_id} not found")
        return _endpoint(row)

    async def list(self, tenant_id: str, limit: int, after: str = "") -> list[Endpoint]:
        """Up to ``limit`` endpoints with ids after ``after``, in id order."""
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT {_COLUMNS} FROM webhooks.endpoints e WHERE e.tenant_id = %s AND e.id > %s
                    ORDER BY e.id LIMIT %s""", (tenant_id, after, limit))
            return [_endpoint(row) for row in await cur.fetchall()]

    async def update(self, tenant_id: str, endpoint_id: str, changes: Mapping[str, Any]) -> Endpoint:
        """Apply ``changes`` (field → value, fields of :data:`UPDATABLE`); enabling clears the reason the platform
        disabled it for, and its failure run."""
        current = await self.get(tenant_id, endpoint_id)
        spec = replace(current.spec, **changes)
        await validate_spec(spec, self._policy)
        re_enabled = spec.enabled and not current.spec.enabled
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE webhooks.endpoints SET url = %s, description = %s, event_types = %s, tags = %s,
                       enabled = %s, max_batch_size = %s, update_time = now(),
                       disabled_reason = CASE WHEN %s THEN '' ELSE disabled_reason END,
                       failing_since = CASE WHEN %s THEN NULL ELSE failing_since END
                   WHERE tenant_id = %s AND id = %s""",
                (spec.url, spec.description, list(spec.event_types), list(spec.tags), spec.enabled,
                 spec.max_batch_size, re_enabled, re_enabled, tenant_id, endpoint_id))
            if cur.rowcount == 0:
                raise NotFound(f"webhookEndpoints/{endpoint_id} not found")
        return await self.get(tenant_id, endpoint_id)

    async def delete(self, tenant_id: str, endpoint_id: str) -> None:
        """Delete an endpoint, its secrets, queue and log."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM webhooks.endpoints WHERE tenant_id = %s AND id = %s",
                                     (tenant_id, endpoint_id))
            if cur.rowcount == 0:
                raise NotFound(f"webhookEndpoints/{endpoint_id} not found")
            for table in ("deliveries", "attempts"):
                await conn.execute(f"DELETE FROM webhooks.{table} WHERE endpoint_id = %s", (endpoint_id,))

    async def rotate(self, tenant_id: str, endpoint_id: str, overlap: timedelta | None) -> Endpoint:
        """A new secret (returned this once); the previous ones sign until ``overlap`` from now."""
        overlap = DEFAULT_OVERLAP if overlap is None else overlap
        if overlap < timedelta(0) or overlap > MAX_OVERLAP:
            raise InvalidArgument("overlap must be between 0s and 7 days",
                                  field_violations=[FieldViolation("overlap", "between 0s and 7 days")])
        await self.get(tenant_id, endpoint_id)
        secret = new_secret()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                """UPDATE webhooks.endpoint_secrets SET expire_time = least(coalesce(expire_time, 'infinity'),
                       now() + %s) WHERE endpoint_id = %s""", (overlap, endpoint_id))
            await conn.execute("INSERT INTO webhooks.endpoint_secrets (endpoint_id, sealed) VALUES (%s, %s)",
                               (endpoint_id, self._box.seal(secret.encode(), context=_secret_context(endpoint_id))))
            await conn.execute("UPDATE webhooks.endpoints SET update_time = now() WHERE id = %s", (endpoint_id,))
        if self._keys is not None:
            self._keys.forget(endpoint_id)
        return replace(await self.get(tenant_id, endpoint_id), signing_secret=secret)


class SigningKeys:
    """The key bytes each endpoint signs with now (newest first), opened from their sealed rows and cached for
    ``ttl_s`` (a rotation takes effect within it)."""

    def __init__(self, pool: AsyncConnectionPool, box: SecretBox, *, ttl_s: float = 1.0) -> None:
        self._pool = pool
        self._box = box
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, list[bytes]]] = {}

    def forget(self, endpoint_id: str) -> None:
        """Drop the cached keys of ``endpoint_id`` (rotated in this process: in effect at once here; other
        replicas see it within ``ttl_s``)."""
        self._cache.pop(endpoint_id, None)

    async def of(self, endpoint_id: str) -> Sequence[bytes]:
        """The active keys of ``endpoint_id``."""
        cached = self._cache.get(endpoint_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT sealed FROM webhooks.endpoint_secrets WHERE endpoint_id = %s
                       AND (expire_time IS NULL OR expire_time > now()) ORDER BY secret_id DESC""", (endpoint_id,))
            rows = await cur.fetchall()
        keys = [secret_bytes(self._box.open(bytes(row[0]), context=_secret_context(endpoint_id)).decode())
                for row in rows]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[endpoint_id] = (now, keys)
        return keys
