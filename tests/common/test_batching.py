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


class GatedBulkFlush(RecordingFlush):
    """Batches of ordinary (positive) numbers wait for ``gate``; urgent ones (>= 1000) go through at once."""

    async def __call__(self, requests: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(requests))
        if any(r < 1000 for r in requests) and self.gate is not None:
            await self.gate.wait()
        return [r * 2 for r in requests]


def _urgent(request: int) -> bool:
    return request >= 1000


async def test_an_urgent_request_does_not_wait_for_a_queued_backlog_or_a_batch_in_flight() -> None:
    gate = asyncio.Event()
    flush = GatedBulkFlush(gate)
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=10, workers=1, shards=1), urgent=_urgent)

    campaign = [asyncio.ensure_future(batcher.submit(i)) for i in range(200)]  # one batch in flight, 190 queued
    await asyncio.sleep(0)
    assert await asyncio.wait_for(batcher.submit(1001), 1) == 2002
    assert not any(f.done() for f in campaign)

    gate.set()
    assert await asyncio.gather(*campaign) == [i * 2 for i in range(200)]
    await batcher.close()


async def test_urgent_batches_carry_only_urgent_requests() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=50, workers=1, shards=1), urgent=_urgent)

    await asyncio.gather(*(batcher.submit(i) for i in range(100)), *(batcher.submit(1000 + i) for i in range(20)))
    await batcher.close()

    for batch in flush.batches:
        assert all(r >= 1000 for r in batch) or all(r < 1000 for r in batch)
    assert sorted(chain.from_iterable(flush.batches)) == [*range(100), *range(1000, 1020)]


async def test_an_urgent_batch_never_lingers() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=50, workers=1, shards=1, max_delay_s=5,
                                                    min_interval_s=5), urgent=_urgent)

    assert await asyncio.wait_for(batcher.submit(1001), 1) == 2002
    await batcher.close()


async def test_close_finishes_the_urgent_lane_too() -> None:
    gate = asyncio.Event()
    flush = RecordingFlush(gate)
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=5, workers=1, shards=1), urgent=_urgent)

    pending = [asyncio.ensure_future(batcher.submit(1000 + i)) for i in range(12)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.close())
    gate.set()
    await closing
    assert [f.result() for f in pending] == [(1000 + i) * 2 for i in range(12)]


async def test_submit_many_can_put_a_whole_call_in_one_lane() -> None:
    flush = RecordingFlush()
    batcher = GroupCommitter(flush, BatchingOptions(max_batch_size=50, workers=1, shards=1), urgent=_urgent)

    assert await batcher.submit_many([1, 1001, 2], urgent=False) == [2, 2002, 4]
    assert await batcher.submit_many([3, 1003], urgent=True) == [6, 2006]
    await batcher.close()

    assert flush.batches == [[1, 1001, 2], [3, 1003]]  # each call in one batch, in its order
