"""Sending domains as every replica sees them: which domains a tenant may send from, the keys that sign its mail,
and which upstream providers are ready to send for it — a JetStream KV bucket, read into memory by a watcher.

Postgres (the router's ``domains`` tables) is the truth; the router writes the bucket after every change, as it
does for the provider catalog (``libs.routing.catalog``). Two kinds of entry share the bucket:

``domain.<tenant id>.<domain>`` — a :class:`SendingDomain`
    The tenant's domain, its state (only ``verified`` ones send) and its DKIM signing keys. The private keys travel
    sealed (``libs.common.secret_box``, bound to the tenant and domain); a view given the ``SecretBox`` of
    ``ESP_SECRETS_KEYS`` opens them in memory (senders sign), one without leaves them sealed (ingest checks
    ``From`` only).

``ready.<provider id>.<tenant id>.<domain>`` — a :class:`ProviderReadiness`
    Whether one upstream provider may send for the domain (an SES identity, a Mailgun domain, SendGrid domain
    authentication, a Postmark sender signature), as that provider last said. Written by the router's readiness
    worker, one writer per key, so the domain entry and the readiness entries never overwrite each other.

Who may send from what (:meth:`SendingDomains.sender_domain`): an address's domain is covered by a verified domain
of the tenant when it is that domain or a subdomain of it (DKIM's relaxed alignment: ``d=example.com`` aligns with
``From: news.example.com``), the longest such domain winning; the platform's sandbox domains
(``ESP_SANDBOX_DOMAINS``, a setting) cover every tenant, are signed by the provider and are ready everywhere.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from libs.common.jetstream import open_kv_bucket, watch_bucket
from libs.common.secret_box import SecretBox, SecretUnreadable

__all__ = [
    "DomainState",
    "ProviderReadiness",
    "ReadinessState",
    "SendingDomain",
    "SendingDomains",
    "SigningKey",
    "bucket_name",
    "domain_key",
    "open_bucket",
    "readiness_key",
    "signing_key_context",
]

log = logging.getLogger(__name__)


class DomainState(enum.StrEnum):
    """A sending domain's state. Only ``verified`` sends."""

    PENDING = "pending"
    """Added; its ownership record has not been seen in DNS yet."""
    VERIFIED = "verified"
    """Its ownership and active DKIM records were found at the last check."""
    FAILED = "failed"
    """It was verified and a later check found a required record missing or wrong (the tenant was notified)."""


class ReadinessState(enum.StrEnum):
    """Whether one provider may send for one domain."""

    READY = "ready"
    PENDING = "pending"
    """Registered at the provider; the provider has not verified it yet (its DNS records may be unpublished)."""
    FAILED = "failed"
    """The provider refused the registration or reported the domain failed."""


def signing_key_context(tenant_id: str, domain: str, selector: str) -> str:
    """What a sealed DKIM private key is bound to (the same in Postgres and in the KV bucket)."""
    return f"router.domain_signing_keys/{tenant_id}/{domain}/{selector}"


@dataclass(frozen=True)
class SigningKey:
    """One DKIM key of a domain. The private key is held in plain text in memory only (``repr`` leaves it out)."""

    selector: str
    algorithm: str
    """``rsa-sha256`` or ``ed25519-sha256`` (``libs.providers.dkim``)."""
    active: bool
    """Signs new mail. During a rotation the new key is published (its record in DNS) before it becomes active,
    and the old one stays published, inactive, until mail signed with it has been delivered."""
    private_key_pem: bytes = field(default=b"", repr=False)
    sealed_private_key: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class SendingDomain:
    """One tenant's domain as senders and ingest need it."""

    tenant_id: str
    domain: str
    state: DomainState
    signing_keys: tuple[SigningKey, ...] = ()
    version: int = 0

    @property
    def verified(self) -> bool:
        """Whether it may send."""
        return self.state is DomainState.VERIFIED

    def active_keys(self) -> tuple[SigningKey, ...]:
        """The keys that sign new mail (one per algorithm at most), openable ones only."""
        return tuple(k for k in self.signing_keys if k.active and k.private_key_pem)

    def to_json(self, secrets: SecretBox) -> bytes:
        """The KV value: private keys sealed, never in plain text."""
        keys = []
        for key in self.signing_keys:
            sealed = key.sealed_private_key
            if key.private_key_pem:
                sealed = secrets.seal(key.private_key_pem,
                                      context=signing_key_context(self.tenant_id, self.domain, key.selector)).hex()
            keys.append({"selector": key.selector, "algorithm": key.algorithm, "active": key.active,
                         "sealed_private_key": sealed})
        return json.dumps({"tenant_id": self.tenant_id, "domain": self.domain, "state": self.state.value,
                           "signing_keys": keys, "version": self.version}).encode()

    @classmethod
    def from_json(cls, raw: bytes, secrets: SecretBox | None = None) -> SendingDomain:
        """Read a KV value; with ``secrets`` the private keys are opened (a key that does not open stays sealed
        and so does not sign — logged, never fatal)."""
        data = json.loads(raw)
        tenant_id, domain = str(data["tenant_id"]), str(data["domain"])
        keys = []
        for item in data.get("signing_keys", ()):
            selector, sealed = str(item["selector"]), str(item.get("sealed_private_key", ""))
            pem = b""
            if secrets is not None and sealed:
                try:
                    pem = secrets.open(bytes.fromhex(sealed),
                                       context=signing_key_context(tenant_id, domain, selector))
                except (SecretUnreadable, ValueError):
                    log.error("the DKIM key %s of %s does not open with ESP_SECRETS_KEYS; mail goes unsigned by it",
                              selector, domain)
            keys.append(SigningKey(selector=selector, algorithm=str(item["algorithm"]), active=bool(item["active"]),
                                   private_key_pem=pem, sealed_private_key=sealed))
        return cls(tenant_id=tenant_id, domain=domain, state=DomainState(data["state"]), signing_keys=tuple(keys),
                   version=int(data.get("version", 0)))


@dataclass(frozen=True)
class ProviderReadiness:
    """Whether one provider may send for one tenant domain, and what that provider said."""

    provider_id: str
    tenant_id: str
    domain: str
    state: ReadinessState
    detail: str = ""
    """The provider's own words (its status, or why it refused), for ``RouteEmail`` and the domain's view."""
    records: tuple[tuple[str, str, str], ...] = ()
    """The DNS records the provider wants published for the domain, as (type, name, value): SES's DKIM CNAMEs,
    SendGrid's CNAMEs, Mailgun's and Postmark's TXT records; shown in the domain's view."""

    def to_json(self) -> bytes:
        """The KV value."""
        return json.dumps({"provider_id": self.provider_id, "tenant_id": self.tenant_id, "domain": self.domain,
                           "state": self.state.value, "detail": self.detail,
                           "records": [{"type": t, "name": n, "value": v} for t, n, v in self.records]}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ProviderReadiness:
        """Read a KV value."""
        data = json.loads(raw)
        records = tuple((str(r.get("type", "")), str(r.get("name", "")), str(r.get("value", "")))
                        for r in data.get("records") or () if isinstance(r, dict))
        return cls(provider_id=str(data["provider_id"]), tenant_id=str(data["tenant_id"]), domain=str(data["domain"]),
                   state=ReadinessState(data["state"]), detail=str(data.get("detail", "")), records=records)


def domain_key(tenant_id: str, domain: str) -> str:
    """The bucket key of a tenant's domain (domains are lower-case LDH names, valid in a KV key)."""
    return f"domain.{tenant_id}.{domain}"


def readiness_key(provider_id: str, tenant_id: str, domain: str) -> str:
    """The bucket key of one provider's readiness for one tenant domain."""
    return f"ready.{provider_id}.{tenant_id}.{domain}"


def bucket_name(namespace: str) -> str:
    """The sending-domains KV bucket of one mesh."""
    return f"{namespace}_domains" if namespace else "domains"


async def open_bucket(js: JetStreamContext, namespace: str) -> KeyValue:
    """The sending-domains KV bucket, created on first use."""
    return await open_kv_bucket(js, bucket_name(namespace))


def _parents(domain: str) -> Iterable[str]:
    """``a.b.example.com`` → itself, ``b.example.com``, ``example.com``, ``com`` (longest first)."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels)):
        yield ".".join(labels[i:])


class SendingDomains:
    """In-memory view of the bucket, kept current by a watcher; lookups never wait on the network."""

    def __init__(self, kv: KeyValue, secrets: SecretBox | None = None, *,
                 sandbox_domains: Iterable[str] = ()) -> None:
        """``secrets`` opens the signing keys (without it they stay sealed); ``sandbox_domains`` every tenant may
        send from."""
        self.kv = kv
        self._secrets = secrets
        self.sandbox_domains = frozenset(d.lower().rstrip(".") for d in sandbox_domains)
        self._domains: dict[tuple[str, str], SendingDomain] = {}
        self._readiness: dict[tuple[str, str, str], ProviderReadiness] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._loaded = asyncio.Event()

    # -- lookups --------------------------------------------------------------------------------------------------

    def is_sandbox(self, address_domain: str) -> bool:
        """Whether a platform sandbox domain covers ``address_domain``."""
        return any(d in self.sandbox_domains for d in _parents(address_domain))

    def sender_domain(self, tenant_id: str, address_domain: str) -> SendingDomain | None:
        """The tenant's verified domain covering ``address_domain`` (itself or a parent, longest first), or
        ``None`` (sandbox domains are not entries: ask :meth:`is_sandbox`)."""
        for candidate in _parents(address_domain):
            found = self._domains.get((tenant_id, candidate))
            if found is not None and found.verified:
                return found
        return None

    def domain(self, tenant_id: str, domain: str) -> SendingDomain | None:
        """The tenant's entry for exactly ``domain``, in any state."""
        return self._domains.get((tenant_id, domain.lower()))

    def readiness(self, provider_id: str, tenant_id: str, domain: str) -> ProviderReadiness | None:
        """What ``provider_id`` last said about the tenant's ``domain`` (``None``: not registered there)."""
        return self._readiness.get((provider_id, tenant_id, domain))

    def readiness_entries(self) -> Mapping[tuple[str, str, str], ProviderReadiness]:
        """Every readiness entry by (provider id, tenant id, domain): a snapshot replaced, never changed, on
        updates."""
        return self._readiness

    def domains(self) -> Mapping[tuple[str, str], SendingDomain]:
        """Every entry by (tenant id, domain): a snapshot replaced, never changed, on updates."""
        return self._domains

    # -- watching -------------------------------------------------------------------------------------------------

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(bucket key)`` after every change."""
        self._listeners.append(listener)

    @property
    def loaded(self) -> bool:
        """Whether the bucket's initial contents are in."""
        return self._loaded.is_set()

    async def wait_loaded(self, timeout_s: float = 10.0) -> None:
        """Wait until the bucket's initial contents are in (``TimeoutError`` after ``timeout_s``)."""
        await asyncio.wait_for(self._loaded.wait(), timeout_s)

    def apply(self, key: str, value: bytes | None) -> None:
        """Take one bucket entry (``None``: deleted). Public so a writer can see its own write at once."""
        kind, _, rest = key.partition(".")
        try:
            if kind == "domain":
                tenant_id, _, domain = rest.partition(".")
                domains = dict(self._domains)
                if value:
                    domains[(tenant_id, domain)] = SendingDomain.from_json(value, self._secrets)
                else:
                    domains.pop((tenant_id, domain), None)
                self._domains = domains
            elif kind == "ready":
                provider_id, _, tail = rest.partition(".")
                tenant_id, _, domain = tail.partition(".")
                readiness = dict(self._readiness)
                if value:
                    readiness[(provider_id, tenant_id, domain)] = ProviderReadiness.from_json(value)
                else:
                    readiness.pop((provider_id, tenant_id, domain), None)
                self._readiness = readiness
            else:
                return
        except (ValueError, KeyError, TypeError):
            log.exception("unreadable sending-domains entry %s; left out", key)
            return
        for listener in self._listeners:
            try:
                listener(key)
            except Exception:
                log.exception("sending-domains change listener failed")

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the bucket until ``stop``; re-watches after connection trouble."""
        await watch_bucket(self.kv, self.apply, self._loaded, stop, what="sending-domains")
