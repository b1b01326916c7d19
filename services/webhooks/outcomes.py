"""What an attempt leaves behind: the log row, the delivery's next state, the endpoint's health — written for
many attempts at once.

Attempts end in bursts (a hundred dead endpoints' timeouts expire together); one transaction per attempt would
queue the healthy endpoints' bookkeeping behind hundreds of them. Outcomes are group-committed instead
(``libs.common.batching``): one transaction, a few set-based statements, for whatever ended meanwhile. An attempt
whose outcome is lost (a crash before the commit) is retried when its lease ends, with the same webhook-id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from esp.v1 import events_pb2
from psycopg_pool import AsyncConnectionPool

from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.event_types import ENDPOINT_DISABLED
from services.webhooks.queueing import queue_events, routes_of
from services.webhooks.transport import AttemptResult

__all__ = ["Claimed", "DeliveryOutcome", "OutcomeRecorder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt."""

    id: int
    endpoint_id: str
    tenant_id: str
    webhook_id: str
    body: bytes
    attempt: int
    """This attempt's number (1 for the first)."""
    event_types: tuple[str, ...]
    url: str
    traceparent: str = ""
    """The trace context it was queued in: its attempt's span joins that trace ("" for none)."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """How one attempt ended and what follows."""

    delivery: Claimed
    result: AttemptResult
    attempt_time: datetime
    next_time: datetime | None
    """When to try again; None: no more tries (delivered, gone or the schedule exhausted)."""
    released: tuple[int, ...] = ()
    """Deliveries of the same endpoint claimed but not tried, given back (its breaker opened), their claim's
    attempt count undone."""
    tripped: bool = False
    """The endpoint's breaker is open: its other deliveries wait until this one has been tried again."""

    @property
    def state(self) -> str:
        """The delivery's state after this attempt."""
        if self.result.success:
            return "delivered"
        return "pending" if self.next_time is not None else "failed"

    @property
    def gone(self) -> bool:
        """The receiver answered 410: the endpoint is to be disabled."""
        return self.result.status_code == 410


class OutcomeRecorder:
    """Writes outcomes in batches; disables endpoints that answered 410 or failed too long."""

    def __init__(self, pool: AsyncConnectionPool, *, disable_after: timedelta, probe_window: timedelta) -> None:
        self._pool = pool
        self._disable_after = disable_after
        self._probe_window = probe_window
        """How much longer than the failed delivery the endpoint's others wait: the next probe's attempt time."""
        self._committer: GroupCommitter[DeliveryOutcome, None] = GroupCommitter(
            self._flush, BatchingOptions(max_batch_size=500, workers=1, shards=1), name="webhook-outcomes")

    async def record(self, outcome: DeliveryOutcome) -> None:
        """Write ``outcome`` (with whatever else ended meanwhile)."""
        await self._committer.submit(outcome)

    async def close(self) -> None:
        """Write what is queued, then stop."""
        await self._committer.close()

    async def _flush(self, outcomes: Sequence[DeliveryOutcome]) -> Sequence[Exception | None]:
        async with self._pool.connection() as conn, conn.transaction():
            await self._write(conn, outcomes)
        return [None] * len(outcomes)

    async def _write(self, conn: psycopg.AsyncConnection, outcomes: Sequence[DeliveryOutcome]) -> None:
        await conn.execute(
            """INSERT INTO webhooks.attempts (endpoint_id, delivery_id, webhook_id, attempt, attempt_time,
                   status_code, latency_ms, response_excerpt, error, success, event_types, next_attempt_time)
               SELECT e, d, w, a, t, s, l, x, r, ok, types::text[], n
               FROM unnest(%b::text[], %b::bigint[], %b::text[], %b::int[], %b::timestamptz[], %b::int[],
                           %b::bigint[], %b::text[], %b::text[], %b::boolean[], %b::text[], %b::timestamptz[])
                   AS u(e, d, w, a, t, s, l, x, r, ok, types, n)""",
            ([o.delivery.endpoint_id for o in outcomes], [o.delivery.id for o in outcomes],
             [o.delivery.webhook_id for o in outcomes], [o.delivery.attempt for o in outcomes],
             [o.attempt_time for o in outcomes], [o.result.status_code for o in outcomes],
             [o.result.latency_ms for o in outcomes],
             [o.result.excerpt.decode("utf-8", "replace").replace("\x00", "") for o in outcomes],
             [o.result.error for o in outcomes], [o.result.success for o in outcomes],
             ["{" + ",".join(o.delivery.event_types) + "}" for o in outcomes], [o.next_time for o in outcomes]))
        await conn.execute(
            """UPDATE webhooks.deliveries d SET state = u.state,
                   next_attempt_time = coalesce(u.next, d.next_attempt_time),
                   finish_time = CASE WHEN u.state <> 'pending' THEN now() END
               FROM unnest(%b::bigint[], %b::text[], %b::timestamptz[]) AS u(id, state, next)
               WHERE d.id = u.id""",
            ([o.delivery.id for o in outcomes], [o.state for o in outcomes], [o.next_time for o in outcomes]))
        succeeded = sorted({o.delivery.endpoint_id for o in outcomes if o.result.success})
        if succeeded:
            # Once a second at most per endpoint: a busy endpoint's row is not rewritten per delivery.
            cur = await conn.execute(
                """WITH old AS (SELECT id, failing_since FROM webhooks.endpoints WHERE id = ANY(%b)
                                ORDER BY id FOR UPDATE)
                   UPDATE webhooks.endpoints e SET last_success_time = now(), failing_since = NULL FROM old
                   WHERE e.id = old.id AND (old.failing_since IS NOT NULL OR e.last_success_time IS NULL
                                            OR e.last_success_time < now() - interval '1 second')
                   RETURNING e.id, old.failing_since IS NOT NULL""", (succeeded,))
            recovered = [endpoint_id for endpoint_id, was_failing in await cur.fetchall() if was_failing]
            if recovered:
                # The breaker held their first tries back; the endpoint answers again: due now.
                await conn.execute(
                    """UPDATE webhooks.deliveries d SET next_attempt_time = now()
                       FROM (SELECT id FROM webhooks.deliveries WHERE endpoint_id = ANY(%b) AND state = 'pending'
                                 AND attempts = 0 AND next_attempt_time > now()
                             ORDER BY id FOR UPDATE SKIP LOCKED) AS held
                       WHERE d.id = held.id""", (recovered,))
        failed = [o for o in outcomes if not o.result.success]
        if not failed:
            return
        # The endpoint's breaker: its other deliveries wait until its failed one has been tried again (one probe
        # at a time: due rows the probe does not take would be scanned by every claim meanwhile).
        held: dict[str, datetime] = {}
        for o in failed:
            if o.tripped and o.next_time is not None and o.delivery.endpoint_id not in succeeded:
                until = o.next_time + self._probe_window
                held[o.delivery.endpoint_id] = max(until, held.get(o.delivery.endpoint_id, until))
        released = [(i, held.get(o.delivery.endpoint_id, o.attempt_time)) for o in failed for i in o.released]
        if released:
            await conn.execute(
                """UPDATE webhooks.deliveries d SET next_attempt_time = r.until, attempts = d.attempts - 1
                   FROM unnest(%b::bigint[], %b::timestamptz[]) AS r(id, until)
                   WHERE d.id = r.id AND d.state = 'pending'""",
                ([i for i, _ in released], [until for _, until in released]))
        if held:
            # Every pending delivery of the endpoint due before then (but the failed ones: they are the probes)
            # waits; rows a claim holds just now are skipped (they are being tried): no wait, no deadlock.
            await conn.execute(
                """UPDATE webhooks.deliveries d SET next_attempt_time = x.until
                   FROM (SELECT due.id, h.until FROM webhooks.deliveries due
                         JOIN unnest(%b::text[], %b::timestamptz[]) AS h(endpoint_id, until)
                           ON due.endpoint_id = h.endpoint_id
                         WHERE due.state = 'pending' AND due.next_attempt_time < h.until AND due.id <> ALL(%b)
                         ORDER BY due.id FOR UPDATE OF due SKIP LOCKED) AS x
                   WHERE d.id = x.id""",
                (list(held), list(held.values()), [o.delivery.id for o in failed]))
        cur = await conn.execute(
            """UPDATE webhooks.endpoints SET failing_since = coalesce(failing_since, now())
               WHERE id = ANY(%b) AND id <> ALL(%b) RETURNING id, failing_since, enabled""",
            (sorted({o.delivery.endpoint_id for o in failed}), succeeded))
        failing = {endpoint_id: since for endpoint_id, since, enabled in await cur.fetchall() if enabled}
        now = max(o.attempt_time for o in failed)
        for endpoint_id, since in failing.items():
            sample = next(o for o in failed if o.delivery.endpoint_id == endpoint_id)
            if any(o.gone for o in failed if o.delivery.endpoint_id == endpoint_id):
                await self._disable(conn, sample.delivery, "the endpoint answered 410 Gone")
            elif now - since >= self._disable_after:
                await self._disable(conn, sample.delivery, f"failing since {since.isoformat()} without a success")

    @staticmethod
    async def _disable(conn: psycopg.AsyncConnection, delivery: Claimed, reason: str) -> None:
        """Disable the endpoint and tell the tenant's other endpoints (in the caller's transaction)."""
        await conn.execute(
            """UPDATE webhooks.endpoints SET enabled = false, disabled_reason = %s, update_time = now()
               WHERE id = %s""", (reason, delivery.endpoint_id))
        log.warning("webhook endpoint disabled", extra={"endpoint": delivery.endpoint_id, "reason": reason})
        event = events_pb2.Event(name=f"events/endpoint-disabled-{uuid.uuid4().hex}", type=ENDPOINT_DISABLED,
                                 attributes={"webhook_endpoint": f"webhookEndpoints/{delivery.endpoint_id}",
                                             "url": delivery.url, "reason": reason})
        event.event_time.GetCurrentTime()
        routes = await routes_of(conn, [delivery.tenant_id])
        await queue_events(conn, routes, [(delivery.tenant_id, [event])])
