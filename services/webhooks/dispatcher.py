"""The dispatcher: sends queued deliveries, signed, and decides what follows each attempt
(:mod:`services.webhooks.outcomes` writes it, for many attempts at once).

Each pass claims due deliveries (``next_attempt_time`` pushed ahead by a lease, so another replica — or this one
after a crash — takes them only once the lease ran out: a delivery is never lost, at worst sent twice with the
same webhook-id) and hands each to its endpoint's lane. A lane sends at most ``endpoint_concurrency`` at once, and
an endpoint whose lane is full is not claimed for: a slow or dead endpoint occupies its own slots, never another
endpoint's. When an attempt finds the endpoint unreachable (no connection, no answer in time), or
``TRIP_AFTER`` attempts in a row fail, the endpoint's breaker opens: its lane narrows to one
attempt at a time until one succeeds, and its other deliveries (and those its lane still held) wait until the
failed one has been tried again, the probe. A dead endpoint then neither fills every claim's scan nor ties up
connections and CPU by the dozen; the first success releases what the breaker held.

Outcomes: 2xx delivered; 410 Gone disables the endpoint; 429/503 with Retry-After wait that long; anything else
(a status, a timeout, a refused destination) waits the schedule's next delay, and the delivery fails once the
schedule is exhausted. An endpoint failing with no success for ``disable_after`` is disabled; either way the
tenant's other endpoints get a ``webhook_endpoint.disabled`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Histogram
from psycopg_pool import AsyncConnectionPool

from libs.common.stopping import pause_unless_stopped
from libs.common.telemetry import message_spans
from services.webhooks.config import WebhooksSettings
from services.webhooks.endpoints import SigningKeys
from services.webhooks.outcomes import Claimed, DeliveryOutcome, OutcomeRecorder
from services.webhooks.schedule import next_delay, retry_after_s
from services.webhooks.signing import signature_header
from services.webhooks.transport import AttemptResult, WebhookTransport

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("esp.webhooks")

ATTEMPTS = Counter("esp_webhook_attempts_total", "Webhook HTTP attempts", ["outcome"])
ATTEMPT_LATENCY = Histogram("esp_webhook_attempt_seconds", "Webhook HTTP attempt latency")
CLAIM_BATCH = 200
TRIP_AFTER = 3
"""Failed attempts in a row that open an endpoint's breaker."""
PER_ENDPOINT_CLAIM = 32
"""Most deliveries of one endpoint claimed per pass (its lane's queue)."""


class Dispatcher:
    """Delivers the queue until stopped."""

    def __init__(self, pool: AsyncConnectionPool, transport: WebhookTransport, keys: SigningKeys,
                 settings: WebhooksSettings) -> None:
        self._pool = pool
        self._outcomes = OutcomeRecorder(pool, disable_after=timedelta(seconds=settings.webhook_disable_after_s),
                                         probe_window=timedelta(seconds=settings.webhook_timeout_s + 1))
        self._transport = transport
        self._keys = keys
        self._settings = settings
        self._lease = timedelta(seconds=settings.webhook_timeout_s * (
            PER_ENDPOINT_CLAIM / settings.webhook_endpoint_concurrency + 2))
        self._queues: dict[str, deque[Claimed]] = defaultdict(deque)
        self._in_flight: dict[str, int] = defaultdict(int)
        self._failures: dict[str, int] = {}
        """Consecutive failed attempts per endpoint (here), reset by a success."""
        self._failing: set[str] = set()
        """Endpoints whose breaker is open: ``TRIP_AFTER`` failures in a row."""
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Deliveries were just queued: look now rather than at the next poll."""
        self._wake.set()

    def _width(self, endpoint_id: str) -> int:
        """How many attempts the endpoint's lane makes at once: one while its last attempt failed (a half-open
        breaker: one probe at a time until it answers again), else ``webhook_endpoint_concurrency``."""
        return 1 if endpoint_id in self._failing else self._settings.webhook_endpoint_concurrency

    def _busy(self) -> list[str]:
        """Endpoints whose lane has work enough: not claimed for this pass."""
        return [e for e, q in self._queues.items() if len(q) + self._in_flight[e] >= self._width(e)]

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until ``stop``; deliveries in flight get ``webhook_timeout_s`` to finish."""
        while not stop.is_set():
            self._wake.clear()
            try:
                claimed = await self._claim()
            except Exception:
                log.exception("claiming webhook deliveries failed; retrying")
                await pause_unless_stopped(stop, 1.0)
                continue
            for delivery in claimed:
                self._queues[delivery.endpoint_id].append(delivery)
                self._start_lane(delivery.endpoint_id)
            if len(claimed) < CLAIM_BATCH:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._settings.webhook_poll_interval_s)
                except TimeoutError:
                    pass
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._settings.webhook_timeout_s)
        await self._outcomes.close()

    async def _claim(self) -> list[Claimed]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """WITH candidates AS (
                       SELECT d.id, d.endpoint_id, d.next_attempt_time FROM webhooks.deliveries d
                       JOIN webhooks.endpoints e ON e.id = d.endpoint_id
                       WHERE d.state = 'pending' AND d.next_attempt_time <= now()
                         AND (e.enabled OR d.ignore_disabled) AND NOT d.endpoint_id = ANY(%(busy)b)
                       ORDER BY d.next_attempt_time LIMIT %(scan)s
                   ), picked AS (
                       SELECT id FROM (SELECT id, endpoint_id, row_number() OVER (PARTITION BY endpoint_id
                                                                                  ORDER BY next_attempt_time, id) AS n
                                       FROM candidates) ranked
                       WHERE n <= CASE WHEN endpoint_id = ANY(%(failing)b) THEN 1 ELSE %(per_endpoint)s END
                       LIMIT %(limit)s
                   ), locked AS (
                       -- Rows another replica claims, or the outcome writer holds back, are left for later: no
                       -- transaction here waits for another's row locks (nor deadlocks with one).
                       SELECT d.id FROM webhooks.deliveries d
                       WHERE d.id IN (SELECT id FROM picked) AND d.state = 'pending' AND d.next_attempt_time <= now()
                       ORDER BY d.id FOR UPDATE SKIP LOCKED
                   )
                   UPDATE webhooks.deliveries d SET next_attempt_time = now() + %(lease)s, attempts = d.attempts + 1
                   FROM locked, webhooks.endpoints e
                   WHERE d.id = locked.id AND e.id = d.endpoint_id
                   RETURNING d.id, d.endpoint_id, d.tenant_id, d.webhook_id, d.body, d.attempts, d.event_types,
                             e.url, d.traceparent""",
                {"busy": self._busy(), "failing": list(self._failing), "scan": CLAIM_BATCH * 10,
                 "per_endpoint": PER_ENDPOINT_CLAIM,
                 "limit": CLAIM_BATCH, "lease": self._lease})
            rows = await cur.fetchall()
        return [Claimed(i, e, t, w, bytes(b), a, tuple(types), u, tp or "")
                for i, e, t, w, b, a, types, u, tp in rows]

    def _start_lane(self, endpoint_id: str) -> None:
        while (self._queues[endpoint_id]
               and self._in_flight[endpoint_id] < self._width(endpoint_id)):
            delivery = self._queues[endpoint_id].popleft()
            self._in_flight[endpoint_id] += 1
            task = asyncio.create_task(self._send(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, delivery: Claimed) -> None:
        result: AttemptResult | None = None
        try:
            async with self._slots:
                result = await self._attempt(delivery)
        except Exception:
            # The lease runs out and the delivery is claimed again: nothing is lost.
            log.exception("webhook delivery %s failed to complete; it will be retried", delivery.id)
        released: tuple[int, ...] = ()
        tripped = False
        if result is not None and result.success:
            self._failing.discard(delivery.endpoint_id)
            self._failures.pop(delivery.endpoint_id, None)
        elif result is not None:
            if len(self._failures) > 100_000:  # deleted endpoints' entries: forget, at worst a few wide lanes
                self._failures.clear()
                self._failing.clear()
            failures = self._failures[delivery.endpoint_id] = self._failures.get(delivery.endpoint_id, 0) + 1
            # An endpoint that cannot be reached trips at once; one that answers badly after ``TRIP_AFTER`` in a row
            # (one failure, such as a keep-alive connection the receiver had just closed, holds back nothing else).
            if result.unreachable or failures >= TRIP_AFTER:
                tripped = True
                self._failing.add(delivery.endpoint_id)
                # What its lane still holds goes back to the queue, held by the breaker.
                released = tuple(d.id for d in self._queues.pop(delivery.endpoint_id, ()))
        self._lane_done(delivery)
        if result is None:
            return
        try:
            await self._outcomes.record(self._outcome(delivery, result, released, tripped))
        except Exception:
            log.exception("recording webhook delivery %s failed; it will be retried", delivery.id)

    def _lane_done(self, delivery: Claimed) -> None:
        """Free the lane's slot (once the HTTP attempt ended: its outcome is written with others')."""
        endpoint_id = delivery.endpoint_id
        self._in_flight[endpoint_id] -= 1
        if self._queues.get(endpoint_id):
            self._start_lane(endpoint_id)
        elif not self._in_flight[endpoint_id]:
            self._queues.pop(endpoint_id, None)
            self._in_flight.pop(endpoint_id, None)
            self._wake.set()

    async def _attempt(self, delivery: Claimed) -> AttemptResult:
        """One signed POST; with tracing on, in a client span under the trace the delivery was queued in (the
        transport is httpcore, which no instrumentation sees). The span names the endpoint by its host only (a
        URL's path may hold the customer's secret); the request carries no trace context (ours is internal)."""
        queued_in = {"traceparent": delivery.traceparent} if delivery.traceparent else None
        with message_spans(_tracer, "POST webhook", [queued_in], kind=SpanKind.CLIENT,
                           attributes={"esp.webhook_id": delivery.webhook_id, "esp.attempt": delivery.attempt,
                                       "server.address": urlsplit(delivery.url).hostname or ""}) as spans:
            result = await self._post(delivery)
            for span in spans:
                span.set_attribute("http.response.status_code", result.status_code or 0)
            return result

    async def _post(self, delivery: Claimed) -> AttemptResult:
        keys = await self._keys.of(delivery.endpoint_id)
        timestamp = int(time.time())
        headers = [("webhook-id", delivery.webhook_id), ("webhook-timestamp", str(timestamp)),
                   ("webhook-signature", signature_header(keys, delivery.webhook_id, timestamp, delivery.body))]
        result = await self._transport.post(delivery.url, headers, delivery.body, pool_key=delivery.endpoint_id)
        ATTEMPT_LATENCY.observe(result.latency_ms / 1000)
        ATTEMPTS.labels("success" if result.success else str(result.status_code or "error")).inc()
        return result

    def _retry_delay(self, delivery: Claimed, result: AttemptResult) -> float | None:
        if result.status_code in (429, 503) and result.retry_after:
            wait = retry_after_s(result.retry_after)
            if wait is not None:
                return min(wait, self._settings.webhook_max_retry_after_s)
        return next_delay(self._settings.webhook_retry_schedule_s, delivery.attempt,
                          self._settings.webhook_retry_jitter)

    def _outcome(self, delivery: Claimed, result: AttemptResult, released: tuple[int, ...],
                 tripped: bool) -> DeliveryOutcome:
        now = datetime.now(UTC)
        gone = result.status_code == 410
        delay = None if result.success or gone else self._retry_delay(delivery, result)
        return DeliveryOutcome(delivery, result, now, now + timedelta(seconds=delay) if delay is not None else None,
                       released, tripped)
