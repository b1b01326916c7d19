"""Micro-batching behind the API: concurrent calls queue up and each free worker handles everything queued so far
in one round trip (one Postgres transaction, one Redis pipeline, one ledger call).

Batches form by themselves under load and a lone call is never delayed: a worker that finds one request handles
it at once. That is what lets one ingest process accept far more emails a second than it could make round trips.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

BATCH_SIZE = Histogram("esp_ingest_batch_size", "Requests handled together in one round trip", ["batcher"],
                       buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")

FlushFunction = Callable[[Sequence[RequestT]], Awaitable[Sequence[ResultT | Exception]]]
"""Handles one batch; returns one result per request, in order: a value, or the exception for that request."""


class BatcherClosed(RuntimeError):
    """The batcher was closed; no more requests are taken."""


class MicroBatcher(Generic[RequestT, ResultT]):
    """Runs ``flush`` on batches of concurrently submitted requests and hands each caller its own result."""

    def __init__(self, flush: FlushFunction[RequestT, ResultT], *, name: str, max_batch_size: int = 500,
                 workers: int = 1, min_interval_s: float = 0.0) -> None:
        if max_batch_size < 1 or workers < 1:
            raise ValueError("max_batch_size and workers must be at least 1")
        self._flush = flush
        self._sizes = BATCH_SIZE.labels(name)
        self.max_batch_size = max_batch_size
        self.workers = workers
        self.min_interval_s = min_interval_s
        """A worker starts batches at most this often: under load (a batch started less than this ago) it lets
        requests gather for the rest of the interval; an idle batcher sends a lone request at once."""
        self._queue: deque[tuple[RequestT, asyncio.Future[ResultT]]] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def submit(self, request: RequestT) -> ResultT:
        """Queue ``request`` and wait for its result (raises the request's own exception)."""
        if self._closing:
            raise BatcherClosed("closed")
        if not self._tasks:  # started lazily, so the batcher can be built outside a running event loop
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, stop the workers."""
        self._closing = True
        self._wakeup.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks.clear()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        last_start = -self.min_interval_s
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            pause = last_start + self.min_interval_s - loop.time()
            if pause > 0 and len(self._queue) < self.max_batch_size and not self._closing:
                await asyncio.sleep(pause)
            last_start = loop.time()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            if self._queue:
                self._wakeup.set()  # more waiting: an idle worker starts on them now
            await self._run(batch)

    async def _run(self, batch: list[tuple[RequestT, asyncio.Future[ResultT]]]) -> None:
        self._sizes.observe(len(batch))
        try:
            results = await self._flush([request for request, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:
            for _, future in batch:  # the whole batch failed (server unreachable ...): every caller hears it
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller went away
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
