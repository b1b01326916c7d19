"""Group commit: concurrent calls coalesce into batches that one flush function handles in one round trip (one
transaction, one Redis pipeline, one batch RPC). Used by the ledger (reserves) and by ingest (accepts).

A hot tenant's balance row can take only a few thousand single-row transactions a second; handling a few hundred
reserves per transaction multiplies that. Batches form by themselves under load: while a worker is busy with one
batch, new calls queue up and it takes all of them next (up to ``max_batch_size``). An idle ledger therefore adds
no delay to a lone call unless ``max_delay_s`` asks a worker to linger.

Requests are spread over ``shards`` queues by a shard key (the ledger uses the tenant), so batches of different
shards touch disjoint rows and never queue behind each other's row locks. The workers are dealt to the queues
round-robin; with two or more per queue, the next batch of a shard is prepared while one is in the database.

Requests that must not wait (an OTP's, when the batcher is given an ``urgent`` test) have a lane of their own:
they never queue behind a campaign's thousands of emails, and ``urgent_workers`` workers that take nothing else
handle them, so they do not wait for a bulk batch in flight either. Urgent batches never linger.

A batch is flushed in the trace context of its first request (the OpenTelemetry context current when it was
submitted): the round trip it makes (ingest's reserve call to the ledger) joins that request's trace, rather than
none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from opentelemetry import context as otel_context
from prometheus_client import Histogram

__all__ = [
    "BATCH_SIZE",
    "BatcherClosed",
    "BatchingOptions",
    "FlushFunction",
    "GroupCommitter",
]

BATCH_SIZE = Histogram("esp_batch_size", "Requests handled together in one round trip", ["batcher"],
                       buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")

_Queued = tuple[RequestT, asyncio.Future[ResultT], otel_context.Context]
"""A submitted request, the future its caller awaits, and the trace context it was submitted in."""

FlushFunction = Callable[[Sequence[RequestT]], Awaitable[Sequence[ResultT | Exception]]]
"""Handles one batch; returns one result per request, in order: a value, or the exception for that request."""


@dataclass(frozen=True)
class BatchingOptions:
    """How calls are grouped."""

    max_batch_size: int = 1000
    """Most requests in one batch (one transaction)."""
    max_delay_s: float = 0.0
    """How long a worker that found fewer than ``max_batch_size`` requests waits for more; 0 never waits."""
    workers: int = 4
    """Batches in flight at once (each holds a database connection while it runs)."""
    shards: int = 2
    """Queues the workers are split over, round-robin (at most ``workers`` of them are used)."""
    min_interval_s: float = 0.0
    """A worker starts batches at most this often: under load (its last batch started less than this ago) it lets
    requests gather for the rest of the interval; an idle batcher still sends a lone request at once."""
    urgent_workers: int = 1
    """Workers of the urgent lane (used only when the batcher is given an ``urgent`` test)."""


class BatcherClosed(RuntimeError):
    """The batcher was closed; no more requests are taken."""


class GroupCommitter(Generic[RequestT, ResultT]):
    """Runs ``flush`` on batches of concurrently submitted requests and hands each caller its own result.

    ``shard_key`` picks a request's queue; requests with equal keys always share one (so a batch holds all the
    pending requests of its keys). Without it every request goes to the first queue that is idle or shortest.
    ``urgent`` picks the requests that go to the urgent lane instead.
    """

    def __init__(
        self,
        flush: FlushFunction[RequestT, ResultT],
        options: BatchingOptions,
        shard_key: Callable[[RequestT], Hashable] | None = None,
        *,
        urgent: Callable[[RequestT], bool] | None = None,
        name: str = "default",
    ) -> None:
        if (options.max_batch_size < 1 or options.shards < 1 or options.workers < 1 or options.max_delay_s < 0
                or options.min_interval_s < 0 or (urgent is not None and options.urgent_workers < 1)):
            raise ValueError(f"invalid batching options {options}")
        shards = min(options.shards, options.workers)
        self._flush = flush
        self._options = options
        self._shard_key = shard_key
        self._urgent = urgent
        self._queues: list[deque[_Queued[RequestT, ResultT]]] = [deque() for _ in range(shards)]
        self._wakeups = [asyncio.Event() for _ in range(shards)]
        self._urgent_queue: deque[_Queued[RequestT, ResultT]] = deque()
        self._urgent_wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._sizes = BATCH_SIZE.labels(name)

    async def submit(self, request: RequestT) -> ResultT:
        """Queue ``request`` and wait for its result (raises the request's own exception)."""
        future = self._enqueue(request)
        return await future

    async def submit_many(self, requests: Sequence[RequestT], *,
                          urgent: bool | None = None) -> list[ResultT | Exception]:
        """Queue every request at once; return each one's result or exception, in order. ``urgent`` puts them all
        in one lane (so they are handled in order, as one caller's batch expects) instead of asking each one."""
        futures = [self._enqueue(request, urgent) for request in requests]
        results: list[ResultT | Exception] = []
        for future in futures:
            try:
                results.append(await future)
            except Exception as exc:
                results.append(exc)
        return results

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the workers."""
        self._closing = True
        for wakeup in (*self._wakeups, self._urgent_wakeup):
            wakeup.set()
        if self._workers:
            await asyncio.gather(*self._workers)
            self._workers.clear()

    def _enqueue(self, request: RequestT, urgent: bool | None = None) -> asyncio.Future[ResultT]:
        if self._closing:
            raise BatcherClosed("the batcher is closed")
        if not self._workers:
            # Started lazily so the batcher can be built outside a running event loop.
            self._workers = [
                asyncio.create_task(self._work(self._queues[worker % len(self._queues)],
                                               self._wakeups[worker % len(self._queues)], patient=True))
                for worker in range(self._options.workers)
            ]
            if self._urgent is not None:
                self._workers += [asyncio.create_task(self._work(self._urgent_queue, self._urgent_wakeup,
                                                                 patient=False))
                                  for _ in range(self._options.urgent_workers)]
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        if self._urgent is not None and (self._urgent(request) if urgent is None else urgent):
            self._urgent_queue.append((request, future, otel_context.get_current()))
            self._urgent_wakeup.set()
            return future
        if len(self._queues) == 1:
            shard = 0
        elif self._shard_key is not None:
            shard = hash(self._shard_key(request)) % len(self._queues)
        else:
            shard = min(range(len(self._queues)), key=lambda i: len(self._queues[i]))
        self._queues[shard].append((request, future, otel_context.get_current()))
        self._wakeups[shard].set()
        return future

    async def _work(self, queue: deque[_Queued[RequestT, ResultT]], wakeup: asyncio.Event, *,
                    patient: bool) -> None:
        """Take batches from ``queue`` until closed; a ``patient`` worker lingers as the options ask."""
        max_size = self._options.max_batch_size
        loop = asyncio.get_running_loop()
        last_start = float("-inf")
        while True:
            while not queue:
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
            if patient and self._options.max_delay_s > 0 and len(queue) < max_size and not self._closing:
                await asyncio.sleep(self._options.max_delay_s)
            pause = last_start + self._options.min_interval_s - loop.time()
            if patient and pause > 0 and len(queue) < max_size and not self._closing:
                await asyncio.sleep(pause)
            last_start = loop.time()
            batch = [queue.popleft() for _ in range(min(max_size, len(queue)))]
            if not batch:
                continue  # a worker of the same queue took them while this one lingered
            if queue:
                wakeup.set()  # let an idle worker of this queue start on the rest now
            await self._run(batch)

    async def _run(self, batch: list[_Queued[RequestT, ResultT]]) -> None:
        self._sizes.observe(len(batch))
        token = otel_context.attach(batch[0][2])
        try:
            results = await self._flush([request for request, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:
            # The whole batch failed (database unreachable ...): every caller gets the error.
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            otel_context.detach(token)
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller gave up (cancelled); the result stays in the database
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
