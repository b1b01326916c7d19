"""Providers' delivery webhooks: ``POST /webhooks/{provider_name}`` → verified, normalised events on the EVENTS
stream.

For each request: look up the provider instance's type and secrets (``services.reports.provider_secrets``: the
provider catalog), verify and parse with :class:`libs.providers.webhooks.WebhookVerifier`, find the message each
event is about (provider message id index, or our own id when the callback carries it), publish one EventEnvelope
per event with ``Nats-Msg-Id`` derived from the provider's event id (a provider's retry collapses into the first),
and answer 200. The consumer then applies those events like any other. A refused request changes nothing.

Events whose message is not known yet (its SENT or ACCEPTED event is still queued behind the consumer) are
parked in ``reports.unmatched_delivery_events`` and applied by the consumer once that event is recorded.

What a provider really sends is not always readable, and a refused callback is lost once the provider stops
retrying. So only forged, stale and replayed requests are refused for what they are. An authentic body that
cannot be read at all is refused (400) and kept in ``reports.rejected_webhook_items`` for inspection; an item
of an authentic body that cannot be read (one event of a SendGrid batch) is kept there too, while the body's
good events are published and the provider is answered 200, so it does not re-send the good ones. An event
that names no recipient (a Postmark ``Unsubscribe`` bounce has no ``Email``) gets its message's recipient when
the message had only one, so its suppression is not lost either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol

import uvicorn
from esp.v1 import messages_pb2
from nats.js import JetStreamContext
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from libs.common.jetstream import Topology, publish
from libs.providers.events import DeliveryEvent
from libs.providers.webhook_model import (
    CertificateUnavailable,
    MalformedWebhook,
    ReplayedWebhook,
    SignatureInvalid,
    SignatureMissing,
    StaleWebhook,
    SubscriptionConfirmation,
    UnsupportedProvider,
    WebhookConfigurationError,
    WebhookError,
)
from libs.providers.webhooks import WebhookVerifier
from services.reports.envelopes import envelope_for, message_event_from_delivery
from services.reports.message_index import MessageRef, resolve_message

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
PENDING_REPLAY_KEY_S = 10
"""How long a verified request's replay key is held before its events are published: a receiver killed in between
leaves no key for longer than this, so the provider's retry is accepted (its events are deduplicated downstream
by their ids); once published, the key is kept for the whole freshness window."""
"""Largest callback accepted (SendGrid batches many events per POST)."""

WEBHOOKS_RECEIVED = Counter("esp_reports_webhooks_total", "Provider webhook requests by outcome",
                            ["provider", "result"])
WEBHOOK_UNREADABLE = Counter("esp_reports_webhook_unreadable_total",
                              "Unreadable provider webhook payloads kept for inspection", ["provider", "scope"])
WEBHOOK_EVENTS = Counter("esp_reports_webhook_events_total", "Events received in provider webhooks",
                         ["provider", "matched"])

REJECTED_ITEMS_RETENTION = timedelta(days=30)
"""How long an unreadable payload is kept after it was last received (``reports.rejected_webhook_items``)."""
_RETENTION_SWEEP_ROWS = 100
"""Expired rows deleted each time a payload is kept (more than arrive, so the table cannot outgrow retention)."""

# How each refusal is answered. A replay is answered 200: the provider already got its callback through.
_REFUSALS: Sequence[tuple[type[WebhookError], int, str]] = (
    (ReplayedWebhook, 200, "duplicate"),
    (SignatureMissing, 401, "signature_missing"),
    (SignatureInvalid, 401, "signature_invalid"),
    (StaleWebhook, 403, "stale"),
    (MalformedWebhook, 400, "malformed"),
    (CertificateUnavailable, 503, "certificate_unavailable"),
    (UnsupportedProvider, 404, "unsupported_provider"),
    (WebhookConfigurationError, 500, "misconfigured"),
)


@dataclass(frozen=True)
class ProviderWebhookConfig:
    """One provider instance's webhook settings."""

    provider_name: str
    provider_type: str
    """``mailgun``, ``sendgrid``, ``ses``, ``postmark``."""
    secrets: Mapping[str, str]
    """The webhook secrets themselves: ``repr`` names their keys only, so a logged config never shows them."""

    def __repr__(self) -> str:
        return (f"ProviderWebhookConfig(provider_name={self.provider_name!r}, provider_type={self.provider_type!r}, "
                f"secrets=<{', '.join(sorted(self.secrets))}>)")


@dataclass(frozen=True)
class WebhookReply:
    """The HTTP answer to a webhook request."""

    status: int
    result: str
    """Short machine-readable outcome (also the metrics label)."""
    detail: str = ""


SubscriptionConfirmer = Callable[[str, SubscriptionConfirmation], Awaitable[None]]
"""Confirms an SNS subscription for a provider instance (e.g. an HTTPS GET of ``subscribe_url``)."""


async def log_subscription_confirmation(provider_name: str, confirmation: SubscriptionConfirmation) -> None:
    """The default confirmer: log what an operator (or an injected confirmer) must do. Nothing leaves the host."""
    log.warning(
        "SNS subscription confirmation received; confirm it by fetching SubscribeURL",
        extra={"provider": provider_name, "topic_arn": confirmation.topic_arn,
               "subscribe_url": confirmation.subscribe_url},
    )


class WebhookSecretsStore(Protocol):
    """Where a provider instance's webhook type and secrets come from (``services.reports.provider_secrets``: the
    provider catalog, set through the router's admin RPCs and applied within seconds)."""

    async def get(self, provider_name: str) -> ProviderWebhookConfig | None:
        """The settings of ``provider_name``, or None when no such provider instance has webhooks configured."""
        ...


class WebhookReceiver:
    """Verifies provider callbacks and publishes their events."""

    def __init__(self, pool: AsyncConnectionPool, js: JetStreamContext, topology: Topology,
                 verifier: WebhookVerifier, secrets: WebhookSecretsStore, *,
                 confirmer: SubscriptionConfirmer = log_subscription_confirmation,
                 publish_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._js = js
        self._topology = topology
        self._verifier = verifier
        self._secrets = secrets
        self._confirmer = confirmer
        self._publish_timeout_s = publish_timeout_s

    async def receive(self, provider_name: str, headers: Mapping[str, str], body: bytes) -> WebhookReply:
        """Handle one callback addressed to ``provider_name``."""
        config = await self._secrets.get(provider_name)
        if config is None:
            return WebhookReply(404, "unknown_provider", f"no webhooks configured for {provider_name!r}")
        try:
            result = await self._verifier.verify(
                config.provider_type, config.secrets, headers, body, provider_name=provider_name,
                pending_s=PENDING_REPLAY_KEY_S,
            )
        except MalformedWebhook as exc:
            if exc.authentic:
                await self._keep_unreadable_body(config, body, str(exc))
            return _refusal(exc)
        except WebhookError as exc:
            return _refusal(exc)
        if isinstance(result, SubscriptionConfirmation):
            await self._confirmer(provider_name, result)
            return WebhookReply(200, "subscription_confirmation")
        try:
            await self._deliver(provider_name, result.events)
            if result.malformed:
                await self._keep(config, "item", [
                    (item.index, item.reason, json.dumps(item.raw, ensure_ascii=False).encode())
                    for item in result.malformed
                ])
            # Published: from now on a copy of this request is a replay. (A receiver that died before this line
            # recorded the key for PENDING_REPLAY_KEY_S only, so the provider's retry is accepted.)
            await self._verifier.confirm(config.provider_type, config.secrets, headers, body,
                                         provider_name=provider_name)
        except Exception:
            log.exception("could not process a verified webhook; asking the provider to retry",
                          extra={"provider": provider_name})
            # Let the provider's retry of this very request through the replay guard.
            with contextlib.suppress(WebhookError):
                await self._verifier.release(config.provider_type, config.secrets, headers, body,
                                             provider_name=provider_name)
            return WebhookReply(503, "unavailable", "try again later")
        if result.malformed:
            return WebhookReply(200, "accepted_with_unreadable_items",
                                f"{len(result.malformed)} unreadable item(s) kept for inspection")
        return WebhookReply(200, "accepted")

    async def _keep_unreadable_body(self, config: ProviderWebhookConfig, body: bytes, reason: str) -> None:
        """Keep an authentic body nobody can read. Best effort: the request is refused either way, so the provider
        retries it and a later attempt keeps it if this one could not."""
        try:
            await self._keep(config, "body", [(None, reason, body)])
        except Exception:
            log.exception("could not keep an unreadable webhook body", extra={"provider": config.provider_name})

    async def _keep(self, config: ProviderWebhookConfig, scope: str,
                    payloads: Sequence[tuple[int | None, str, bytes]]) -> None:
        """Store unreadable payloads (index in the batch, reason, exact bytes) for inspection; a payload kept before
        counts up instead of adding a row. Expired rows go in the same transaction."""
        by_digest: dict[bytes, tuple[int | None, str, bytes]] = {}
        for index, reason, payload in payloads:
            by_digest.setdefault(hashlib.sha256(payload).digest(), (index, reason, payload))
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO reports.rejected_webhook_items
                       (provider, provider_type, scope, item_index, reason, payload, payload_sha256)
                   SELECT %s, %s, %s, i, r, p, d
                   FROM unnest(%s::integer[], %s::text[], %s::bytea[], %s::bytea[]) AS u(i, r, p, d)
                   ON CONFLICT (provider, payload_sha256) DO UPDATE
                       SET last_received_at = now(), reason = excluded.reason,
                           times_received = reports.rejected_webhook_items.times_received + 1""",
                (
                    config.provider_name, config.provider_type, scope,
                    [index for index, _, _ in by_digest.values()],
                    [reason for _, reason, _ in by_digest.values()],
                    [payload for _, _, payload in by_digest.values()],
                    list(by_digest),
                ),
            )
            await conn.execute(
                """DELETE FROM reports.rejected_webhook_items WHERE id IN (
                       SELECT id FROM reports.rejected_webhook_items WHERE last_received_at < now() - %s
                       ORDER BY last_received_at LIMIT %s)""",
                (REJECTED_ITEMS_RETENTION, _RETENTION_SWEEP_ROWS),
            )
        WEBHOOK_UNREADABLE.labels(config.provider_name, scope).inc(len(payloads))
        log.warning("kept unreadable webhook payloads for inspection",
                    extra={"provider": config.provider_name, "scope": scope,
                           "reasons": [reason for _, reason, _ in payloads][:10]})

    async def _deliver(self, provider_name: str, events: Sequence[DeliveryEvent]) -> None:
        unmatched: list[tuple[DeliveryEvent, messages_pb2.MessageEvent]] = []
        for event in events:
            ref = await self._resolve(provider_name, event)
            if ref is not None and not event.recipient:
                event = await self._with_only_recipient(event, ref)
            message_event = message_event_from_delivery(provider_name, event, ref.message_id if ref else "")
            WEBHOOK_EVENTS.labels(provider_name, "yes" if ref else "no").inc()
            if ref is None:
                unmatched.append((event, message_event))
                continue
            envelope = envelope_for(ref.tenant_id, ref.message_id, ref.message_class, message_event)
            await publish(self._js, self._topology.events_subject(ref.tenant_id), envelope.SerializeToString(),
                          msg_id=message_event.event_id, timeout_s=self._publish_timeout_s)
        if unmatched:
            await self._park(provider_name, unmatched)

    async def _resolve(self, provider_name: str, event: DeliveryEvent) -> MessageRef | None:
        async with self._pool.connection() as conn:
            return await resolve_message(conn, provider_name, event.provider_message_id or "", event.recipient,
                                         event.message_id or "", event.tenant_id or "")

    async def _with_only_recipient(self, event: DeliveryEvent, ref: MessageRef) -> DeliveryEvent:
        """``event`` naming its message's recipient when the callback named none and the message had one only."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT to_addrs || cc_addrs || bcc_addrs FROM reports.messages
                   WHERE tenant_id = %s AND message_id = %s""",
                (ref.tenant_id, ref.message_id),
            )
            row = await cur.fetchone()
        mailboxes = row[0] if row is not None and isinstance(row[0], list) else []
        addresses = {str(box.get("email", "")).strip().lower() for box in mailboxes if isinstance(box, dict)} - {""}
        if len(addresses) != 1:
            return event
        return replace(event, recipient=addresses.pop())

    async def _park(self, provider_name: str,
                    unmatched: Sequence[tuple[DeliveryEvent, messages_pb2.MessageEvent]]) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                """INSERT INTO reports.unmatched_delivery_events (event_id, provider, provider_message_id, message_id,
                       event) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[])
                   ON CONFLICT (event_id) DO NOTHING""",
                (
                    [m.event_id for _, m in unmatched],
                    [provider_name] * len(unmatched),
                    [e.provider_message_id or "" for e, _ in unmatched],
                    [e.message_id or "" for e, _ in unmatched],
                    [m.SerializeToString() for _, m in unmatched],
                ),
            )
        log.info("parked delivery events of unknown messages", extra={"provider": provider_name,
                                                                       "events": len(unmatched)})

    def asgi_app(self, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
        """The HTTP application: ``POST /webhooks/{provider_name}``, ``GET /healthz`` and ``extra_routes`` (the
        other public HTTP endpoints reports serves on the same port, e.g. one-click unsubscribe)."""

        async def webhook(request: Request) -> Response:
            provider_name = request.path_params["provider_name"]
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                return _json(WebhookReply(413, "too_large"), "")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return _json(WebhookReply(413, "too_large"), "")
            reply = await self.receive(provider_name, dict(request.headers), bytes(body))
            return _json(reply, provider_name)

        async def healthz(_request: Request) -> Response:
            return Response("ok", media_type="text/plain")

        return Starlette(routes=[
            Route("/webhooks/{provider_name}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *extra_routes,
        ])


def _refusal(exc: WebhookError) -> WebhookReply:
    for error_type, status, result in _REFUSALS:
        if isinstance(exc, error_type):
            return WebhookReply(status, result, str(exc))
    return WebhookReply(400, "refused", str(exc))


def _json(reply: WebhookReply, provider_name: str) -> JSONResponse:
    # Names of unknown providers come straight from URLs: keep them out of the labels (unbounded cardinality).
    WEBHOOKS_RECEIVED.labels(provider_name if reply.result != "unknown_provider" else "", reply.result).inc()
    if reply.status >= 400:
        log.info("webhook refused", extra={"provider": provider_name, "status": reply.status,
                                           "result": reply.result, "detail": reply.detail})
    content: dict[str, Any] = {"result": reply.result}
    if reply.detail and reply.status < 500:
        content["detail"] = reply.detail
    return JSONResponse(content, status_code=reply.status)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gRPC service's event loop: the gRPC bootstrap owns SIGTERM, so uvicorn must not."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(app: Any, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve an ASGI app until ``stop`` is set, then shut down gracefully (a ``ServiceApp`` background task)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
    server = _EmbeddedServer(config)

    async def run_server() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits the process when it cannot bind; here that is a task failure
            raise RuntimeError(f"the webhook HTTP server could not start on {host}:{port}") from exc

    serving = asyncio.create_task(run_server())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await serving
    stopping.cancel()
    if not stop.is_set():
        raise RuntimeError(f"the webhook HTTP server on {host}:{port} stopped by itself")

