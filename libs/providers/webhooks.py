"""Verify and parse providers' delivery webhooks into :class:`~libs.providers.events.DeliveryEvent` values.

The entry point is :meth:`WebhookVerifier.verify` (:meth:`WebhookVerifier.verify_and_parse` when only the good
events matter). Every request goes through the same steps:

1. the provider's handler **authenticates** it (signature or credentials; where the provider signs the raw
   bytes this happens before any JSON parsing) and reports when it was signed and a replay key;
2. the signing time must lie within the provider's **freshness window** (either side of ``now``);
3. the payload is **parsed** into normalised events (or an SNS subscription confirmation), beside the items
   that could not be read (kept, not fatal: one bad item in a batch never costs the good ones);
4. the replay key is recorded in a :class:`ReplayGuard`; a key seen before is rejected.

Only steps 1, 2 and 4 refuse a request for what it is (forged, stale, replayed); step 3 refuses it
(:class:`~libs.providers.webhook_model.MalformedWebhook`, marked authentic) only when nothing in the body can
be read.

Handlers live next to each provider's send code in ``libs/providers/<type>/webhook.py`` and expose
``create_handler(context: HandlerContext) -> WebhookHandler``; they are found by provider type, so adding a
provider touches one folder.

The handlers' contract (what they receive, return and raise, with the exception tree) is
:mod:`libs.providers.webhook_model`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from libs.providers.webhook_model import (
    CertificateFetcher,
    HandlerContext,
    MalformedWebhook,
    ParsedWebhook,
    ParseResult,
    ReplayedWebhook,
    StaleWebhook,
    UnsupportedProvider,
    WebhookHandler,
    WebhookRequest,
    WebhookResult,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "HandlerFactory",
    "InMemoryReplayGuard",
    "RedisReplayGuard",
    "ReplayGuard",
    "WebhookVerifier",
    "handler_factory",
    "register_handler_factory",
]


log = logging.getLogger(__name__)

HandlerFactory = Callable[[HandlerContext], WebhookHandler]

_registered_factories: dict[str, HandlerFactory] = {}
_PROVIDER_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def register_handler_factory(provider_type: str, factory: HandlerFactory) -> None:
    """Register a handler factory for a provider type that does not live in ``libs/providers/<type>/``."""
    _registered_factories[provider_type] = factory


def handler_factory(provider_type: str) -> HandlerFactory:
    """Find the handler factory for a provider type (``libs.providers.<type>.webhook.create_handler``).

    Raises:
        UnsupportedProvider: no such provider type, or it has no webhook module.
    """
    if provider_type in _registered_factories:
        return _registered_factories[provider_type]
    # The type comes from configuration, but it still selects a module to import: keep it to plain names.
    if not _PROVIDER_TYPE_PATTERN.match(provider_type):
        raise UnsupportedProvider(f"invalid provider type {provider_type!r}")
    module_name = f"libs.providers.{provider_type}.webhook"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UnsupportedProvider(f"no webhook support for provider type {provider_type!r}") from exc
        raise
    factory: HandlerFactory | None = getattr(module, "create_handler", None)
    if factory is None:
        raise UnsupportedProvider(f"{module_name} has no create_handler")
    return factory


class ReplayGuard(Protocol):
    """Remembers replay keys for a while (shared by every receiver replica in production)."""

    async def seen(self, key: str, ttl_s: int) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; return True if it was already recorded."""
        ...

    async def forget(self, key: str) -> None:
        """Drop ``key`` (used when a request was accepted but could not be processed)."""
        ...

    async def hold(self, key: str, ttl_s: int) -> None:
        """Keep ``key`` recorded for ``ttl_s`` seconds from now, recorded before or not."""
        ...


class InMemoryReplayGuard:
    """A per-process :class:`ReplayGuard` for tests and single-process development."""

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        """Keep at most ``max_entries`` keys; ``clock`` returns seconds (monotonic by default)."""
        self._expiry_by_key: dict[str, float] = {}
        self._max_entries = max_entries
        self._clock = clock

    async def seen(self, key: str, ttl_s: int) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; return True if it was already recorded and unexpired."""
        now = self._clock()
        expiry = self._expiry_by_key.get(key)
        if expiry is not None and expiry > now:
            return True
        if len(self._expiry_by_key) >= self._max_entries:
            self._evict(now)
        self._expiry_by_key.pop(key, None)
        self._expiry_by_key[key] = now + max(1, ttl_s)
        return False

    async def forget(self, key: str) -> None:
        """Drop ``key``."""
        self._expiry_by_key.pop(key, None)

    async def hold(self, key: str, ttl_s: int) -> None:
        """Keep ``key`` for ``ttl_s`` seconds from now."""
        self._expiry_by_key.pop(key, None)
        self._expiry_by_key[key] = self._clock() + max(1, ttl_s)

    def _evict(self, now: float) -> None:
        expired = [key for key, expiry in self._expiry_by_key.items() if expiry <= now]
        for key in expired:
            del self._expiry_by_key[key]
        # Still full: drop the oldest insertions (dicts keep insertion order). Bounded memory beats a
        # perfect memory here; the production guard is Redis.
        while len(self._expiry_by_key) >= self._max_entries:
            del self._expiry_by_key[next(iter(self._expiry_by_key))]


class RedisReplayGuard:
    """A :class:`ReplayGuard` in Redis: ``SET key 1 NX EX ttl`` is atomic, so concurrent replicas agree."""

    def __init__(self, redis: Redis, *, key_prefix: str = "esp:webhook-replay:") -> None:
        """Use the given client (``redis.asyncio.Redis``); keys are ``key_prefix + replay key``."""
        self._redis = redis
        self._key_prefix = key_prefix

    async def seen(self, key: str, ttl_s: int) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; return True if it already existed."""
        created = await self._redis.set(self._key_prefix + key, b"1", nx=True, ex=max(1, ttl_s))
        return not created

    async def forget(self, key: str) -> None:
        """Drop ``key``."""
        await self._redis.delete(self._key_prefix + key)

    async def hold(self, key: str, ttl_s: int) -> None:
        """Keep ``key`` for ``ttl_s`` seconds from now."""
        await self._redis.set(self._key_prefix + key, b"1", ex=max(1, ttl_s))


class WebhookVerifier:
    """Verifies and parses provider webhooks; one instance per receiver process."""

    def __init__(
        self,
        replay_guard: ReplayGuard,
        *,
        certificate_fetcher: CertificateFetcher | None = None,
        tolerances: Mapping[str, timedelta] | None = None,
    ) -> None:
        """Create a verifier.

        Args:
            replay_guard: where replay keys are remembered (Redis in production).
            certificate_fetcher: how SNS signing certificates are fetched (defaults to HTTPS via httpx).
            tolerances: freshness window per provider type, overriding each handler's default.
        """
        self._replay_guard = replay_guard
        self._context = HandlerContext(certificate_fetcher=certificate_fetcher)
        self._tolerances = dict(tolerances or {})
        self._handlers: dict[str, WebhookHandler] = {}

    def handler(self, provider_type: str) -> WebhookHandler:
        """The (cached) handler for a provider type.

        Raises:
            UnsupportedProvider: the provider type has no webhooks.
        """
        handler = self._handlers.get(provider_type)
        if handler is None:
            handler = handler_factory(provider_type)(self._context)
            self._handlers[provider_type] = handler
        return handler

    def tolerance(self, provider_type: str) -> timedelta:
        """The freshness window applied to a provider type."""
        return self._tolerances.get(provider_type) or self.handler(provider_type).default_tolerance

    async def verify(
        self,
        provider_type: str,
        secrets: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        now: datetime | None = None,
        *,
        provider_name: str | None = None,
        pending_s: int | None = None,
    ) -> ParseResult:
        """Authenticate a webhook request and return its events and the items that could not be read.

        Args:
            provider_type: ``mailgun``, ``sendgrid``, ``ses`` or ``postmark``.
            secrets: the provider's webhook secrets (keys per provider, see each handler).
            headers: the request headers (any case).
            body: the raw request body, unmodified.
            now: the current time (aware); defaults to the wall clock.
            provider_name: the configured provider instance; defaults to ``provider_type``.
            pending_s: record the replay key for at most this long, until :meth:`confirm` keeps it for the whole
                freshness window once the events are safe: a receiver that dies in between has the provider's
                retry accepted (None: record it for the whole window now).

        Returns:
            A :class:`~libs.providers.webhook_model.ParsedWebhook` (events possibly empty: providers also
            report things we do not track; unreadable items beside them), or, for SNS, a
            :class:`~libs.providers.webhook_model.SubscriptionConfirmation` the receiver must confirm.

        Raises:
            WebhookRejected: (a subclass) the request must not be trusted, or (``MalformedWebhook``) nothing
                in it can be read; nothing was recorded.
            UnsupportedProvider: the provider type has no webhooks.
            WebhookConfigurationError: the secrets are incomplete.
        """
        handler = self.handler(provider_type)
        request = _request(provider_type, secrets, headers, body, now, provider_name)
        authenticated = await handler.authenticate(request)
        tolerance = self.tolerance(provider_type)
        skew = abs(request.now - authenticated.signed_at)
        if skew > tolerance:
            raise StaleWebhook(
                f"signed at {authenticated.signed_at.isoformat()}, {skew.total_seconds():.0f}s from now "
                f"(window {tolerance.total_seconds():.0f}s)"
            )
        try:
            result = handler.parse(request, authenticated)
        except MalformedWebhook as exc:
            # Authentication passed, so whatever parse cannot read, the provider really sent.
            raise MalformedWebhook(str(exc), authentic=True) from exc
        # Remember the key for as long as this request would still pass the freshness check, no longer.
        remaining = authenticated.signed_at + tolerance - request.now
        ttl_s = max(1, math.ceil(remaining.total_seconds()) + 1)
        if pending_s is not None:
            ttl_s = min(ttl_s, max(1, pending_s))
        if await self._replay_guard.seen(f"{provider_type}:{authenticated.replay_key}", ttl_s):
            raise ReplayedWebhook(f"{provider_type} webhook already accepted")
        return result

    async def verify_and_parse(
        self,
        provider_type: str,
        secrets: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        now: datetime | None = None,
        *,
        provider_name: str | None = None,
    ) -> WebhookResult:
        """Like :meth:`verify`, returning the good events only (unreadable items are logged, then dropped).

        For callers that keep nothing for inspection (tests, the simulator's checks); the receiver uses
        :meth:`verify` and stores the unreadable items.
        """
        result = await self.verify(provider_type, secrets, headers, body, now, provider_name=provider_name)
        if not isinstance(result, ParsedWebhook):
            return result
        for item in result.malformed:
            log.warning("dropping an unreadable webhook item", extra={"provider_type": provider_type,
                                                                     "reason": item.reason, "index": item.index})
        return list(result.events)

    async def confirm(
        self,
        provider_type: str,
        secrets: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        now: datetime | None = None,
        *,
        provider_name: str | None = None,
    ) -> None:
        """Keep an accepted request's replay key for the rest of its freshness window (after :meth:`verify` with
        ``pending_s``, once its events are published)."""
        key, ttl_s = await self._replay_key(provider_type, secrets, headers, body, now, provider_name)
        await self._replay_guard.hold(key, ttl_s)

    async def _replay_key(self, provider_type: str, secrets: Mapping[str, str], headers: Mapping[str, str],
                          body: bytes, now: datetime | None, provider_name: str | None) -> tuple[str, int]:
        """A genuine request's replay key, and how long it stays fresh (authenticated again: only the request
        itself can move its own key)."""
        request = _request(provider_type, secrets, headers, body, now, provider_name)
        authenticated = await self.handler(provider_type).authenticate(request)
        remaining = authenticated.signed_at + self.tolerance(provider_type) - request.now
        return (f"{provider_type}:{authenticated.replay_key}",
                max(1, math.ceil(remaining.total_seconds()) + 1))

    async def release(
        self,
        provider_type: str,
        secrets: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        now: datetime | None = None,
        *,
        provider_name: str | None = None,
    ) -> None:
        """Forget an accepted request's replay key, so the provider's retry of it is accepted again.

        Call this when processing the events failed after :meth:`verify_and_parse` returned (the receiver then
        answers with an error so the provider retries). The request is authenticated again first, so only a
        genuine request can clear its own key.
        """
        key, _ = await self._replay_key(provider_type, secrets, headers, body, now, provider_name)
        await self._replay_guard.forget(key)


def _request(
    provider_type: str,
    secrets: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    now: datetime | None,
    provider_name: str | None,
) -> WebhookRequest:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return WebhookRequest(
        provider_name=provider_name or provider_type,
        secrets=secrets,
        headers={name.lower(): value for name, value in headers.items()},
        body=body,
        now=now,
    )
