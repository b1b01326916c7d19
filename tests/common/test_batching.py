"""The group committer: concurrent submits coalesce into batches; each caller gets its own result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from itertools import chain

import pytest

from libs.common.batching import BatcherClosed, BatchingOptions, GroupCommitter


class RecordingFlush:
    """A flush that doubles numbers, refuses negative ones, and records the batches it saw."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    async def __call__(self, requests: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(requests))
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(f"negative {r}") if r < 0 else r * 2 for r in requests]


async def test_concurrent_submits_share_one_flush() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=1000, workers=1, shards=1))

    results = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
    await batcher.close()

    assert results == [i * 2 for i in range(100)]
    # The first submit starts a flush at once; everything queued meanwhile rides the next one.
    assert len(flush.batches) <= 2
    assert sorted(chain.from_iterable(flush.batches)) == list(range(100))


async def test_batches_never_exceed_the_maximum_size() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=7, workers=2, shards=2))

    await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    await batcher.close()

    assert max(len(batch) for batch in flush.batches) <= 7
    assert sorted(chain.from_iterable(flush.batches)) == list(range(50))


async def test_a_refused_request_fails_alone() -> None:
    batcher = GroupCommitter(RecordingFlush(), BatchingOptions())

    results = await batcher.submit_many([1, -1, 3])
    await batcher.close()

    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)


async def test_a_failing_flush_fails_every_request_of_its_batch() -> None:
    async def broken(requests: Sequence[int]) -> list[int | Exception]:
        raise ConnectionError("database gone")

    batcher = GroupCommitter(broken, BatchingOptions())

    with pytest.raises(ConnectionError):
        await batcher.submit(1)
    await batcher.close()


async def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    gate = asyncio.Event()
    batcher = GroupCommitter(RecordingFlush(gate), BatchingOptions(workers=1, shards=1))
    pending = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0)

    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    gate.set()
    await closing

    assert [await p for p in pending] == [0, 2, 4, 6, 8]
    with pytest.raises(BatcherClosed):
        await batcher.submit(1)


async def test_a_lingering_worker_collects_requests_that_arrive_during_the_delay() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_delay_s=0.5, workers=1, shards=1))

    async def late(i: int) -> int:
        await asyncio.sleep(0.001)
        return await batcher.submit(i)

    await asyncio.gather(batcher.submit(0), late(1), late(2))
    await batcher.close()

    assert flush.batches == [[0, 1, 2]]


async def test_batches_in_flight_at_once_never_share_a_shard_key() -> None:
    in_flight: set[int] = set()
    overlaps: list[set[int]] = []

    async def flush(requests: Sequence[tuple[int, int]]) -> list[int | Exception]:
        keys = {key for key, _ in requests}
        overlaps.append(keys & in_flight)
        in_flight.update(keys)
        await asyncio.sleep(0.001)  # stay in flight while other batches start
        in_flight.difference_update(keys)
        return [n for _, n in requests]

    batcher: GroupCommitter[tuple[int, int], int] = GroupCommitter(
        flush, BatchingOptions(max_batch_size=10, workers=4, shards=4), shard_key=lambda request: request[0]
    )
    results = await asyncio.gather(*(batcher.submit((n % 7, n)) for n in range(300)))
    await batcher.close()

    assert results == list(range(300))
    assert overlaps and not any(overlaps)


def test_invalid_batching_options_are_refused() -> None:
    for options in (BatchingOptions(max_batch_size=0), BatchingOptions(workers=0), BatchingOptions(shards=0)):
        with pytest.raises(ValueError):
            GroupCommitter(RecordingFlush(), options)


async def test_under_load_a_minimum_interval_gathers_more_requests_per_flush() -> None:
    batches: list[list[int]] = []

    async def flush(batch: Sequence[int]) -> list[int | Exception]:
        batches.append(list(batch))
        return [n * 2 for n in batch]

    batcher: GroupCommitter[int, int] = GroupCommitter(
        flush, BatchingOptions(workers=1, shards=1, min_interval_s=0.5), name="test")
    await batcher.submit(0)  # a flush just started: requests arriving now wait out the interval together

    async def later(n: int) -> int:
        for _ in range(n):  # arrive on different turns of the event loop
            await asyncio.sleep(0)
        return await batcher.submit(n)

    await asyncio.gather(*(later(n) for n in range(1, 6)))
    assert batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()
