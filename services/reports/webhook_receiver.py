"""Providers' delivery webhooks: ``POST /webhooks/{provider_name}`` → verified, normalised events on the EVENTS
stream.

For each request: look up the provider instance's type and secrets (``services.reports.provider_secrets``: the
provider catalog), verify and parse with :class:`libs.providers.webhooks.WebhookVerifier`, find the message each
event is about (provider message id index, or our own id when the callback carries it), publish one EventEnvelope
per event with ``Nats-Msg-Id`` derived from the provider's event id (a provider's retry collapses into the first),
and answer 200. The consumer then applies those events like any other. A refused request changes nothing.

Events whose message is not known yet (its SENT or ACCEPTED event is still queued behind the consumer) are
parked in ``reports.unmatched_delivery_events`` and applied by the consumer once that event is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
"""Largest callback accepted (SendGrid batches many events per POST)."""

WEBHOOKS_RECEIVED = Counter("esp_reports_webhooks_total", "Provider webhook requests by outcome",
                            ["provider", "result"])
WEBHOOK_EVENTS = Counter("esp_reports_webhook_events_total", "Events received in provider webhooks",
                         ["provider", "matched"])

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
            result = await self._verifier.verify_and_parse(
                config.provider_type, config.secrets, headers, body, provider_name=provider_name
            )
        except WebhookError as exc:
            return _refusal(exc)
        if isinstance(result, SubscriptionConfirmation):
            await self._confirmer(provider_name, result)
            return WebhookReply(200, "subscription_confirmation")
        try:
            await self._deliver(provider_name, result)
        except Exception:
            log.exception("could not process a verified webhook; asking the provider to retry",
                          extra={"provider": provider_name})
            # Let the provider's retry of this very request through the replay guard.
            with contextlib.suppress(WebhookError):
                await self._verifier.release(config.provider_type, config.secrets, headers, body,
                                             provider_name=provider_name)
            return WebhookReply(503, "unavailable", "try again later")
        return WebhookReply(200, "accepted")

    async def _deliver(self, provider_name: str, events: Sequence[DeliveryEvent]) -> None:
        unmatched: list[tuple[DeliveryEvent, messages_pb2.MessageEvent]] = []
        for event in events:
            ref = await self._resolve(provider_name, event)
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

