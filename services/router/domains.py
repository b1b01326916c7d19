"""Tenants' sending domains: Postgres is the truth, the sending-domains KV bucket the broadcast every replica reads.

A domain is added ``pending`` with an ownership token and DKIM keys the mesh generates (RSA-2048, and Ed25519 when
asked); its private keys are sealed (``ESP_SECRETS_KEYS``, bound to
``libs.common.sending_domains.signing_key_context``) before they reach Postgres or the bucket. A check looks the
records up in DNS (:func:`libs.common.domain_records.check_records`) and moves the state:

- ``pending`` / ``failed`` → ``verified`` when the ownership record and every active DKIM key's record are found
  (notified as ``domain_verified``);
- ``verified`` → ``failed`` when one of them is missing or wrong (notified as ``domain_verification_failed``);
- a DNS server that does not answer (:class:`DnsUnavailable`) changes nothing: "we could not look" is no evidence.

Rotation uses two selectors per algorithm (``esp1``/``esp2``, ``esp1e``/``esp2e`` for Ed25519): the new key is
generated under the selector the active one does not use, ``ahead`` — published first, signing nothing — and
becomes active once a check finds its record; the key it replaces is ``retired``, still published (mail it signed
may still be verified by receivers), and dropped by the next rotation.

Notifications are ``esp.internal.v1.AccountEvent`` rows in the router's outbox, written in the transaction of the
change they report and published after the commit (at least once); an event's id is stable for its transition
(the domain's version after it), so JetStream's duplicate window drops a re-publish.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as random_tokens
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import dns.asyncresolver
import idna
from esp.internal.v1 import queue_pb2
from nats.js.kv import KeyValue
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from publicsuffix2 import PublicSuffixList

from libs.common.domain_records import (
    DnsUnavailable,
    ExpectedRecord,
    Purpose,
    RecordCheck,
    RecordState,
    check_records,
    expected_records,
)
from libs.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from libs.common.jetstream import Topology
from libs.common.outbox import CommittedRow, OutboxRow
from libs.common.secret_box import SecretBox
from libs.common.sending_domains import DomainState, SendingDomain, SigningKey, domain_key, signing_key_context
from libs.common.timestamps import to_timestamp
from libs.providers.dkim import generate_key

__all__ = [
    "DOMAIN_VERIFICATION_FAILED",
    "DOMAIN_VERIFIED",
    "DomainKey",
    "DomainRegistry",
    "DomainView",
    "KeyStatus",
    "RecordView",
    "checked_domain",
]

log = logging.getLogger(__name__)

DOMAIN_VERIFIED = "domain_verified"
DOMAIN_VERIFICATION_FAILED = "domain_verification_failed"

RSA, ED25519 = "rsa-sha256", "ed25519-sha256"
SELECTORS = {RSA: ("esp1", "esp2"), ED25519: ("esp1e", "esp2e")}
"""The two selectors each algorithm's keys alternate between across rotations."""
MAX_DOMAIN_CHARS = 253
_PSL = PublicSuffixList()


class KeyStatus:
    """Where a DKIM key is in its life (the ``status`` column)."""

    ACTIVE = "active"
    AHEAD = "ahead"
    RETIRED = "retired"


@dataclass(frozen=True)
class DomainKey:
    """One DKIM key of a domain, its private half sealed."""

    selector: str
    algorithm: str
    status: str
    public_record: str
    sealed_private_key: bytes


@dataclass(frozen=True)
class RecordView:
    """A record to publish, with what the last check found (``state`` None: not looked up yet)."""

    record: ExpectedRecord
    state: RecordState | None = None
    seen: tuple[str, ...] = ()
    selector: str = ""
    algorithm: str = ""
    key_status: str = ""


@dataclass(frozen=True)
class DomainView:
    """A tenant's domain as its owner sees it."""

    tenant_id: str
    domain: str
    state: DomainState
    ed25519: bool
    records: tuple[RecordView, ...]
    created_at: datetime
    verified_at: datetime | None
    checked_at: datetime | None
    version: int


def checked_domain(text: str, field: str = "domain.domain") -> str:
    """``text`` as a domain name a tenant may own: lower-case ASCII (an internationalised name in its ``xn--``
    form), no final dot; INVALID_ARGUMENT naming ``field`` for a name that is no domain or is a public suffix
    (``com``, ``co.uk``, ``github.io``: nobody owns all the names under it)."""
    name = text.strip().rstrip(".")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii").lower() if name else ""
    except (idna.IDNAError, UnicodeError):
        ascii_name = ""
    labels = ascii_name.split(".")
    if (not ascii_name or len(ascii_name) > MAX_DOMAIN_CHARS or not all(_ldh_label(label) for label in labels)
            or labels[-1].isdigit()):
        raise InvalidArgument(f"{text[:300]!r} is not a domain name", reason="INVALID_DOMAIN",
                              field_violations=[FieldViolation(field, "a domain name such as mail.example.com")])
    # A single label is a top-level domain: a public suffix too (the list's default rule, "*").
    if _PSL.get_tld(ascii_name) == ascii_name:
        raise InvalidArgument(f"{ascii_name} is a public suffix: add a domain registered under it",
                              reason="PUBLIC_SUFFIX",
                              field_violations=[FieldViolation(field, "a public suffix (com, co.uk) is owned by no "
                                                                      "one account", "PUBLIC_SUFFIX")])
    return ascii_name


def _ldh_label(label: str) -> bool:
    return (0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
            and all(c.isascii() and (c.isalnum() or c == "-") for c in label))


class DomainRegistry:
    """Create, read, check, rotate and delete tenants' domains; every change broadcast to the KV bucket."""

    def __init__(self, pool: AsyncConnectionPool, kv: KeyValue, secrets: SecretBox, topology: Topology, *,
                 resolver: Callable[[], dns.asyncresolver.Resolver], spf_include: str,
                 on_commit: Callable[[Sequence[CommittedRow]], None] = lambda rows: None) -> None:
        """``resolver`` makes the DNS resolver a check asks; ``spf_include`` is the platform's SPF domain;
        ``on_commit`` receives the notification rows a change committed (the outbox publisher's
        ``publish_soon``)."""
        self.pool = pool
        self.kv = kv
        self.secrets = secrets
        self.topology = topology
        self.resolver = resolver
        self.spf_include = spf_include
        self.on_commit = on_commit

    # -- reads ----------------------------------------------------------------------------------------------------

    async def get(self, tenant_id: str, domain: str) -> DomainView:
        """The tenant's ``domain``; NOT_FOUND when the tenant has none such (another tenant's is never seen)."""
        async with self.pool.connection() as conn:
            view = await self._view(conn, tenant_id, domain)
        if view is None:
            raise NotFound(f"domain {domain!r} not found", reason="DOMAIN_NOT_FOUND")
        return view

    async def page(self, tenant_id: str, limit: int, after: str = "") -> list[DomainView]:
        """Up to ``limit`` of the tenant's domains named after ``after``, in name order."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("""SELECT * FROM router.domains WHERE tenant_id = %s AND domain > %s
                                 ORDER BY domain LIMIT %s""", (tenant_id, after, limit))
            rows = await cur.fetchall()
            keys = await self._keys_of(conn, tenant_id, [r["domain"] for r in rows])
        return [self._to_view(row, keys.get(row["domain"], [])) for row in rows]

    # -- changes --------------------------------------------------------------------------------------------------

    async def create(self, tenant_id: str, domain: str, *, ed25519: bool = False) -> DomainView:
        """Add ``domain`` (already :func:`checked_domain`) for the tenant, ``pending``, with new DKIM keys; the
        tenant's existing domain of that name comes back as it is (AIP-155). FAILED_PRECONDITION when another
        tenant has it verified (saying nothing of who)."""
        existing = await self._find(tenant_id, domain)
        if existing is not None:
            return existing
        await self._refuse_if_taken(tenant_id, domain)
        algorithms = (RSA, ED25519) if ed25519 else (RSA,)
        # RSA key generation takes tens of milliseconds of CPU: off the event loop.
        keys = await asyncio.to_thread(lambda: [(a, *generate_key(a)) for a in algorithms])  # type: ignore[arg-type]
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(
                        """INSERT INTO router.domains (tenant_id, domain, token, ed25519) VALUES (%s, %s, %s, %s)""",
                        (tenant_id, domain, random_tokens.token_urlsafe(24), ed25519))
                    for algorithm, pem, record in keys:
                        selector = SELECTORS[algorithm][0]
                        await self._insert_key(conn, tenant_id, domain, selector, algorithm, KeyStatus.ACTIVE, pem,
                                               record)
            except UniqueViolation:  # a concurrent create of the same domain by the same tenant won
                pass
            view = await self._view(conn, tenant_id, domain)
        assert view is not None
        await self._broadcast(view)
        return view

    async def delete(self, tenant_id: str, domain: str) -> None:
        """Remove the tenant's domain and its keys, then its KV entry; NOT_FOUND when there is none."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM router.domains WHERE tenant_id = %s AND domain = %s RETURNING 1",
                                     (tenant_id, domain))
            found = await cur.fetchone()
            await conn.commit()
        if found is None:
            raise NotFound(f"domain {domain!r} not found", reason="DOMAIN_NOT_FOUND")
        await self.kv.delete(domain_key(tenant_id, domain))

    async def rotate(self, tenant_id: str, domain: str) -> DomainView:
        """Start a key rotation: per algorithm, drop the retired key and generate a new one ``ahead`` under the
        selector the active key does not use. FAILED_PRECONDITION while a rotation's key still waits for its
        record; NOT_FOUND for an unknown domain."""
        view = await self.get(tenant_id, domain)
        algorithms = sorted({r.algorithm for r in view.records if r.key_status == KeyStatus.ACTIVE})
        new = await asyncio.to_thread(lambda: [(a, *generate_key(a)) for a in algorithms])  # type: ignore[arg-type]
        async with self.pool.connection() as conn:
            async with conn.transaction():
                row = await self._lock(conn, tenant_id, domain)
                keys = await self._keys(conn, tenant_id, domain)
                if any(k.status == KeyStatus.AHEAD for k in keys):
                    raise FailedPrecondition(
                        "a rotation is under way: publish the new key's record and verify the domain first",
                        reason="ROTATION_IN_PROGRESS", metadata={"domain": domain})
                for algorithm, pem, record in new:
                    active = next(k for k in keys if k.algorithm == algorithm and k.status == KeyStatus.ACTIVE)
                    selector = next(s for s in SELECTORS[algorithm] if s != active.selector)
                    await conn.execute("""DELETE FROM router.domain_keys
                                          WHERE tenant_id = %s AND domain = %s AND selector = %s""",
                                       (tenant_id, domain, selector))
                    await self._insert_key(conn, tenant_id, domain, selector, algorithm, KeyStatus.AHEAD, pem,
                                           record)
                await conn.execute("""UPDATE router.domains SET version = version + 1
                                      WHERE tenant_id = %s AND domain = %s""", (tenant_id, row["domain"]))
            rotated = await self._view(conn, tenant_id, domain)
        assert rotated is not None
        await self._broadcast(rotated)
        return rotated

    async def verify(self, tenant_id: str, domain: str) -> DomainView:
        """Look the domain's records up now and move its state (see the module docstring). NOT_FOUND for an
        unknown domain; :class:`DnsUnavailable` when DNS did not answer (nothing changed); FAILED_PRECONDITION
        when the records are in place but another tenant has the domain verified."""
        view = await self.get(tenant_id, domain)
        checks = await check_records([r.record for r in view.records], self.resolver())
        checked, taken = await self._apply(tenant_id, domain, checks)
        if taken:
            raise FailedPrecondition("the domain is verified by another account", reason="DOMAIN_TAKEN",
                                     metadata={"domain": domain})
        return checked

    async def check_due(self, *, limit: int, verified_interval_s: float, pending_interval_s: float,
                        lease_s: float = 120.0) -> int:
        """The periodic re-check: take up to ``limit`` domains whose next check is due (moving it ``lease_s``
        ahead, so other replicas pass them by), check each, and schedule the next one ``verified_interval_s``
        (verified and failed domains) or ``pending_interval_s`` (pending ones) later. A domain DNS did not answer
        for keeps its state and is tried again after the lease. Returns the number checked."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """UPDATE router.domains d SET next_check_at = now() + make_interval(secs => %s)
                   FROM (SELECT tenant_id, domain FROM router.domains WHERE next_check_at <= now()
                         ORDER BY next_check_at LIMIT %s FOR UPDATE SKIP LOCKED) due
                   WHERE d.tenant_id = due.tenant_id AND d.domain = due.domain
                   RETURNING d.tenant_id, d.domain""", (lease_s, limit))
            due = await cur.fetchall()
        checked = 0
        for tenant_id, domain in due:
            try:
                view = await self.get(tenant_id, domain)
                checks = await check_records([r.record for r in view.records], self.resolver())
                view, _ = await self._apply(tenant_id, domain, checks)
            except NotFound:
                continue  # deleted meanwhile
            except DnsUnavailable as exc:
                log.warning("a sending domain could not be re-checked: DNS did not answer (%s)", exc)
                continue
            interval = pending_interval_s if view.state is DomainState.PENDING else verified_interval_s
            async with self.pool.connection() as conn:
                await conn.execute("""UPDATE router.domains SET next_check_at = now() + make_interval(secs => %s)
                                      WHERE tenant_id = %s AND domain = %s""", (interval, tenant_id, domain))
            checked += 1
        return checked

    async def repair(self, broadcast: Mapping[tuple[str, str], SendingDomain]) -> int:
        """Fix whatever the broadcast view (a :class:`SendingDomains` of the bucket) lacks compared with Postgres: a
        put or a delete lost while NATS was away reaches the replicas at the next repair. Compares state and version
        only (every change bumps the version). Returns the number of entries fixed."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT tenant_id, domain, state, version FROM router.domains")
            wanted = {(t, d): (DomainState(state), int(version)) for t, d, state, version in await cur.fetchall()}
        fixed = 0
        for tenant_id, domain in set(broadcast) - set(wanted):
            if await self._find(tenant_id, domain) is None:  # not added since the read above
                await self.kv.delete(domain_key(tenant_id, domain))
                fixed += 1
        for (tenant_id, domain), (state, version) in wanted.items():
            seen = broadcast.get((tenant_id, domain))
            if seen is None or (seen.state, seen.version) != (state, version):
                view = await self._find(tenant_id, domain)
                if view is not None:
                    await self._broadcast(view)
                    fixed += 1
        if fixed:
            log.warning("sending-domain broadcast repaired", extra={"keys": fixed})
        return fixed

    async def resync(self) -> int:
        """Make the bucket's domain entries match Postgres (start-up): every domain put, stale entries deleted
        (readiness entries, written by their own worker, are left alone). Returns the number of domains."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM router.domains ORDER BY tenant_id, domain")
            rows = await cur.fetchall()
            views = []
            for row in rows:
                keys = await self._keys(conn, row["tenant_id"], row["domain"])
                views.append(self._to_view(row, keys))
        try:
            present = {k for k in await self.kv.keys() if k.startswith("domain.")}
        except Exception:  # an empty bucket raises NoKeysError
            present = set()
        for stale in present - {domain_key(v.tenant_id, v.domain) for v in views}:
            await self.kv.delete(stale)
        for view in views:
            await self._broadcast(view)
        return len(views)

    # -- the state machine ----------------------------------------------------------------------------------------

    async def _apply(self, tenant_id: str, domain: str,
                     checks: Sequence[RecordCheck]) -> tuple[DomainView, bool]:
        """Record ``checks`` and move the state; True when the records are in place but another tenant holds the
        domain verified (the state then stays as it was)."""
        by_name = {(c.record.name, c.record.value): c for c in checks}
        events: list[OutboxRow] = []
        taken = False
        async with self.pool.connection() as conn:
            async with conn.transaction():
                row = await self._lock(conn, tenant_id, domain)
                keys = await self._keys(conn, tenant_id, domain)
                # A rotation's key whose record is served takes over from the active key of its algorithm.
                for key in keys:
                    found = by_name.get((_dkim_name(key.selector, domain), key.public_record))
                    if key.status == KeyStatus.AHEAD and found is not None and found.state is RecordState.FOUND:
                        await self._set_status(conn, tenant_id, domain, key.algorithm, KeyStatus.ACTIVE,
                                               KeyStatus.RETIRED)
                        await self._set_key(conn, tenant_id, domain, key.selector, KeyStatus.ACTIVE)
                keys = await self._keys(conn, tenant_id, domain)
                records = self._records(domain, row["token"], keys)
                results = [by_name.get((r.record.name, r.record.value)) for r in records]
                required_ok = all(c is not None and c.state is RecordState.FOUND
                                  for r, c in zip(records, results, strict=True) if r.record.required)
                before = DomainState(row["state"])
                after = before
                if required_ok and before is not DomainState.VERIFIED:
                    taken = await self._taken_by_another(conn, tenant_id, domain)
                    after = before if taken else DomainState.VERIFIED
                elif not required_ok and before is DomainState.VERIFIED:
                    after = DomainState.FAILED
                stored = [{"name": r.record.name, "value": r.record.value, "state": c.state.value,
                           "seen": list(c.seen)} for r, c in zip(records, results, strict=True) if c is not None]
                cur = await conn.execute(
                    """UPDATE router.domains SET state = %s, checks = %s, checked_at = now(), version = version + 1,
                           verified_at = CASE WHEN %s THEN now() ELSE verified_at END
                       WHERE tenant_id = %s AND domain = %s RETURNING version""",
                    (after.value, Jsonb(stored), after is DomainState.VERIFIED and before is not after, tenant_id,
                     domain))
                version_row = await cur.fetchone()
                assert version_row is not None
                version = int(version_row[0])
                if after is not before and after is DomainState.VERIFIED:
                    events.append(self._event(tenant_id, domain, DOMAIN_VERIFIED, version, {}))
                elif after is DomainState.FAILED and before is DomainState.VERIFIED:
                    failing = [f"{r.record.name} {c.state.value if c else 'missing'}"
                               for r, c in zip(records, results, strict=True)
                               if r.record.required and (c is None or c.state is not RecordState.FOUND)]
                    events.append(self._event(tenant_id, domain, DOMAIN_VERIFICATION_FAILED, version,
                                              {"failing_records": "; ".join(failing)}))
                committed = [await self._queue(conn, e) for e in events]
            view = await self._view(conn, tenant_id, domain)
        if committed:
            self.on_commit(committed)
        assert view is not None
        await self._broadcast(view)
        return view, taken

    def _event(self, tenant_id: str, domain: str, kind: str, version: int,
               attributes: dict[str, str]) -> OutboxRow:
        event_id = f"domain-{tenant_id}-{domain}-{kind}-{version}"
        event = queue_pb2.AccountEvent(event_id=event_id, tenant_id=tenant_id, kind=kind,
                                       attributes={"domain": f"domains/{domain}", **attributes},
                                       event_time=to_timestamp(datetime.now(UTC)))
        return OutboxRow(self.topology.account_subject(tenant_id), event_id, event.SerializeToString())

    @staticmethod
    async def _queue(conn: AsyncConnection[Any], row: OutboxRow) -> CommittedRow:
        cur = await conn.execute("""INSERT INTO router.outbox (subject, msg_id, payload) VALUES (%s, %s, %s)
                                    RETURNING id""", (row.subject, row.msg_id, row.payload))
        inserted = await cur.fetchone()
        assert inserted is not None
        return CommittedRow(int(inserted[0]), row)

    # -- records --------------------------------------------------------------------------------------------------

    def _records(self, domain: str, token: str, keys: Sequence[DomainKey]) -> list[RecordView]:
        """The records to publish: ownership, each key's DKIM record (required only for active keys), SPF, DMARC."""
        by_selector = {k.selector: k for k in keys}
        records = expected_records(domain, token=token, dkim_keys={k.selector: k.public_record for k in keys},
                                   spf_include=self.spf_include)
        views = []
        for record in records:
            if record.purpose is Purpose.DKIM:
                key = by_selector[record.name.split(".", 1)[0]]
                views.append(RecordView(replace(record, required=key.status == KeyStatus.ACTIVE),
                                        selector=key.selector, algorithm=key.algorithm, key_status=key.status))
            else:
                views.append(RecordView(record))
        return views

    def _to_view(self, row: dict[str, Any], keys: Sequence[DomainKey]) -> DomainView:
        checks = {(c["name"], c["value"]): c for c in row["checks"] or []}
        records = []
        for view in self._records(row["domain"], row["token"], keys):
            check = checks.get((view.record.name, view.record.value))
            if check is not None:
                view = replace(view, state=RecordState(check["state"]), seen=tuple(check["seen"]))
            records.append(view)
        return DomainView(tenant_id=row["tenant_id"], domain=row["domain"], state=DomainState(row["state"]),
                          ed25519=row["ed25519"], records=tuple(records), created_at=row["created_at"],
                          verified_at=row["verified_at"], checked_at=row["checked_at"], version=row["version"])

    # -- Postgres and the bucket ----------------------------------------------------------------------------------

    async def _find(self, tenant_id: str, domain: str) -> DomainView | None:
        async with self.pool.connection() as conn:
            return await self._view(conn, tenant_id, domain)

    async def _view(self, conn: AsyncConnection[Any], tenant_id: str, domain: str) -> DomainView | None:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM router.domains WHERE tenant_id = %s AND domain = %s",
                              (tenant_id, domain))
            row = await cur.fetchone()
        if row is None:
            return None
        return self._to_view(row, await self._keys(conn, tenant_id, domain))

    async def _lock(self, conn: AsyncConnection[Any], tenant_id: str, domain: str) -> dict[str, Any]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM router.domains WHERE tenant_id = %s AND domain = %s FOR UPDATE",
                              (tenant_id, domain))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"domain {domain!r} not found", reason="DOMAIN_NOT_FOUND")
        return row

    async def _keys(self, conn: AsyncConnection[Any], tenant_id: str, domain: str) -> list[DomainKey]:
        return (await self._keys_of(conn, tenant_id, [domain])).get(domain, [])

    @staticmethod
    async def _keys_of(conn: AsyncConnection[Any], tenant_id: str,
                       domains: Sequence[str]) -> dict[str, list[DomainKey]]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("""SELECT * FROM router.domain_keys WHERE tenant_id = %s AND domain = ANY(%s)
                                 ORDER BY domain, selector""", (tenant_id, list(domains)))
            rows = await cur.fetchall()
        found: dict[str, list[DomainKey]] = {}
        for r in rows:
            found.setdefault(r["domain"], []).append(DomainKey(r["selector"], r["algorithm"], r["status"],
                                                               r["public_record"], bytes(r["sealed_private_key"])))
        return found

    async def _insert_key(self, conn: AsyncConnection[Any], tenant_id: str, domain: str, selector: str,
                          algorithm: str, status: str, pem: bytes, record: str) -> None:
        sealed = self.secrets.seal(pem, context=signing_key_context(tenant_id, domain, selector))
        await conn.execute("""INSERT INTO router.domain_keys
                                  (tenant_id, domain, selector, algorithm, status, sealed_private_key, public_record)
                              VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                           (tenant_id, domain, selector, algorithm, status, sealed, record))

    @staticmethod
    async def _set_status(conn: AsyncConnection[Any], tenant_id: str, domain: str, algorithm: str, old: str,
                          new: str) -> None:
        await conn.execute("""UPDATE router.domain_keys SET status = %s
                              WHERE tenant_id = %s AND domain = %s AND algorithm = %s AND status = %s""",
                           (new, tenant_id, domain, algorithm, old))

    @staticmethod
    async def _set_key(conn: AsyncConnection[Any], tenant_id: str, domain: str, selector: str, status: str) -> None:
        await conn.execute("""UPDATE router.domain_keys SET status = %s
                              WHERE tenant_id = %s AND domain = %s AND selector = %s""",
                           (status, tenant_id, domain, selector))

    @staticmethod
    async def _taken_by_another(conn: AsyncConnection[Any], tenant_id: str, domain: str) -> bool:
        cur = await conn.execute("""SELECT 1 FROM router.domains WHERE domain = %s AND state = 'verified'
                                    AND tenant_id <> %s""", (domain, tenant_id))
        return await cur.fetchone() is not None

    async def _refuse_if_taken(self, tenant_id: str, domain: str) -> None:
        async with self.pool.connection() as conn:
            if await self._taken_by_another(conn, tenant_id, domain):
                raise FailedPrecondition("the domain is verified by another account", reason="DOMAIN_TAKEN",
                                         metadata={"domain": domain})

    async def _broadcast(self, view: DomainView) -> None:
        """Put the domain's entry: state and keys, the private keys as Postgres holds them (sealed, same context)."""
        async with self.pool.connection() as conn:
            keys = await self._keys(conn, view.tenant_id, view.domain)
        entry = SendingDomain(tenant_id=view.tenant_id, domain=view.domain, state=view.state, version=view.version,
                              signing_keys=tuple(
                                  SigningKey(selector=k.selector, algorithm=k.algorithm,
                                             active=k.status == KeyStatus.ACTIVE,
                                             sealed_private_key=k.sealed_private_key.hex())
                                  for k in keys if k.status != KeyStatus.RETIRED))
        await self.kv.put(domain_key(view.tenant_id, view.domain), entry.to_json(self.secrets))


def _dkim_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"
