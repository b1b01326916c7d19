"""The provider registry: Postgres is the truth, the KV bucket the broadcast to every replica."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from nats.js.kv import KeyValue
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from libs.common.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound
from libs.common.message_classes import MessageClass
from libs.providers.errors import AdapterConfigError
from libs.providers.registry import BUILTIN_TYPES, create_adapter
from libs.routing.catalog import ProviderSpec, provider_config

log = logging.getLogger(__name__)

_ID = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
_CLASSES = frozenset(MessageClass)
_COLUMNS = ("type", "display_name", "endpoint", "region", "price_per_email_micros", "price_per_mb_micros",
            "max_message_bytes", "batch_size", "rate_limit_per_second", "daily_quota", "monthly_quota",
            "allowed_classes", "weight", "disabled", "options")


def create_fingerprint(spec: ProviderSpec) -> bytes:
    """sha256 of everything a create asks for (credentials included): equal requests, equal fingerprints."""
    content = {f.name: getattr(spec, f.name) for f in fields(ProviderSpec)}
    content["allowed_classes"] = list(spec.allowed_classes)
    content["options"] = dict(spec.options)
    content["credentials"] = dict(spec.credentials)
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).digest()


@dataclass(frozen=True)
class ProviderRecord:
    """A provider as the admin API shows it: everything but the credentials."""

    spec: ProviderSpec
    created_at: datetime
    updated_at: datetime

    @property
    def credentials_ref(self) -> str:
        """Where the credentials are kept (``router.provider_credentials/<id>``), shown instead of them."""
        return f"router.provider_credentials/{self.spec.id}"


async def _validate(spec: ProviderSpec) -> None:
    problems: list[FieldViolation] = []
    if not _ID.match(spec.id):
        problems.append(FieldViolation("provider_id", "2 to 63 characters: lowercase letters, digits, dashes"))
    if spec.type not in BUILTIN_TYPES:
        problems.append(FieldViolation("provider.type", f"one of {', '.join(BUILTIN_TYPES)}"))
    for name in ("price_per_email_micros", "price_per_mb_micros", "max_message_bytes", "batch_size",
                 "rate_limit_per_second", "daily_quota", "monthly_quota"):
        if getattr(spec, name) < 0:
            problems.append(FieldViolation(f"provider.{name}", "must not be negative"))
    if spec.weight <= 0:
        problems.append(FieldViolation("provider.weight", "must be > 0"))
    bad = [c for c in spec.allowed_classes if c not in _CLASSES]
    if bad:
        problems.append(FieldViolation("provider.allowed_classes", f"unknown classes {bad}"))
    timeout = spec.options.get("timeout_s")
    if timeout is not None and not _positive_number(timeout):
        problems.append(FieldViolation("provider.options", "timeout_s must be a positive number of seconds"))
    if not problems:
        problems.extend(await _adapter_problems(spec))
    if problems:
        raise InvalidArgument("invalid provider", reason="INVALID_PROVIDER", field_violations=problems)


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


async def _adapter_problems(spec: ProviderSpec) -> list[FieldViolation]:
    """Build the provider's adapter once, so a missing credential or option is refused now rather than found by
    the first email sent to it."""
    try:
        adapter = create_adapter(provider_config(spec))
    except AdapterConfigError as exc:
        return [FieldViolation("provider", str(exc))]
    await adapter.aclose()
    return []


class ProviderRegistry:
    """CRUD over providers; every change is written to Postgres, then broadcast through the KV bucket."""

    def __init__(self, pool: AsyncConnectionPool, kv: KeyValue) -> None:
        self.pool = pool
        self.kv = kv

    async def _row(self, conn: Any, provider_id: str, *, with_credentials: bool = False) -> dict[str, Any] | None:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT p.*, {'c.credentials' if with_credentials else "'{}'::jsonb AS credentials"}
                    FROM router.providers p LEFT JOIN router.provider_credentials c ON c.provider_id = p.id
                    WHERE p.id = %s""", (provider_id,))
            row: dict[str, Any] | None = await cur.fetchone()
            return row

    @staticmethod
    def _spec(row: Mapping[str, Any]) -> ProviderSpec:
        known = {f.name for f in fields(ProviderSpec)}
        data = {k: v for k, v in row.items() if k in known}
        data["allowed_classes"] = tuple(row["allowed_classes"])
        data["options"] = dict(row["options"])
        data["credentials"] = dict(row.get("credentials") or {})
        return ProviderSpec(**data)

    async def _broadcast(self, conn: Any, provider_id: str) -> None:
        """Tell every replica. The change is already committed, so a failure here is not the caller's: it is
        logged and the router's repair loop re-broadcasts within a second or so."""
        try:
            row = await self._row(conn, provider_id, with_credentials=True)
            if row is None:
                await self.kv.delete(provider_id)
            else:
                await self.kv.put(provider_id, self._spec(row).to_json())
        except Exception:
            log.warning("provider broadcast failed; the repair loop will retry", exc_info=True,
                        extra={"provider": provider_id})

    async def create(self, spec: ProviderSpec, *, request_id: str = "") -> ProviderRecord:
        """Create ``spec``. With a ``request_id`` (AIP-155) a retry of the same request returns the provider it
        created; the same id with a different request is refused (ALREADY_EXISTS, ``REQUEST_ID_REUSED``)."""
        await _validate(spec)
        fingerprint = create_fingerprint(spec) if request_id else None
        async with self.pool.connection() as conn:
            async with conn.transaction():
                values = [getattr(spec, c) for c in _COLUMNS]
                values[_COLUMNS.index("allowed_classes")] = list(spec.allowed_classes)
                values[_COLUMNS.index("options")] = Jsonb(dict(spec.options))
                cur = await conn.execute(
                    f"""INSERT INTO router.providers (id, {', '.join(_COLUMNS)}, create_request_id, create_fingerprint)
                        VALUES (%s, {', '.join(['%s'] * len(_COLUMNS))}, %s, %s)
                        ON CONFLICT (id) DO NOTHING RETURNING id""",
                    (spec.id, *values, request_id, fingerprint))
                if await cur.fetchone() is None:
                    earlier = await (await conn.execute(
                        "SELECT create_request_id, create_fingerprint FROM router.providers WHERE id = %s",
                        (spec.id,))).fetchone()
                    if request_id and earlier is not None and earlier[0] == request_id:
                        if bytes(earlier[1] or b"") != fingerprint:
                            raise AlreadyExists(
                                "request_id was already used for a different request", reason="REQUEST_ID_REUSED",
                                metadata={"request_id": request_id},
                                field_violations=[FieldViolation("request_id", "already used with different content",
                                                                 "REQUEST_ID_REUSED")])
                        return await self.get(spec.id)  # a retry of the create that made it: the same answer
                    raise AlreadyExists(f"provider {spec.id!r} exists", reason="PROVIDER_EXISTS")
                await conn.execute("INSERT INTO router.provider_credentials (provider_id, credentials) VALUES (%s, %s)",
                                   (spec.id, Jsonb(dict(spec.credentials))))
            await self._broadcast(conn, spec.id)
        return await self.get(spec.id)

    async def get(self, provider_id: str) -> ProviderRecord:
        """One provider, without its credentials; NOT_FOUND when there is none."""
        async with self.pool.connection() as conn:
            row = await self._row(conn, provider_id)
        if row is None:
            raise NotFound(f"provider {provider_id!r} not found", reason="PROVIDER_NOT_FOUND")
        return ProviderRecord(self._spec(row), row["created_at"], row["updated_at"])

    async def list(self, limit: int, after: str = "", *, show_disabled: bool = True) -> list[ProviderRecord]:
        """Up to ``limit`` providers with ids after ``after``, in id order, without credentials; disabled ones only when
        ``show_disabled``."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                """SELECT *, '{}'::jsonb AS credentials FROM router.providers
                   WHERE id > %s AND (%s OR NOT disabled) ORDER BY id LIMIT %s""", (after, show_disabled, limit))
            rows = await cur.fetchall()
        return [ProviderRecord(self._spec(r), r["created_at"], r["updated_at"]) for r in rows]

    async def update(self, provider_id: str, changes: Mapping[str, Any], *, expected_version: int | None = None,
                     credentials: Mapping[str, str] | None = None) -> ProviderRecord:
        """Apply ``changes`` (column → value) and, when given, replace the credentials; the result is validated as a
        whole (the adapter is built once) before anything is written, then broadcast. INVALID_ARGUMENT for an unknown
        column or an invalid result, NOT_FOUND for an unknown provider, ABORTED when ``expected_version`` is given and
        the stored version differs."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise InvalidArgument("unknown fields in update_mask", field_violations=[
                FieldViolation("update_mask", f"cannot update {sorted(unknown)}")])
        async with self.pool.connection() as conn:
            row = await self._row(conn, provider_id, with_credentials=True)
        if row is None:
            raise NotFound(f"provider {provider_id!r} not found", reason="PROVIDER_NOT_FOUND")
        changed: dict[str, Any] = {k: (tuple(v) if k == "allowed_classes" else v) for k, v in changes.items()}
        updated = replace(self._spec(row), **changed)
        if credentials:
            updated = replace(updated, credentials=dict(credentials))
        await _validate(updated)
        async with self.pool.connection() as conn:
            async with conn.transaction():
                sets = [f"{k} = %s" for k in changes]
                values = [list(v) if k == "allowed_classes" else Jsonb(dict(v)) if k == "options" else v
                          for k, v in changes.items()]
                cur = await conn.execute(
                    f"""UPDATE router.providers SET {', '.join([*sets, 'version = version + 1', 'updated_at = now()'])}
                        WHERE id = %s AND (%s::bigint IS NULL OR version = %s::bigint) RETURNING id""",
                    (*values, provider_id, expected_version, expected_version))
                if await cur.fetchone() is None:
                    raise Aborted("the provider changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
                if credentials:
                    await conn.execute("UPDATE router.provider_credentials SET credentials = %s WHERE provider_id = %s",
                                       (Jsonb(dict(credentials)), provider_id))
            await self._broadcast(conn, provider_id)
        return await self.get(provider_id)

    async def delete(self, provider_id: str, *, expected_version: int | None = None) -> None:
        """Delete a provider and its credentials, then broadcast the removal; NOT_FOUND for an unknown provider, ABORTED
        when ``expected_version`` is given and the stored version differs."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """DELETE FROM router.providers WHERE id = %s AND (%s::bigint IS NULL OR version = %s::bigint)
                   RETURNING id""", (provider_id, expected_version, expected_version))
            if await cur.fetchone() is None:
                await self.get(provider_id)  # NOT_FOUND when it does not exist
                raise Aborted("the provider changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
            await conn.commit()
            await self._broadcast(conn, provider_id)

    async def repair(self, broadcast: Mapping[str, ProviderSpec]) -> int:
        """Fix whatever the broadcast view (a catalog of the KV bucket) lacks compared with Postgres: a put or a
        delete that was lost (NATS down at the time) reaches the replicas at the next repair. Returns the number
        of keys fixed."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("""SELECT p.*, c.credentials FROM router.providers p
                                 LEFT JOIN router.provider_credentials c ON c.provider_id = p.id""")
            rows = await cur.fetchall()
        wanted = {r["id"]: self._spec(r) for r in rows}
        fixed = 0
        for stale in set(broadcast) - set(wanted):
            await self.kv.delete(stale)
            fixed += 1
        for pid, spec in wanted.items():
            if broadcast.get(pid) != spec:
                await self.kv.put(pid, spec.to_json())
                fixed += 1
        if fixed:
            log.warning("provider broadcast repaired", extra={"keys": fixed})
        return fixed

    async def resync(self) -> int:
        """Make the KV bucket match Postgres exactly (start-up, or after a lost broadcast)."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("""SELECT p.*, c.credentials FROM router.providers p
                                 LEFT JOIN router.provider_credentials c ON c.provider_id = p.id""")
            rows = await cur.fetchall()
        wanted = {r["id"]: self._spec(r) for r in rows}
        try:
            present = set(await self.kv.keys())
        except Exception:  # an empty bucket raises NoKeysError
            present = set()
        for stale in present - set(wanted):
            await self.kv.delete(stale)
        for pid, spec in wanted.items():
            await self.kv.put(pid, spec.to_json())
        return len(wanted)

