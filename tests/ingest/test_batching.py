"""Micro-batching: concurrent requests share one round trip; each caller gets its own result or error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.ingest.batching import BatcherClosed, MicroBatcher


class Recorder:
    """A flush function that records its batches and doubles numbers (refusing negative ones)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def __call__(self, batch: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(batch))
        await asyncio.sleep(0)
        return [ValueError(f"{n} is negative") if n < 0 else n * 2 for n in batch]


async def test_concurrent_requests_share_one_flush():
    flush = Recorder()
    batcher = MicroBatcher(flush, name="test", max_batch_size=100)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(10)))
    assert results == [n * 2 for n in range(10)]
    assert len(flush.batches) < 10 and sorted(n for batch in flush.batches for n in batch) == list(range(10))
    await batcher.close()


async def test_a_batch_never_exceeds_its_maximum_size():
    flush = Recorder()
    batcher = MicroBatcher(flush, name="test", max_batch_size=3)
    await asyncio.gather(*(batcher.submit(n) for n in range(10)))
    assert max(len(b) for b in flush.batches) <= 3
    await batcher.close()


async def test_a_refused_request_fails_only_its_own_caller():
    batcher = MicroBatcher(Recorder(), name="test")
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(-1), batcher.submit(2),
                                    return_exceptions=True)
    assert outcomes[0] == 2 and outcomes[2] == 4
    assert isinstance(outcomes[1], ValueError)
    await batcher.close()


async def test_a_failed_flush_fails_every_caller_of_its_batch():
    async def broken(batch: Sequence[int]) -> list[int | Exception]:
        raise ConnectionError("server gone")

    batcher = MicroBatcher(broken, name="test")
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    await batcher.close()


async def test_under_load_a_minimum_interval_gathers_more_requests_per_flush():
    flush = Recorder()
    batcher = MicroBatcher(flush, name="test", min_interval_s=0.5)
    await batcher.submit(0)  # a flush just started: requests arriving now wait out the interval together

    async def later(n: int) -> int:
        for _ in range(n):  # arrive on different turns of the event loop
            await asyncio.sleep(0)
        return await batcher.submit(n)

    await asyncio.gather(*(later(n) for n in range(1, 6)))
    assert flush.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_a_closed_batcher_takes_no_more_requests():
    batcher = MicroBatcher(Recorder(), name="test")
    await batcher.close()
    with pytest.raises(BatcherClosed):
        await batcher.submit(1)
