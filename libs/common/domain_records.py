"""The DNS records a sending domain publishes, and the check of what DNS serves against them.

A tenant proves it owns a domain and makes its mail authenticate by publishing TXT records:

- **ownership**: ``_esp-verification.<domain>`` holding ``esp-verification=<token>``;
- **DKIM**: ``<selector>._domainkey.<domain>`` holding the public key of each of the mesh's signing keys
  (``v=DKIM1; k=rsa; p=...``);
- **SPF** (recommended): the domain's one ``v=spf1`` record including the platform's SPF domain;
- **DMARC** (recommended): ``_dmarc.<domain>`` holding a ``v=DMARC1`` policy (Gmail and Yahoo require one from
  bulk senders since 2024).

:func:`check_records` looks each one up through a resolver (its address configurable, so tests ask a server on
loopback) and says, per record, whether it is found, missing or wrong, with what DNS served. A resolver that does
not answer is an error of its own (:class:`DnsUnavailable`): "we could not look" must never read as "missing".
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

__all__ = [
    "DnsUnavailable",
    "ExpectedRecord",
    "Purpose",
    "RecordCheck",
    "RecordState",
    "check_records",
    "expected_records",
    "resolver_at",
]

OWNERSHIP_PREFIX = "_esp-verification"
OWNERSHIP_VALUE_PREFIX = "esp-verification="


class Purpose(enum.StrEnum):
    """What a record is for."""

    OWNERSHIP = "ownership"
    DKIM = "dkim"
    SPF = "spf"
    DMARC = "dmarc"


class RecordState(enum.StrEnum):
    """What DNS serves for a record, judged."""

    FOUND = "found"
    MISSING = "missing"
    """No TXT record of the kind at that name."""
    WRONG = "wrong"
    """A record of the kind is there, with another value (``seen`` says which)."""


@dataclass(frozen=True)
class ExpectedRecord:
    """A TXT record the tenant is asked to publish."""

    purpose: Purpose
    name: str
    """Fully qualified, without the final dot."""
    value: str
    """What to publish (for SPF and DMARC a recommendation: another value that does the job also passes)."""
    required: bool = True
    """Needed for the domain to verify (ownership, DKIM); SPF and DMARC are recommended and reported."""


@dataclass(frozen=True)
class RecordCheck:
    """What DNS serves for one expected record."""

    record: ExpectedRecord
    state: RecordState
    seen: tuple[str, ...] = ()
    """The TXT values of the kind found at the name (empty when missing)."""


class DnsUnavailable(RuntimeError):
    """The resolver did not answer (timeout, SERVFAIL, refused): nothing can be said about the records."""


def expected_records(domain: str, *, token: str, dkim_keys: Mapping[str, str], spf_include: str,
                     dmarc_policy: str = "v=DMARC1; p=none") -> list[ExpectedRecord]:
    """The records ``domain`` is asked to publish: ownership ``token``, each DKIM selector's public key record
    (``dkim_keys``: selector → ``v=DKIM1; ...``), SPF including ``spf_include``, and a DMARC policy."""
    domain = domain.rstrip(".").lower()
    return [
        ExpectedRecord(Purpose.OWNERSHIP, f"{OWNERSHIP_PREFIX}.{domain}", f"{OWNERSHIP_VALUE_PREFIX}{token}"),
        *(ExpectedRecord(Purpose.DKIM, f"{selector}._domainkey.{domain}", record)
          for selector, record in sorted(dkim_keys.items())),
        ExpectedRecord(Purpose.SPF, domain, f"v=spf1 include:{spf_include} ~all", required=False),
        ExpectedRecord(Purpose.DMARC, f"_dmarc.{domain}", dmarc_policy, required=False),
    ]


def resolver_at(address: str = "", *, timeout_s: float = 5.0) -> dns.asyncresolver.Resolver:
    """A resolver asking ``address`` (``host`` or ``host:port``; empty: the system's resolvers)."""
    if not address:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
        resolver.nameservers = [host or address]
        if port:
            resolver.port = int(port)
    resolver.lifetime = timeout_s
    resolver.timeout = timeout_s
    return resolver


async def check_records(records: Sequence[ExpectedRecord],
                        resolver: dns.asyncresolver.Resolver) -> list[RecordCheck]:
    """Look every record up (concurrently) and judge it; :class:`DnsUnavailable` when the resolver fails."""
    names = sorted({r.name for r in records})
    served = dict(zip(names, await asyncio.gather(*(_txt(resolver, name) for name in names)), strict=True))
    return [_judge(record, served[record.name]) for record in records]


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    try:
        answer = await resolver.resolve(name + ".", dns.rdatatype.TXT, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
        raise DnsUnavailable(f"no answer for {name} TXT: {exc}") from exc
    # A TXT record of several strings is one value (RFC 7208 3.3).
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset or ()]


def _judge(record: ExpectedRecord, values: list[str]) -> RecordCheck:
    if record.purpose is Purpose.OWNERSHIP:
        kind = [v for v in values if v.startswith(OWNERSHIP_VALUE_PREFIX)]
        ok = record.value in kind
    elif record.purpose is Purpose.DKIM:
        kind = [v for v in values if "p=" in v]
        ok = any(_tags(v).get("p") == _tags(record.value).get("p") and _tags(v).get("k", "rsa")
                 == _tags(record.value).get("k", "rsa") for v in kind)
    elif record.purpose is Purpose.SPF:
        kind = [v for v in values if v.lower().startswith("v=spf1")]
        include = record.value.split()[1].lower()  # include:<platform domain>
        # Two SPF records are a permanent error for every receiver (RFC 7208 4.5): wrong, whatever they say.
        ok = len(kind) == 1 and include in kind[0].lower().split()
    else:
        kind = [v for v in values if v.replace(" ", "").upper().startswith("V=DMARC1")]
        ok = len(kind) == 1 and "p" in _tags(kind[0])
    if ok:
        return RecordCheck(record, RecordState.FOUND, tuple(kind))
    return RecordCheck(record, RecordState.WRONG if kind else RecordState.MISSING, tuple(kind))


def _tags(value: str) -> dict[str, str]:
    """A ``tag=value; ...`` list (DKIM, DMARC) with whitespace inside values removed (a key may be split)."""
    tags: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, content = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(content.split())
    return tags
