"""Recipients' mailbox providers: which provider (Gmail, Yahoo, Outlook, Apple or other) holds a recipient's mailbox,
so analytics can group delivery, open and complaint figures by it.

Two ways to know, cheapest first:

- **Well-known domains.** :func:`mailbox_provider_of_domain` answers from a fixed table of the providers' own
  consumer domains (``gmail.com``, ``yahoo.co.uk``, ``hotmail.fr``, ``icloud.com`` ...). The table is matched on
  exact domains only: ``mail.gmail.com`` or ``eu.yahoo.com`` hold no consumer mailboxes, and a subdomain of a
  provider's domain is not promised to be hosted by it, so a suffix match could only add wrong answers. The table
  lists only domains whose mail the provider itself hosts; one it misses costs less (it counts as ``other``, or
  the MX lookup below finds it) than a wrong entry would.
- **MX records**, when switched on (``ESP_MAILBOX_MX_LOOKUP``). A company domain on Google Workspace or Microsoft
  365 has its mail filtered by Gmail or Outlook, which is what deliverability analytics care about; its MX hosts
  (``aspmx.l.google.com``, ``example-com.mail.protection.outlook.com``) say so. :class:`MailboxClassifier` looks
  an unknown domain up in the background and maps its most preferred MX host by suffix
  (``ESP_MAILBOX_MX_PROVIDERS``).

Decisions:

- AOL (``aol.com``, ``aim.com`` ...) counts as ``yahoo``: AOL's mailboxes have run on Yahoo's mail platform since
  2017 (its MX hosts are under ``yahoodns.net``), so its filtering and feedback behave like Yahoo's.
- ``yahoo.co.jp`` is not ``yahoo``: Yahoo! JAPAN is a separate company with its own mail platform.
- Domains arrive as canonical addresses keep them (lower-case, Unicode labels) or any other way: matching is
  case-insensitive, ignores one trailing dot and maps internationalised labels (UTS 46, IDNA 2008) to their ASCII
  form, so a full-width ``GMAIL.com`` is ``gmail.com`` and an IDN is queried under its ``xn--`` name.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import idna

if TYPE_CHECKING:  # dnspython costs ~150 ms to import: only a classifier doing MX lookups loads it (in start())
    import dns.asyncresolver

__all__ = [
    "DEFAULT_MX_PROVIDERS",
    "MAILBOX_ENV_PREFIX",
    "MAILBOX_PROVIDERS",
    "MailboxClassifier",
    "MailboxProviderSettings",
    "mailbox_provider_of_domain",
]

log = logging.getLogger(__name__)

MAILBOX_PROVIDERS: tuple[str, ...] = ("gmail", "yahoo", "outlook", "apple", "other")
"""Every mailbox provider a recipient is counted under; ``other`` is every mailbox none of the others holds."""
_GMAIL, _YAHOO, _OUTLOOK, _APPLE, _OTHER = MAILBOX_PROVIDERS

MAILBOX_ENV_PREFIX = "ESP_MAILBOX_"
"""Prefix of :class:`MailboxProviderSettings`' variables: ``load_settings(MailboxProviderSettings,
prefix=MAILBOX_ENV_PREFIX)``."""


def _domains(provider: str, names: Iterable[str]) -> dict[str, str]:
    return dict.fromkeys(names, provider)


_YAHOO_COUNTRIES = (
    "at", "be", "ca", "ch", "cl", "co.id", "co.in", "co.nz", "co.th", "co.uk", "co.za", "com.ar", "com.au", "com.br",
    "com.co", "com.hk", "com.mx", "com.my", "com.pe", "com.ph", "com.sg", "com.tr", "com.tw", "com.ve", "com.vn", "de",
    "dk", "es", "fi", "fr", "gr", "ie", "in", "it", "nl", "no", "pl", "ro", "se",
)
_HOTMAIL_COUNTRIES = (
    "at", "be", "ca", "ch", "co.jp", "co.th", "co.uk", "com.ar", "com.au", "com.br", "com.tr", "de", "dk", "es", "fi",
    "fr", "gr", "it", "nl", "no", "se",
)
_LIVE_COUNTRIES = (
    "at", "be", "ca", "cl", "co.uk", "com.ar", "com.au", "com.mx", "de", "dk", "fr", "ie", "it", "jp", "nl", "no", "se",
)
_OUTLOOK_COUNTRIES = (
    "at", "be", "cl", "com.ar", "com.au", "com.br", "de", "dk", "es", "fr", "ie", "in", "it", "jp", "pt",
)

_WELL_KNOWN: dict[str, str] = {
    **_domains(_GMAIL, ("gmail.com", "googlemail.com")),
    **_domains(_YAHOO, ("yahoo.com", "ymail.com", "rocketmail.com", *(f"yahoo.{cc}" for cc in _YAHOO_COUNTRIES))),
    **_domains(_YAHOO, ("aol.com", "aim.com", "aol.co.uk", "aol.de", "aol.fr")),  # AOL: Yahoo's platform
    **_domains(_OUTLOOK, ("outlook.com", "msn.com", *(f"outlook.{cc}" for cc in _OUTLOOK_COUNTRIES))),
    **_domains(_OUTLOOK, ("hotmail.com", *(f"hotmail.{cc}" for cc in _HOTMAIL_COUNTRIES))),
    **_domains(_OUTLOOK, ("live.com", *(f"live.{cc}" for cc in _LIVE_COUNTRIES))),
    **_domains(_APPLE, ("icloud.com", "me.com", "mac.com")),
}
"""The providers' own consumer domains (ASCII, lower-case, no trailing dot) → provider."""


def _ascii_domain(domain: str) -> str | None:
    """``domain`` lower-cased, without its trailing dot, IDN labels in their ``xn--`` form; None when it cannot be a
    domain name (an IDN label UTS 46 refuses)."""
    name = domain.lower()
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


def mailbox_provider_of_domain(domain: str) -> str | None:
    """The mailbox provider of a well-known domain (``"gmail"`` for ``gmail.com``, ``"yahoo"`` for ``aol.com`` ...);
    None for any other domain, whose provider only its MX records can tell. Pure: no I/O, no state."""
    name = _ascii_domain(domain)
    return None if name is None else _WELL_KNOWN.get(name)


DEFAULT_MX_PROVIDERS: tuple[str, ...] = (
    "google.com=gmail",  # Workspace: aspmx.l.google.com, alt1.aspmx.l.google.com, smtp.google.com
    "googlemail.com=gmail",  # older Workspace records: aspmx2.googlemail.com
    "yahoodns.net=yahoo",  # Yahoo and AOL mailboxes: mta5.am0.yahoodns.net, mx-aol.mail.gm0.yahoodns.net
    "protection.outlook.com=outlook",  # Microsoft 365 and outlook.com: example-com.mail.protection.outlook.com
    "outlook.com=outlook",  # older Microsoft 365 records: example-com.mail.eo.outlook.com
    "icloud.com=apple",  # iCloud custom domains: mx01.mail.icloud.com
)
"""The shipped MX mapping: ``<MX host suffix>=<provider>`` entries (suffixes match whole labels)."""

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""A name worth asking DNS about: dotted LDH labels (underscores allowed, as DNS does), within the length limits."""


def _parse_mx_providers(entries: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The ``suffix=provider`` entries as a dict, and what is wrong with the malformed ones."""
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for entry in entries:
        suffix, equals, provider = entry.partition("=")
        host = _ascii_domain(suffix.strip().lstrip("."))
        provider = provider.strip()
        if not equals or host is None or _HOSTNAME.fullmatch(host) is None:
            problems.append(f"{entry!r} is not <MX host suffix>=<provider>")
        elif provider not in MAILBOX_PROVIDERS:
            problems.append(f"{entry!r}: the provider must be one of {', '.join(MAILBOX_PROVIDERS)}")
        else:
            mapping[host] = provider
    return mapping, problems


def _nameserver(entry: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``[v6]:port`` or a bare IPv6 address → (address, port)."""
    text = entry.strip()
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, "53"
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} is not <address>[:<port>]")
    return address, int(port)


@dataclass(frozen=True)
class MailboxProviderSettings:
    """How recipients' mailbox providers are told (``ESP_MAILBOX_*`` variables; see :data:`MAILBOX_ENV_PREFIX`)."""

    mx_lookup: bool = False
    """Look unknown domains' MX records up (in the background) and map them with ``mx_providers``. Off: every
    domain outside the well-known table counts as ``other``."""
    mx_providers: tuple[str, ...] = DEFAULT_MX_PROVIDERS
    """``<MX host suffix>=<provider>`` entries, separated by commas; a suffix matches whole labels
    (``google.com`` matches ``aspmx.l.google.com``, not ``notgoogle.com``), the longest matching suffix wins."""
    nameservers: tuple[str, ...] = ()
    """Nameservers asked for MX records, by IP address (``ip[:port]``, ``[v6]:port``); empty: the system's
    (resolv.conf)."""
    lookup_timeout_s: float = 2.0
    """How long one domain's MX lookup may take, retries included; a lookup that runs out counts as a failure."""
    lookup_concurrency: int = 8
    """MX lookups in flight at once."""
    max_pending_lookups: int = 1000
    """Domains waiting for a lookup; a domain seen while the queue is full is looked up at a later sighting."""
    cache_size: int = 50_000
    """Most domains remembered (least recently used forgotten first), answers and well-known spellings alike."""
    ttl_s: float = 86_400.0
    """How long an MX answer is kept. Longer than most DNS TTLs on purpose: a domain changes its mailbox
    provider rarely, and an answer past its time is still used while it is looked up again."""
    negative_ttl_s: float = 3_600.0
    """How long a domain without MX records (NXDOMAIN, or no MX) stays ``other`` before it is asked about again."""
    failure_ttl_s: float = 300.0
    """How long a domain whose lookup failed (timeout, SERVFAIL, refused) stays ``other`` before it is retried."""

    def __post_init__(self) -> None:
        problems = [f"{MAILBOX_ENV_PREFIX}MX_PROVIDERS: {problem}" for problem in self.mx_provider_map()[1]]
        for name in ("lookup_timeout_s", "lookup_concurrency", "max_pending_lookups", "cache_size", "ttl_s",
                     "negative_ttl_s", "failure_ttl_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{MAILBOX_ENV_PREFIX}{name.upper()}: must be > 0, got {getattr(self, name)!r}")
        for entry in self.nameservers:
            try:
                _nameserver(entry)
            except ValueError as exc:
                problems.append(f"{MAILBOX_ENV_PREFIX}NAMESERVERS: {exc}")
        if problems:
            raise ValueError("; ".join(problems))

    def mx_provider_map(self) -> tuple[dict[str, str], list[str]]:
        """``mx_providers`` as MX host suffix → provider, and the malformed entries' problems."""
        return _parse_mx_providers(self.mx_providers)


_NEVER = math.inf
"""Expiry of what no lookup can change: well-known domains, non-domains, every domain when MX lookup is off."""

_Entry = tuple[str, float, str | None]
"""A remembered domain: (provider, monotonic expiry, the ASCII name to look up again or None)."""


class MailboxClassifier:
    """The mailbox provider of recipients' addresses or domains, for a hot loop: :meth:`classify` is synchronous,
    does no I/O and costs a few dict operations for a domain seen before (an LRU cache of ``cache_size``
    domains; the providers' own domains, as canonical addresses spell them, skip even that).

    With ``mx_lookup`` off, a domain outside the well-known table is ``other``. With it on, such a domain is
    ``other`` **until its MX records are known**: its first sighting queues a lookup that background tasks (started
    by :meth:`start`, ``lookup_concurrency`` at a time) run with dnspython's asyncio resolver, and only later calls
    get the answer. So the first messages to a custom domain not seen since the process started — a Workspace
    domain, say — are counted under ``other``; at 20,000 events/s this skew is small but real. No MX record, NXDOMAIN
    and failed lookups are remembered as ``other`` (``negative_ttl_s``, ``failure_ttl_s``), so a dead domain costs
    one query per period, not one per event. An answer past ``ttl_s`` is still given while it is looked up again.

    One event loop's object: call :meth:`classify` from the loop :meth:`start` ran on, not from other threads.
    Domains seen before :meth:`start` are queued (up to ``max_pending_lookups``) and looked up once it runs.
    """

    def __init__(self, settings: MailboxProviderSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings = settings or MailboxProviderSettings()
        self._mx_providers = settings.mx_provider_map()[0]
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, list[str]] = {}  # ASCII name being looked up → the spellings (cache keys) waiting
        self._queue: asyncio.Queue[str] = asyncio.Queue(settings.max_pending_lookups)
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def pending_lookups(self) -> int:
        """Domains queued for or in an MX lookup."""
        return len(self._pending)

    @property
    def cached_domains(self) -> int:
        """Domains remembered (at most ``cache_size``)."""
        return len(self._cache)

    async def start(self) -> None:
        """Start the background MX lookups (nothing to do when ``mx_lookup`` is off; once only). Raises when the
        system has no resolver configuration and no ``nameservers`` are set, so a broken deployment fails at start."""
        if not self._settings.mx_lookup or self._workers:
            return
        import dns.asyncresolver
        import dns.nameserver

        configured = self._settings.nameservers
        resolver = dns.asyncresolver.Resolver(configure=not configured)
        if configured:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*_nameserver(entry)) for entry in configured]
        # One bound for a lookup, retries included: a slow domain holds a worker for lookup_timeout_s at most.
        resolver.lifetime = resolver.timeout = self._settings.lookup_timeout_s
        self._workers = [asyncio.create_task(self._look_up_queued(resolver), name=f"mailbox-mx-{n}")
                         for n in range(self._settings.lookup_concurrency)]

    async def aclose(self) -> None:
        """Stop the background lookups; :meth:`classify` keeps answering from what is known."""
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def __aenter__(self) -> MailboxClassifier:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def classify(self, address_or_domain: str) -> str:
        """The mailbox provider (one of :data:`MAILBOX_PROVIDERS`) of an address (``local@domain``) or a bare domain.
        Never waits: an unknown domain is ``other`` until its background MX lookup (if on) has answered."""
        domain = address_or_domain.rpartition("@")[2]
        provider = _WELL_KNOWN.get(domain)  # the common case, canonical addresses at the big providers: no cache
        if provider is not None:
            return provider
        entry = self._cache.get(domain)
        if entry is None:
            return self._first_sight(domain)
        self._cache.move_to_end(domain)
        expires = entry[1]
        if expires != _NEVER and expires <= self._clock() and entry[2] is not None:
            self._request(entry[2], domain)  # stale or still pending: answer with what is known meanwhile
        return entry[0]

    def _first_sight(self, domain: str) -> str:
        name = _ascii_domain(domain)
        provider = None if name is None else _WELL_KNOWN.get(name)
        if provider is not None:
            self._remember(domain, (provider, _NEVER, None))
            return provider
        if name is None or not self._settings.mx_lookup or _HOSTNAME.fullmatch(name) is None:
            self._remember(domain, (_OTHER, _NEVER, None))
            return _OTHER
        # Expired at once, so each later sighting retries the queueing until the lookup is under way (a full queue
        # drops a request, it does not lose the domain).
        self._remember(domain, (_OTHER, self._clock(), name))
        self._request(name, domain)
        return _OTHER

    def _remember(self, key: str, entry: _Entry) -> None:
        cache = self._cache
        cache[key] = entry
        cache.move_to_end(key)
        if len(cache) > self._settings.cache_size:
            cache.popitem(last=False)

    def _request(self, name: str, key: str) -> None:
        """Have ``name`` looked up, its answer stored under ``key`` (and any other spelling waiting for it)."""
        waiting = self._pending.get(name)
        if waiting is not None:
            if key not in waiting:
                waiting.append(key)
            return
        if self._closed:
            return
        try:
            self._queue.put_nowait(name)
        except asyncio.QueueFull:
            return
        self._pending[name] = [key]

    async def _look_up_queued(self, resolver: dns.asyncresolver.Resolver) -> None:
        while True:
            name = await self._queue.get()
            try:
                provider, ttl_s = await self._look_up(resolver, name)
            except Exception:  # a bug here must not end the worker: the domain is retried after failure_ttl_s
                log.exception("MX lookup of %s failed", name)
                provider, ttl_s = _OTHER, self._settings.failure_ttl_s
            expires = self._clock() + ttl_s
            for key in self._pending.pop(name, ()):
                self._remember(key, (provider, expires, name))

    async def _look_up(self, resolver: dns.asyncresolver.Resolver, name: str) -> tuple[str, float]:
        """(provider, how long to keep it) from ``name``'s MX records."""
        import dns.exception
        import dns.resolver

        try:
            answer = await resolver.resolve(name, "MX", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return _OTHER, self._settings.negative_ttl_s
        except dns.exception.DNSException as exc:
            log.debug("MX lookup of %s failed: %s", name, exc)
            return _OTHER, self._settings.failure_ttl_s
        # Mail goes to the most preferred host: a filtering gateway in front of Workspace is where mail is judged
        # (and bounced), so the domain counts as that gateway's (other), not Gmail's. Ties break by host name.
        exchanges = sorted((rdata.preference, rdata.exchange.to_text(omit_final_dot=True).lower())
                           for rdata in answer)
        return self._provider_of_mx_host(exchanges[0][1]) if exchanges else _OTHER, self._settings.ttl_s

    def _provider_of_mx_host(self, host: str) -> str:
        """The provider whose longest suffix (whole labels) matches ``host``; ``other`` for none, or a null MX."""
        labels = host.split(".")
        for start in range(len(labels)):
            provider = self._mx_providers.get(".".join(labels[start:]))
            if provider is not None:
                return provider
        return _OTHER
