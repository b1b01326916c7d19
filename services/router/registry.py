"""The provider registry: Postgres is the truth, the KV bucket the broadcast to every replica.

A provider's secrets (credentials, webhook signing secrets) are sealed with ``ESP_SECRETS_KEYS``
(``libs.common.secret_box``) before they reach Postgres (``router.provider_credentials``) or the KV bucket; they are
opened only to validate an update and to compare Postgres with the broadcast. The admin view shows where the
credentials are kept and the names of the webhook secrets, never a value.
"""

from __future__ import annotations

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

from libs.common.errors import Aborted, AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from libs.common.message_classes import MessageClass
from libs.common.secret_box import SecretBox, SecretUnreadable
from libs.providers.errors import AdapterConfigError
from libs.providers.registry import BUILTIN_TYPES, create_adapter
from libs.routing.catalog import ProviderSpec, credentials_context, provider_config, webhook_secrets_context

log = logging.getLogger(__name__)

_ID = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
_CLASSES = frozenset(MessageClass)
_COLUMNS = ("type", "display_name", "endpoint", "region", "price_per_email_micros", "price_per_mb_micros",
            "max_message_bytes", "batch_size", "rate_limit_per_second", "daily_quota", "monthly_quota",
            "allowed_classes", "weight", "disabled", "options")


_SECRET_COLUMNS = """c.sealed_credentials, c.sealed_webhook_secrets,
                     coalesce(c.webhook_secret_names, '{}') AS webhook_secret_names"""
_NO_SECRET_COLUMNS = """NULL::bytea AS sealed_credentials, NULL::bytea AS sealed_webhook_secrets,
                        coalesce(c.webhook_secret_names, '{}') AS webhook_secret_names"""
_SPEC_FIELDS = frozenset(f.name for f in fields(ProviderSpec) if f.compare)
"""The fields a row gives (the sealed forms are the KV bucket's, not Postgres')."""
_MAX_SECRETS = 20
_MAX_SECRET_CHARS = 16_384


def create_request(spec: ProviderSpec) -> bytes:
    """Everything a create asks for (secrets included) as canonical JSON: equal requests, equal bytes. Never stored
    as it is nor as a plain hash (a weak password could be guessed offline): only its keyed
    :func:`create_fingerprint`."""
    content = {f.name: getattr(spec, f.name) for f in fields(ProviderSpec) if f.compare}
    content["allowed_classes"] = list(spec.allowed_classes)
    content["options"] = dict(spec.options)
    content["credentials"] = dict(spec.credentials)
    content["webhook_secrets"] = dict(spec.webhook_secrets)
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def create_fingerprint_context(provider_id: str) -> str:
    """The ``SecretBox`` context of a provider's create fingerprint."""
    return f"router.providers.create/{provider_id}"


def create_fingerprint(spec: ProviderSpec, box: SecretBox) -> bytes:
    """What ``router.providers.create_fingerprint`` keeps of a create with a request_id: an HMAC-SHA256 of
    :func:`create_request` under a key derived from the active KEK (:meth:`SecretBox.fingerprint`)."""
    return box.fingerprint(create_request(spec), context=create_fingerprint_context(spec.id))


_UNKEYED_FINGERPRINT_BYTES = 32
"""An earlier version stored a plain sha256 (32 bytes) of the create request; keyed fingerprints are longer (a
header naming the key, then the HMAC)."""


@dataclass(frozen=True)
class ProviderRecord:
    """A provider as the admin API shows it: everything but the credentials."""

    spec: ProviderSpec
    """Without its secrets (credentials and webhook secrets are empty here)."""
    created_at: datetime
    updated_at: datetime
    webhook_secret_names: tuple[str, ...] = ()
    """The names of the webhook secrets set, shown instead of them."""

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
    secrets = spec.webhook_secrets.items()
    if len(secrets) > _MAX_SECRETS or any(not k or len(k) > 100 or len(v) > _MAX_SECRET_CHARS for k, v in secrets):
        problems.append(FieldViolation("provider.webhook_secrets", f"at most {_MAX_SECRETS} named values of at most "
                                       f"{_MAX_SECRET_CHARS} characters"))
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


def _request_id_reused(request_id: str) -> AlreadyExists:
    return AlreadyExists("request_id was already used for a different request", reason="REQUEST_ID_REUSED",
                         metadata={"request_id": request_id},
                         field_violations=[FieldViolation("request_id", "already used with different content",
                                                          "REQUEST_ID_REUSED")])


class ProviderRegistry:
    """CRUD over providers; every change is written to Postgres, then broadcast through the KV bucket. ``secrets``
    seals what is stored and broadcast, and opens what is read back."""

    def __init__(self, pool: AsyncConnectionPool, kv: KeyValue, secrets: SecretBox) -> None:
        self.pool = pool
        self.kv = kv
        self.secrets = secrets

    async def _row(self, conn: Any, provider_id: str, *, with_credentials: bool = False) -> dict[str, Any] | None:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT p.*, {_SECRET_COLUMNS if with_credentials else _NO_SECRET_COLUMNS}
                    FROM router.providers p LEFT JOIN router.provider_credentials c ON c.provider_id = p.id
                    WHERE p.id = %s""", (provider_id,))
            row: dict[str, Any] | None = await cur.fetchone()
            return row

    def _spec(self, row: Mapping[str, Any]) -> ProviderSpec:
        """The provider of a row, its sealed secrets opened when the row has them (SecretUnreadable if they do not
        open)."""
        data = {k: v for k, v in row.items() if k in _SPEC_FIELDS}
        data["allowed_classes"] = tuple(row["allowed_classes"])
        data["options"] = dict(row["options"])
        data["credentials"] = self._open(row.get("sealed_credentials"), credentials_context(row["id"]))
        data["webhook_secrets"] = self._open(row.get("sealed_webhook_secrets"), webhook_secrets_context(row["id"]))
        return ProviderSpec(**data)

    def _open(self, sealed: bytes | None, context: str) -> dict[str, str]:
        if not sealed:
            return {}
        opened = json.loads(self.secrets.open(bytes(sealed), context=context))
        return {str(k): str(v) for k, v in opened.items()}

    def _seal(self, values: Mapping[str, str], context: str) -> bytes | None:
        if not values:
            return None
        plaintext = json.dumps(dict(values), sort_keys=True, separators=(",", ":")).encode()
        return self.secrets.seal(plaintext, context=context)

    @staticmethod
    def _record(row: Mapping[str, Any]) -> ProviderRecord:
        data = {k: v for k, v in row.items() if k in _SPEC_FIELDS}
        data["allowed_classes"] = tuple(row["allowed_classes"])
        data["options"] = dict(row["options"])
        return ProviderRecord(ProviderSpec(**data), row["created_at"], row["updated_at"],
                              tuple(sorted(row.get("webhook_secret_names") or ())))

    async def _broadcast(self, conn: Any, provider_id: str) -> None:
        """Tell every replica. The change is already committed, so a failure here is not the caller's: it is
        logged and the router's repair loop re-broadcasts within a second or so."""
        try:
            row = await self._row(conn, provider_id, with_credentials=True)
            if row is None:
                await self.kv.delete(provider_id)
            else:
                await self.kv.put(provider_id, self._spec(row).to_json(self.secrets))
        except Exception:
            log.warning("provider broadcast failed; the repair loop will retry", exc_info=True,
                        extra={"provider": provider_id})

    async def create(self, spec: ProviderSpec, *, request_id: str = "") -> ProviderRecord:
        """Create ``spec``. With a ``request_id`` (AIP-155) a retry of the same request returns the provider it
        created; the same id with a different request is refused (ALREADY_EXISTS, ``REQUEST_ID_REUSED``).

        The request is recognised by its keyed fingerprint (:func:`create_fingerprint`), which names the KEK that
        made it: a retry after a key rotation is still recognised while that key is in ``ESP_SECRETS_KEYS``. Once
        it is dropped (or for a fingerprint an earlier version stored unkeyed, cleared at start) the retry cannot be
        told from a different request and is refused as ``REQUEST_ID_REUSED``: never a second provider (the id is
        the primary key), at worst a conflict the client resolves with a GET. A request_id that created another
        provider is refused the same way: it names one create, whatever its provider id."""
        await _validate(spec)
        fingerprint = create_fingerprint(spec, self.secrets) if request_id else None
        async with self.pool.connection() as conn:
            async with conn.transaction():
                if request_id:
                    # Creates with one request_id take turns (a transaction-scoped lock on it), so that two of them
                    # naming different providers cannot both find the request_id unused.
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                       (f"router.providers.create/{request_id}",))
                    other = await (await conn.execute(
                        "SELECT id FROM router.providers WHERE create_request_id = %s AND id <> %s LIMIT 1",
                        (request_id, spec.id))).fetchone()
                    if other is not None:
                        raise _request_id_reused(request_id)
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
                        if not (earlier[1] and self.secrets.fingerprint_matches(
                                bytes(earlier[1]), create_request(spec),
                                context=create_fingerprint_context(spec.id))):
                            raise _request_id_reused(request_id)
                        return await self.get(spec.id)  # a retry of the create that made it: the same answer
                    raise AlreadyExists(f"provider {spec.id!r} exists", reason="PROVIDER_EXISTS")
                await conn.execute(
                    """INSERT INTO router.provider_credentials
                           (provider_id, credentials, sealed_credentials, sealed_webhook_secrets, webhook_secret_names)
                       VALUES (%s, '{}', %s, %s, %s)""",
                    (spec.id, self._seal(spec.credentials, credentials_context(spec.id)),
                     self._seal(spec.webhook_secrets, webhook_secrets_context(spec.id)),
                     sorted(spec.webhook_secrets)))
            await self._broadcast(conn, spec.id)
        return await self.get(spec.id)

    async def get(self, provider_id: str) -> ProviderRecord:
        """One provider, without its secrets; NOT_FOUND when there is none."""
        async with self.pool.connection() as conn:
            row = await self._row(conn, provider_id)
        if row is None:
            raise NotFound(f"provider {provider_id!r} not found", reason="PROVIDER_NOT_FOUND")
        return self._record(row)

    async def list(self, limit: int, after: str = "", *, show_disabled: bool = True) -> list[ProviderRecord]:
        """Up to ``limit`` providers with ids after ``after``, in id order, without secrets; disabled ones only when
        ``show_disabled``."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT p.*, {_NO_SECRET_COLUMNS}
                    FROM router.providers p LEFT JOIN router.provider_credentials c ON c.provider_id = p.id
                    WHERE p.id > %s AND (%s OR NOT p.disabled) ORDER BY p.id LIMIT %s""",
                (after, show_disabled, limit))
            rows = await cur.fetchall()
        return [self._record(r) for r in rows]

    async def update(self, provider_id: str, changes: Mapping[str, Any], *, expected_version: int | None = None,
                     credentials: Mapping[str, str] | None = None,
                     webhook_secrets: Mapping[str, str] | None = None) -> ProviderRecord:
        """Apply ``changes`` (column → value) and, when given, replace the credentials (when not empty) and the
        webhook secrets (an empty mapping removes them); the result is validated as a whole (the adapter is built
        once) before anything is written, then broadcast. INVALID_ARGUMENT for an unknown column or an invalid
        result, NOT_FOUND for an unknown provider, ABORTED when ``expected_version`` is given and the stored version
        differs, FAILED_PRECONDITION when the stored secrets do not open (give new ones)."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise InvalidArgument("unknown fields in update_mask", field_violations=[
                FieldViolation("update_mask", f"cannot update {sorted(unknown)}")])
        async with self.pool.connection() as conn:
            row = await self._row(conn, provider_id, with_credentials=True)
        if row is None:
            raise NotFound(f"provider {provider_id!r} not found", reason="PROVIDER_NOT_FOUND")
        replaced = dict(row)
        if credentials:
            replaced["sealed_credentials"] = None
        if webhook_secrets is not None:
            replaced["sealed_webhook_secrets"] = None
        try:
            current = self._spec(replaced)
        except SecretUnreadable:
            raise FailedPrecondition(
                "the provider's stored secrets do not open with ESP_SECRETS_KEYS; give new credentials and webhook "
                "secrets", reason="PROVIDER_SECRETS_UNREADABLE") from None
        changed: dict[str, Any] = {k: (tuple(v) if k == "allowed_classes" else v) for k, v in changes.items()}
        updated = replace(current, **changed)
        if credentials:
            updated = replace(updated, credentials=dict(credentials))
        if webhook_secrets is not None:
            updated = replace(updated, webhook_secrets=dict(webhook_secrets))
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
                    await conn.execute(
                        """UPDATE router.provider_credentials SET credentials = '{}', sealed_credentials = %s
                           WHERE provider_id = %s""",
                        (self._seal(credentials, credentials_context(provider_id)), provider_id))
                if webhook_secrets is not None:
                    await conn.execute(
                        """UPDATE router.provider_credentials SET sealed_webhook_secrets = %s, webhook_secret_names = %s
                           WHERE provider_id = %s""",
                        (self._seal(webhook_secrets, webhook_secrets_context(provider_id)), sorted(webhook_secrets),
                         provider_id))
            await self._broadcast(conn, provider_id)
        return await self.get(provider_id)

    async def delete(self, provider_id: str, *, expected_version: int | None = None) -> None:
        """Delete a provider and its secrets, then broadcast the removal; NOT_FOUND for an unknown provider, ABORTED
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

    async def seal_stored_secrets(self) -> int:
        """At start: seal the plain credentials earlier versions stored (emptying the plain column), and re-seal
        with the active key whatever an older key of ``ESP_SECRETS_KEYS`` sealed (finishing a key rotation), and
        clear the unkeyed create fingerprints (a plain sha256 of a request, credentials included) they kept.
        Rows are locked while they are rewritten, so replicas starting together do each row once. Returns the
        number of rows rewritten; a row whose secrets do not open is logged (id only) and left as it is."""
        rewritten = 0
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                """SELECT provider_id, credentials, sealed_credentials, sealed_webhook_secrets
                   FROM router.provider_credentials ORDER BY provider_id FOR UPDATE""")
            for row in await cur.fetchall():
                provider_id = row["provider_id"]
                plain = {str(k): str(v) for k, v in (row["credentials"] or {}).items()}
                try:
                    sealed_credentials = row["sealed_credentials"]
                    if plain and not sealed_credentials:
                        sealed_credentials = self._seal(plain, credentials_context(provider_id))
                    elif sealed_credentials and self.secrets.needs_reseal(bytes(sealed_credentials)):
                        context = credentials_context(provider_id)
                        sealed_credentials = self._seal(self._open(sealed_credentials, context), context)
                    sealed_webhooks = row["sealed_webhook_secrets"]
                    if sealed_webhooks and self.secrets.needs_reseal(bytes(sealed_webhooks)):
                        context = webhook_secrets_context(provider_id)
                        sealed_webhooks = self._seal(self._open(sealed_webhooks, context), context)
                except SecretUnreadable:
                    log.error("a provider's stored secrets do not open with ESP_SECRETS_KEYS; left as they are",
                              extra={"provider": provider_id})
                    continue
                if (plain or sealed_credentials != row["sealed_credentials"]
                        or sealed_webhooks != row["sealed_webhook_secrets"]):
                    await conn.execute(
                        """UPDATE router.provider_credentials
                           SET credentials = '{}', sealed_credentials = %s, sealed_webhook_secrets = %s
                           WHERE provider_id = %s""", (sealed_credentials, sealed_webhooks, provider_id))
                    rewritten += 1
            cleared = await conn.execute(
                """UPDATE router.providers SET create_fingerprint = NULL
                   WHERE length(create_fingerprint) = %s""", (_UNKEYED_FINGERPRINT_BYTES,))
        if rewritten:
            log.warning("provider secrets sealed with the active key", extra={"providers": rewritten})
        if cleared.rowcount:
            log.warning("unkeyed create fingerprints an earlier version stored were cleared (a retry of those creates "
                        "is refused as REQUEST_ID_REUSED)", extra={"providers": cleared.rowcount})
        return rewritten

    async def _wanted(self) -> tuple[dict[str, ProviderSpec], set[str]]:
        """Every provider as Postgres has it, secrets opened, and the ids of those whose secrets do not open."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"""SELECT p.*, {_SECRET_COLUMNS} FROM router.providers p
                                  LEFT JOIN router.provider_credentials c ON c.provider_id = p.id""")
            rows = await cur.fetchall()
        wanted: dict[str, ProviderSpec] = {}
        unreadable: set[str] = set()
        for row in rows:
            try:
                wanted[row["id"]] = self._spec(row)
            except SecretUnreadable:
                unreadable.add(row["id"])
        if unreadable:
            log.error("providers whose stored secrets do not open with ESP_SECRETS_KEYS are not broadcast",
                      extra={"providers": sorted(unreadable)})
        return wanted, unreadable

    async def repair(self, broadcast: Mapping[str, ProviderSpec]) -> int:
        """Fix whatever the broadcast view (a catalog of the KV bucket) lacks compared with Postgres: a put or a
        delete that was lost (NATS down at the time) reaches the replicas at the next repair. Returns the number
        of keys fixed."""
        wanted, unreadable = await self._wanted()
        fixed = 0
        for stale in set(broadcast) - set(wanted) - unreadable:
            await self.kv.delete(stale)
            fixed += 1
        for pid, spec in wanted.items():
            if broadcast.get(pid) != spec:
                await self.kv.put(pid, spec.to_json(self.secrets))
                fixed += 1
        if fixed:
            log.warning("provider broadcast repaired", extra={"keys": fixed})
        return fixed

    async def resync(self) -> int:
        """Make the KV bucket match Postgres exactly (start-up, or after a lost broadcast); every value is sealed
        anew with the active key."""
        wanted, unreadable = await self._wanted()
        try:
            present = set(await self.kv.keys())
        except Exception:  # an empty bucket raises NoKeysError
            present = set()
        for stale in present - set(wanted) - unreadable:
            await self.kv.delete(stale)
        for pid, spec in wanted.items():
            await self.kv.put(pid, spec.to_json(self.secrets))
        return len(wanted)
