"""The dispatcher: sends queued deliveries, signs them, records every attempt and schedules the next.

Each pass claims due deliveries (``next_attempt_time`` pushed ahead by a lease, so another replica — or this one
after a crash — takes them only once the lease ran out: a delivery is never lost, at worst sent twice with the
same webhook-id) and hands each to its endpoint's lane. A lane sends at most ``endpoint_concurrency`` at once, and
an endpoint whose lane is full is not claimed for: a slow or dead endpoint occupies its own slots, never another
endpoint's. When an attempt fails, the endpoint's other due deliveries are held back by the same delay (a breaker
per endpoint), so a dead endpoint's queue does not fill every pass.

Outcomes: 2xx delivered; 410 Gone disables the endpoint; 429/503 with Retry-After wait that long; anything else
(a status, a timeout, a refused destination) waits the schedule's next delay, and the delivery fails once the
schedule is exhausted. An endpoint failing with no success for ``disable_after`` is disabled; either way the
tenant's other endpoints get a ``webhook_endpoint.disabled`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from esp.v1 import events_pb2
from prometheus_client import Counter, Histogram
from psycopg_pool import AsyncConnectionPool

from libs.common.event_types import ENDPOINT_DISABLED
from libs.common.stopping import pause_unless_stopped
from services.webhooks.config import WebhooksSettings
from services.webhooks.endpoints import SigningKeys
from services.webhooks.queueing import queue_events, routes_of
from services.webhooks.schedule import next_delay, retry_after_s
from services.webhooks.signing import signature_header
from services.webhooks.transport import AttemptResult, WebhookTransport

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

ATTEMPTS = Counter("esp_webhook_attempts_total", "Webhook HTTP attempts", ["outcome"])
ATTEMPT_LATENCY = Histogram("esp_webhook_attempt_seconds", "Webhook HTTP attempt latency")
CLAIM_BATCH = 200
PER_ENDPOINT_CLAIM = 32
"""Most deliveries of one endpoint claimed per pass (its lane's queue)."""


@dataclass(frozen=True)
class _Claimed:
    id: int
    endpoint_id: str
    tenant_id: str
    webhook_id: str
    body: bytes
    attempt: int
    """This attempt's number (1 for the first)."""
    event_types: tuple[str, ...]
    url: str


class Dispatcher:
    """Delivers the queue until stopped."""

    def __init__(self, pool: AsyncConnectionPool, transport: WebhookTransport, keys: SigningKeys,
                 settings: WebhooksSettings) -> None:
        self._pool = pool
        self._transport = transport
        self._keys = keys
        self._settings = settings
        self._lease = timedelta(seconds=settings.webhook_timeout_s * (
            PER_ENDPOINT_CLAIM / settings.webhook_endpoint_concurrency + 2))
        self._queues: dict[str, deque[_Claimed]] = defaultdict(deque)
        self._in_flight: dict[str, int] = defaultdict(int)
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Deliveries were just queued: look now rather than at the next poll."""
        self._wake.set()

    def _busy(self) -> list[str]:
        """Endpoints whose lane has work enough: not claimed for this pass."""
        return [e for e, q in self._queues.items()
                if len(q) + self._in_flight[e] >= self._settings.webhook_endpoint_concurrency]

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

    async def _claim(self) -> list[_Claimed]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """WITH candidates AS (
                       SELECT d.id, d.endpoint_id, d.next_attempt_time FROM webhooks.deliveries d
                       JOIN webhooks.endpoints e ON e.id = d.endpoint_id
                       WHERE d.state = 'pending' AND d.next_attempt_time <= now()
                         AND (e.enabled OR d.ignore_disabled) AND NOT d.endpoint_id = ANY(%(busy)s)
                       ORDER BY d.next_attempt_time LIMIT %(scan)s
                   ), picked AS (
                       SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY endpoint_id
                                                                     ORDER BY next_attempt_time, id) AS n
                                       FROM candidates) ranked
                       WHERE n <= %(per_endpoint)s LIMIT %(limit)s
                   )
                   UPDATE webhooks.deliveries d SET next_attempt_time = now() + %(lease)s, attempts = d.attempts + 1
                   FROM picked, webhooks.endpoints e
                   WHERE d.id = picked.id AND e.id = d.endpoint_id
                     AND d.state = 'pending' AND d.next_attempt_time <= now()
                   RETURNING d.id, d.endpoint_id, d.tenant_id, d.webhook_id, d.body, d.attempts, d.event_types,
                             e.url""",
                {"busy": self._busy(), "scan": CLAIM_BATCH * 10, "per_endpoint": PER_ENDPOINT_CLAIM,
                 "limit": CLAIM_BATCH, "lease": self._lease})
            rows = await cur.fetchall()
        return [_Claimed(i, e, t, w, bytes(b), a, tuple(types), u) for i, e, t, w, b, a, types, u in rows]

    def _start_lane(self, endpoint_id: str) -> None:
        while (self._queues[endpoint_id]
               and self._in_flight[endpoint_id] < self._settings.webhook_endpoint_concurrency):
            delivery = self._queues[endpoint_id].popleft()
            self._in_flight[endpoint_id] += 1
            task = asyncio.create_task(self._send(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, delivery: _Claimed) -> None:
        try:
            async with self._slots:
                result = await self._attempt(delivery)
            await self._record(delivery, result)
        except Exception:
            # The lease runs out and the delivery is claimed again: nothing is lost.
            log.exception("webhook delivery %s failed to complete; it will be retried", delivery.id)
        finally:
            self._in_flight[delivery.endpoint_id] -= 1
            if self._queues[delivery.endpoint_id]:
                self._start_lane(delivery.endpoint_id)
            elif not self._in_flight[delivery.endpoint_id]:
                self._queues.pop(delivery.endpoint_id, None)
                self._in_flight.pop(delivery.endpoint_id, None)
                self._wake.set()

    async def _attempt(self, delivery: _Claimed) -> AttemptResult:
        keys = await self._keys.of(delivery.endpoint_id)
        timestamp = int(time.time())
        headers = [("webhook-id", delivery.webhook_id), ("webhook-timestamp", str(timestamp)),
                   ("webhook-signature", signature_header(keys, delivery.webhook_id, timestamp, delivery.body))]
        result = await self._transport.post(delivery.url, headers, delivery.body)
        ATTEMPT_LATENCY.observe(result.latency_ms / 1000)
        ATTEMPTS.labels("success" if result.success else str(result.status_code or "error")).inc()
        return result

    def _retry_delay(self, delivery: _Claimed, result: AttemptResult) -> float | None:
        if result.status_code in (429, 503) and result.retry_after:
            wait = retry_after_s(result.retry_after)
            if wait is not None:
                return min(wait, self._settings.webhook_max_retry_after_s)
        return next_delay(self._settings.webhook_retry_schedule_s, delivery.attempt,
                          self._settings.webhook_retry_jitter)

    async def _record(self, delivery: _Claimed, result: AttemptResult) -> None:
        now = datetime.now(UTC)
        gone = result.status_code == 410
        delay = None if result.success or gone else self._retry_delay(delivery, result)
        next_time = now + timedelta(seconds=delay) if delay is not None else None
        state = "delivered" if result.success else ("pending" if next_time is not None else "failed")
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO webhooks.attempts (endpoint_id, delivery_id, webhook_id, attempt, attempt_time,
                       status_code, latency_ms, response_excerpt, error, success, event_types, next_attempt_time)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (delivery.endpoint_id, delivery.id, delivery.webhook_id, delivery.attempt, now,
                 result.status_code, result.latency_ms, result.excerpt.decode("utf-8", "replace"), result.error,
                 result.success, list(delivery.event_types), next_time))
            await conn.execute(
                """UPDATE webhooks.deliveries SET state = %s, next_attempt_time = coalesce(%s, next_attempt_time),
                       finish_time = CASE WHEN %s <> 'pending' THEN now() END WHERE id = %s""",
                (state, next_time, state, delivery.id))
            if result.success:
                # Once a second at most per endpoint: a busy endpoint's row is not rewritten per delivery.
                await conn.execute(
                    """UPDATE webhooks.endpoints SET last_success_time = now(), failing_since = NULL
                       WHERE id = %s AND (failing_since IS NOT NULL OR last_success_time IS NULL
                                          OR last_success_time < now() - interval '1 second')""",
                    (delivery.endpoint_id,))
                return
            if next_time is not None:
                # The endpoint's breaker: its other due deliveries wait as long as this one.
                await conn.execute(
                    """UPDATE webhooks.deliveries SET next_attempt_time = %s
                       WHERE endpoint_id = %s AND state = 'pending' AND next_attempt_time <= now()""",
                    (next_time, delivery.endpoint_id))
            cur = await conn.execute(
                """UPDATE webhooks.endpoints SET failing_since = coalesce(failing_since, now())
                   WHERE id = %s RETURNING failing_since, enabled""", (delivery.endpoint_id,))
            row = await cur.fetchone()
            if row is None or not row[1]:
                return
            failing_since = row[0]
            if gone:
                await self._disable(conn, delivery, "the endpoint answered 410 Gone")
            elif now - failing_since >= timedelta(seconds=self._settings.webhook_disable_after_s):
                await self._disable(conn, delivery,
                                    f"failing since {failing_since.isoformat()} without a success")

    async def _disable(self, conn: object, delivery: _Claimed, reason: str) -> None:
        """Disable the endpoint and tell the tenant's other endpoints (in the caller's transaction)."""
        assert hasattr(conn, "execute")
        await conn.execute(
            """UPDATE webhooks.endpoints SET enabled = false, disabled_reason = %s, update_time = now()
               WHERE id = %s""", (reason, delivery.endpoint_id))
        log.warning("webhook endpoint disabled", extra={"endpoint": delivery.endpoint_id, "reason": reason})
        event = events_pb2.Event(name=f"events/endpoint-disabled-{uuid.uuid4().hex}", type=ENDPOINT_DISABLED,
                                 attributes={"webhook_endpoint": f"webhookEndpoints/{delivery.endpoint_id}",
                                             "url": delivery.url, "reason": reason})
        event.event_time.GetCurrentTime()
        routes = await routes_of(conn, [delivery.tenant_id])  # type: ignore[arg-type]
        await queue_events(conn, routes, {delivery.tenant_id: [event]})  # type: ignore[arg-type]
