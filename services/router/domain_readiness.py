"""The readiness worker: registers every verified tenant domain at every provider that registers domains, asks each
provider until it says ready, and writes what it said to the sending-domains bucket, which routing reads.

For each verified domain of the sending-domains view and each catalog provider whose type registers domains
(``libs.providers.capabilities.registers_domains``) there is a row in ``router.domain_registrations``
(``migrations/005``). A row due (``next_check_at``) is taken by one replica — ``FOR UPDATE SKIP LOCKED``, its next
check moved ahead first — and the provider is asked: registered once (``DomainRegistrar.register``; the provider's
"already exists" is success, so two replicas registering at once break nothing), then its status read every
``ESP_DOMAIN_READINESS_POLL_S`` until ready, and every ``ESP_DOMAIN_READINESS_RECHECK_S`` after that (hourly), so a
domain a provider stops sending for (its records gone, the domain disabled there) leaves routing. A refused registration
is ``failed`` with the provider's words and tried again with backoff; so is a provider that could not be asked
(``RegistrationUnavailable``, logged), whose row keeps what the provider said last. Nothing a provider does stops
the worker.

After each pass every answered row is put to the bucket as ``ready.<provider>.<tenant>.<domain>`` where the bucket
differs, and every readiness entry without a row is deleted: a provider deleted, or a domain removed (or no longer
verified), takes its rows and so its entries with it. Postgres is the truth; the bucket is rewritten from it on
every pass, so a lost write is repaired.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from nats.js.kv import KeyValue
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.common.sending_domains import ProviderReadiness, ReadinessState, SendingDomains, readiness_key
from libs.common.stopping import pause_unless_stopped
from libs.providers.capabilities import registers_domains
from libs.providers.domain_registration import (
    DnsRecord,
    DomainRegistrar,
    DomainStatus,
    RegistrationUnavailable,
    create_registrar,
)
from libs.providers.errors import AdapterConfigError
from libs.providers.model import ProviderConfig
from libs.routing.catalog import ProviderCatalog, ProviderSpec, provider_config

__all__ = ["DomainReadinessWorker", "RegistrationKey"]

log = logging.getLogger(__name__)

RegistrationKey = tuple[str, str, str]
"""(provider id, tenant id, domain)."""

MAX_BACKOFF_S = 600.0
"""The longest wait before asking a provider again after a failure."""
LEASE_S = 120.0
"""How far a replica taking a row moves its next check ahead: longer than one provider call may take."""
BATCH = 50
"""Rows taken per pass."""


def backoff_s(poll_s: float, attempts: int) -> float:
    """The wait after ``attempts`` failures in a row: doubling from ``poll_s``, at most ``MAX_BACKOFF_S``."""
    return float(min(MAX_BACKOFF_S, poll_s * 2.0 ** min(max(attempts - 1, 0), 20)))


class DomainReadinessWorker:
    """Keeps ``router.domain_registrations`` and the bucket's readiness entries in step with the catalog, the
    verified domains and what the providers say."""

    def __init__(self, pool: AsyncConnectionPool, kv: KeyValue, catalog: ProviderCatalog, view: SendingDomains, *,
                 poll_s: float, ready_recheck_s: float = 3600.0,
                 registrar_for: Callable[[ProviderConfig], DomainRegistrar] = create_registrar) -> None:
        """``kv`` is the sending-domains bucket ``view`` watches; ``poll_s`` how often a pending domain is asked
        again (and how often the worker looks for work); ``ready_recheck_s`` how often a ready one is."""
        self.pool = pool
        self.kv = kv
        self.catalog = catalog
        self.view = view
        self.poll_s = poll_s
        self.ready_recheck_s = ready_recheck_s
        self._registrar_for = registrar_for
        self._registrars: dict[str, tuple[int, DomainRegistrar]] = {}
        self._asked_versions: dict[str, int] = {}
        """The version of each provider when it was last asked about a domain."""

    # -- the loop ------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop``; a pass that fails is logged and the next one tries again."""
        await self.catalog.wait_loaded(timeout_s=60)
        await self.view.wait_loaded(timeout_s=60)
        try:
            while not stop.is_set():
                try:
                    await self.run_once()
                except Exception:
                    log.exception("domain readiness pass failed; trying again")
                await pause_unless_stopped(stop, self.poll_s)
        finally:
            await self.aclose()

    async def run_once(self) -> None:
        """One pass: rows follow the catalog and the domains, due rows are asked, the bucket follows the rows."""
        providers = {p.id: p for p in self.catalog.providers.values() if registers_domains(p.type)}
        await self._follow_targets(providers)
        await self._ask_changed_soon(providers)
        for row in await self._take_due():
            spec = providers.get(row["provider_id"])
            if spec is not None:
                await self._ask(spec, row)
        await self._publish()
        await self._drop_registrars(providers)

    async def aclose(self) -> None:
        """Close every registrar's connections."""
        for _, registrar in self._registrars.values():
            await registrar.aclose()
        self._registrars.clear()

    # -- rows ----------------------------------------------------------------------------------------------------

    async def _follow_targets(self, providers: Mapping[str, ProviderSpec]) -> None:
        domains = [key for key, entry in self.view.domains().items() if entry.verified]
        targets = {(provider_id, tenant_id, domain) for provider_id in providers for tenant_id, domain in domains}
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT provider_id, tenant_id, domain FROM router.domain_registrations")
            existing = {(str(r[0]), str(r[1]), str(r[2])) for r in await cur.fetchall()}
            for key in existing - targets:
                await conn.execute("""DELETE FROM router.domain_registrations
                                      WHERE provider_id = %s AND tenant_id = %s AND domain = %s""", key)
            for key in targets - existing:
                await conn.execute("""INSERT INTO router.domain_registrations (provider_id, tenant_id, domain)
                                      VALUES (%s, %s, %s) ON CONFLICT DO NOTHING""", key)

    async def _ask_changed_soon(self, providers: Mapping[str, ProviderSpec]) -> None:
        """A provider changed since its registrar was built (new credentials, endpoint): the domains it has not
        said are ready are asked again now, without the backoff its failures built up."""
        changed = [p.id for p in providers.values() if self._asked_versions.get(p.id, p.version) != p.version]
        if not changed:
            return
        async with self.pool.connection() as conn:
            await conn.execute("""UPDATE router.domain_registrations SET next_check_at = now(), attempts = 0
                                  WHERE provider_id = ANY(%s) AND state <> 'ready'""", (changed,))
        for provider_id in changed:
            self._asked_versions[provider_id] = providers[provider_id].version

    async def _take_due(self) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                """UPDATE router.domain_registrations SET next_check_at = now() + make_interval(secs => %s)
                   WHERE (provider_id, tenant_id, domain) IN (
                       SELECT provider_id, tenant_id, domain FROM router.domain_registrations
                       WHERE next_check_at <= now()
                       ORDER BY next_check_at LIMIT %s FOR UPDATE SKIP LOCKED)
                   RETURNING provider_id, tenant_id, domain, registered, attempts""", (LEASE_S, BATCH))
            return list(await cur.fetchall())

    async def _ask(self, spec: ProviderSpec, row: dict[str, Any]) -> None:
        key = (str(row["provider_id"]), str(row["tenant_id"]), str(row["domain"]))
        attempts = int(row["attempts"])
        self._asked_versions[spec.id] = spec.version
        try:
            registrar = await self._registrar(spec)
            status = await (registrar.status(key[2]) if row["registered"] else registrar.register(key[2]))
        except AdapterConfigError as exc:  # the provider's configuration cannot register: say so, try later
            status = DomainStatus(ReadinessState.FAILED, f"cannot register domains: {exc}")
        except RegistrationUnavailable as exc:
            log.warning("provider %s could not be asked about %s: %s", key[0], key[2], exc)
            await self._retry_later(key, attempts + 1)
            return
        except Exception:
            log.exception("asking provider %s about %s failed", key[0], key[2])
            await self._retry_later(key, attempts + 1)
            return
        registered = bool(row["registered"]) or status.state is not ReadinessState.FAILED
        attempts = attempts + 1 if status.state is ReadinessState.FAILED else 0
        wait = (backoff_s(self.poll_s, attempts) if attempts
                else self.ready_recheck_s if status.state is ReadinessState.READY else self.poll_s)
        async with self.pool.connection() as conn:
            await conn.execute(
                """UPDATE router.domain_registrations
                   SET state = %s, detail = %s, records = %s, provider_ref = %s, registered = %s,
                       answered_at = coalesce(answered_at, now()), attempts = %s,
                       next_check_at = now() + make_interval(secs => %s), updated_at = now()
                   WHERE provider_id = %s AND tenant_id = %s AND domain = %s""",
                (status.state.value, status.detail, json.dumps([r.to_json() for r in status.records]),
                 status.provider_ref, registered, attempts, wait, *key))
        if status.state is not ReadinessState.PENDING:
            log.info("provider %s says %s of %s (tenant %s): %s", key[0], status.state.value, key[2], key[1],
                     status.detail)

    async def _retry_later(self, key: RegistrationKey, attempts: int) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                """UPDATE router.domain_registrations
                   SET attempts = %s, next_check_at = now() + make_interval(secs => %s), updated_at = now()
                   WHERE provider_id = %s AND tenant_id = %s AND domain = %s""",
                (attempts, backoff_s(self.poll_s, attempts), *key))

    # -- the bucket ----------------------------------------------------------------------------------------------

    async def _publish(self) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("""SELECT provider_id, tenant_id, domain, state, detail, records
                                        FROM router.domain_registrations WHERE answered_at IS NOT NULL""")
            rows = await cur.fetchall()
        wanted = {(str(r[0]), str(r[1]), str(r[2])): ProviderReadiness(
            str(r[0]), str(r[1]), str(r[2]), ReadinessState(r[3]), str(r[4]),
            tuple((d.type, d.name, d.value) for d in map(DnsRecord.from_json, r[5] or ()))) for r in rows}
        current = self.view.readiness_entries()
        for key, readiness in wanted.items():
            if current.get(key) != readiness:
                value = readiness.to_json()
                await self.kv.put(readiness_key(*key), value)
                self.view.apply(readiness_key(*key), value)
        for key in set(current) - set(wanted):
            await self.kv.delete(readiness_key(*key))
            self.view.apply(readiness_key(*key), None)

    # -- registrars ----------------------------------------------------------------------------------------------

    async def _registrar(self, spec: ProviderSpec) -> DomainRegistrar:
        """The provider's registrar, built again when the provider changed (its credentials may have)."""
        held = self._registrars.pop(spec.id, None)
        if held is not None and held[0] == spec.version:
            self._registrars[spec.id] = held
            return held[1]
        if held is not None:
            await held[1].aclose()
        registrar = self._registrar_for(provider_config(spec))
        self._registrars[spec.id] = (spec.version, registrar)
        return registrar

    async def _drop_registrars(self, providers: Mapping[str, ProviderSpec]) -> None:
        for provider_id in [p for p in self._asked_versions if p not in providers]:
            del self._asked_versions[provider_id]
        for provider_id in [p for p in self._registrars if p not in providers]:
            _, registrar = self._registrars.pop(provider_id)
            await registrar.aclose()
