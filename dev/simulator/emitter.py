"""Delivery webhooks: after a realistic delay, POST signed delivered/bounced/complained callbacks.

Payloads and signatures come from ``dev/simulator/signing.py`` (each provider's real wire format and signing
algorithm). Key material the receiver needs to verify them is generated per personality at start-up and
published by the admin API (``GET /_sim/personalities/<name>``): Mailgun signing key, SendGrid verification key,
the SNS certificate (also served as PEM) and topic ARN for SES, Postmark's basic-auth pair.

Memory stays bounded: at most ``max_pending`` callbacks wait (further ones are counted as dropped) and the log
of sent callbacks keeps the newest ``log_cap``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from dev.simulator import signing
from dev.simulator.model import Personality, SimMessage
from dev.simulator.state import SimulatorState
from libs.providers.events import BounceType, DeliveryEvent, EventKind

#: Delay between a complaint and the delivery it follows, in seconds.
COMPLAINT_AFTER_S = 0.5
#: Retries of a callback the receiver did not take (2xx), with these pauses in seconds.
RETRY_PAUSES_S = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class SigningMaterial:
    """Secrets of one personality's webhooks (what the receiving side must be configured with)."""

    mailgun_signing_key: str | None = None
    sendgrid_private_key_pem: bytes | None = None
    sendgrid_verification_key: str | None = None
    sns_private_key_pem: bytes | None = None
    sns_certificate_pem: bytes | None = None
    sns_certificate_url: str | None = None
    sns_topic_arn: str | None = None
    postmark_user: str | None = None
    postmark_password: str | None = None

    def public(self) -> dict[str, Any]:
        """What the receiver needs (no private keys)."""
        return {
            key: value.decode() if isinstance(value, bytes) else value
            for key, value in {
                "mailgun_signing_key": self.mailgun_signing_key,
                "sendgrid_verification_key": self.sendgrid_verification_key,
                "sns_certificate_pem": self.sns_certificate_pem,
                "sns_certificate_url": self.sns_certificate_url,
                "sns_topic_arn": self.sns_topic_arn,
                "postmark_user": self.postmark_user,
                "postmark_password": self.postmark_password,
            }.items()
            if value is not None
        }

    def receiver_secrets(self) -> dict[str, str]:
        """The secrets mapping ``WebhookVerifier.verify_and_parse`` takes for this personality's provider.

        Key names are those of ``libs/providers/<type>/webhook.py``; the SES certificate itself is fetched from
        ``sns_certificate_url`` (in the simulator: ``GET /_sim/personalities/<name>/sns-certificate.pem``).
        """
        candidates = {
            "webhook_signing_key": self.mailgun_signing_key,
            "verification_key": self.sendgrid_verification_key,
            "topic_arns": self.sns_topic_arn,
            "webhook_user": self.postmark_user,
            "webhook_password": self.postmark_password,
        }
        return {key: value for key, value in candidates.items() if value is not None}


def make_signing_material(personality: Personality) -> SigningMaterial:
    """Key material for a personality: from its credentials where given, generated otherwise."""
    credentials = personality.credentials
    if personality.type == "mailgun":
        return SigningMaterial(mailgun_signing_key=credentials.get("webhook_signing_key", f"{personality.name}-key"))
    if personality.type == "sendgrid":
        pair = signing.generate_sendgrid_key_pair()
        return SigningMaterial(sendgrid_private_key_pem=pair.private_key_pem,
                               sendgrid_verification_key=pair.verification_key)
    if personality.type == "ses":
        certificate = signing.generate_sns_certificate()
        region = personality.region or "us-east-1"
        return SigningMaterial(
            sns_private_key_pem=certificate.private_key_pem,
            sns_certificate_pem=certificate.certificate_pem,
            sns_certificate_url=f"https://sns.{region}.amazonaws.com/SimpleNotificationService-{personality.name}.pem",
            sns_topic_arn=f"arn:aws:sns:{region}:123456789012:esp-{personality.name}",
        )
    if personality.type == "postmark":
        return SigningMaterial(postmark_user=credentials.get("webhook_user", "postmark"),
                               postmark_password=credentials.get("webhook_password", f"{personality.name}-hook"))
    return SigningMaterial()


@dataclass(frozen=True)
class PendingCallback:
    """One callback waiting for its time."""

    personality: str
    url: str
    event: DeliveryEvent
    attempt: int = 1


class WebhookEmitter:
    """Schedules and sends signed delivery callbacks; the hook ``schedule`` is called for accepted messages."""

    def __init__(self, state: SimulatorState, *, max_pending: int = 10_000, log_cap: int = 1_000,
                 concurrency: int = 8) -> None:
        self._state = state
        self._max_pending = max_pending
        self._heap: list[tuple[float, int, PendingCallback]] = []
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.material = {name: make_signing_material(p) for name, p in state.personalities.items()}
        self.log: deque[dict[str, Any]] = deque(maxlen=log_cap)
        self.dropped = 0

    async def start(self) -> None:
        """Start the sending loop."""
        self._client = httpx.AsyncClient(timeout=5.0)
        self._task = asyncio.create_task(self._run(), name="webhook-emitter")

    async def aclose(self) -> None:
        """Stop sending; pending callbacks are discarded."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def clear(self) -> None:
        """Forget pending callbacks and the log (simulator reset)."""
        self._heap.clear()
        self.log.clear()
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Callbacks waiting to be sent."""
        return len(self._heap)

    def schedule(self, personality: Personality, message: SimMessage) -> None:
        """Plan callbacks for every recipient of an accepted message, per the personality's knobs."""
        knobs = self._state.knobs(personality.name)
        if knobs.webhook_url is None or personality.type not in {"mailgun", "sendgrid", "ses", "postmark"}:
            return
        for recipient in message.recipients:
            delay = (knobs.webhook_delay_ms + self._state.random.uniform(0, knobs.webhook_jitter_ms)) / 1000.0
            draw = self._state.random.random()
            if draw < knobs.bounce_rate:
                kinds = [(EventKind.BOUNCED, 0.0)]
            elif draw < knobs.bounce_rate + knobs.complaint_rate:
                kinds = [(EventKind.DELIVERED, 0.0), (EventKind.COMPLAINED, COMPLAINT_AFTER_S)]
            else:
                kinds = [(EventKind.DELIVERED, 0.0)]
            for kind, extra in kinds:
                event = DeliveryEvent(
                    kind=kind,
                    provider_type=personality.type,
                    provider_name=personality.name,
                    recipient=recipient,
                    occurred_at=datetime.now(UTC),
                    event_id=str(uuid.uuid4()),
                    provider_message_id=message.provider_message_id,
                    message_id=message.esp_message_id,
                    bounce_type=BounceType.HARD if kind is EventKind.BOUNCED else None,
                )
                pending = PendingCallback(personality.name, knobs.webhook_url, event)
                self._push(time.monotonic() + delay + extra, pending)

    def _push(self, due: float, pending: PendingCallback) -> None:
        if len(self._heap) >= self._max_pending:
            self.dropped += 1
            return
        heapq.heappush(self._heap, (due, next(self._order), pending))
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._heap:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            due = self._heap[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                continue
            _, _, pending = heapq.heappop(self._heap)
            await self._limit.acquire()
            task = asyncio.create_task(self._send(pending))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _build(self, pending: PendingCallback) -> signing.SignedCallback:
        personality = self._state.personality(pending.personality)
        material = self.material[pending.personality]
        event = pending.event
        if personality.type == "mailgun":
            return signing.mailgun_callback(event, material.mailgun_signing_key or "")
        if personality.type == "sendgrid":
            return signing.sendgrid_callback([event], material.sendgrid_private_key_pem or b"")
        if personality.type == "ses":
            return signing.ses_callback(event, material.sns_private_key_pem or b"",
                                        material.sns_certificate_url or "", material.sns_topic_arn or "")
        return signing.postmark_callback(event, material.postmark_user or "", material.postmark_password or "")

    async def _send(self, pending: PendingCallback) -> None:
        try:
            callback = self._build(pending)
            status: int | None = None
            error = ""
            if self._client is None:
                raise RuntimeError("WebhookEmitter.start() was not called")
            try:
                response = await self._client.post(pending.url, content=callback.body, headers=callback.headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            self.log.append(
                {
                    "personality": pending.personality,
                    "url": pending.url,
                    "kind": str(pending.event.kind),
                    "recipient": pending.event.recipient,
                    "provider_message_id": pending.event.provider_message_id,
                    "esp_message_id": pending.event.message_id,
                    "attempt": pending.attempt,
                    "status": status,
                    "error": error,
                    "sent_at": time.time(),
                }
            )
            delivered = status is not None and 200 <= status < 300
            if not delivered and pending.attempt <= len(RETRY_PAUSES_S):
                pause = RETRY_PAUSES_S[pending.attempt - 1]
                retry = PendingCallback(pending.personality, pending.url, pending.event, pending.attempt + 1)
                self._push(time.monotonic() + pause, retry)
        finally:
            self._limit.release()
