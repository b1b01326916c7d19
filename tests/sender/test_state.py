"""The sender's per-email memory in Redis: leases, sent markers and retry state, for batches of any size."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis

from services.sender.state import SCRIPT_CHUNK, MessageStateStore, SentMarker, StateChange

BATCH = 2 * SCRIPT_CHUNK + 6  # two full script calls and a part


def ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


async def script_calls(redis_client: aioredis.Redis, run_id: str, work: Any) -> list[list[str]]:
    """Run ``work`` while Redis's MONITOR watches; the keys of each script call that touched ``run_id``'s keys."""
    calls: list[list[str]] = []
    async with redis_client.monitor() as monitor:
        watching = asyncio.Event()

        async def watch() -> None:
            watching.set()
            async for command in monitor.listen():
                words = command["command"].split(" ")
                if words[0].upper() in ("EVALSHA", "EVAL") and run_id in command["command"]:
                    keys = int(words[2])
                    calls.append(words[3:3 + keys])

        watcher = asyncio.create_task(watch())
        await watching.wait()
        await asyncio.sleep(0.1)  # MONITOR is on before the work starts
        await work()
        await asyncio.sleep(0.2)  # and sees its last command
        watcher.cancel()
    return calls


async def test_a_large_batch_is_claimed_and_committed_whole(redis_client: aioredis.Redis, run_id: str) -> None:
    store = MessageStateStore(redis_client, run_id)
    batch = ids(BATCH)
    states = await store.claim(batch, "sender-a")
    assert [s.message_id for s in states] == batch
    assert all(s.leased and s.sent is None for s in states)
    await store.commit([StateChange(mid, sent=SentMarker("mailgun", f"pm-{mid}"), attempts=1) for mid in batch],
                       batch, "sender-a")

    again = await store.claim(batch, "sender-b")
    assert all(s.leased for s in again)  # every lease was given back
    assert [s.sent for s in again] == [SentMarker("mailgun", f"pm-{mid}") for mid in batch]
    assert all(s.attempts == 1 for s in again)


async def test_only_the_email_leased_elsewhere_in_a_large_batch_is_refused(redis_client: aioredis.Redis,
                                                                           run_id: str) -> None:
    store = MessageStateStore(redis_client, run_id)
    batch = ids(BATCH)
    held = batch[SCRIPT_CHUNK + 3]  # in the second script call
    await store.claim([held], "sender-a")
    states = await store.claim(batch, "sender-b")
    assert [s.message_id for s in states if not s.leased] == [held]


async def test_a_commit_gives_back_only_the_leases_it_was_asked_to(redis_client: aioredis.Redis,
                                                                    run_id: str) -> None:
    store = MessageStateStore(redis_client, run_id)
    batch = ids(BATCH)
    await store.claim(batch, "sender-a")
    kept = batch[-1]
    await store.commit([], batch[:-1], "sender-a")
    states = await store.claim(batch, "sender-b")
    assert [s.message_id for s in states if not s.leased] == [kept]


async def test_no_script_call_carries_more_than_a_chunk_of_emails(redis_client: aioredis.Redis,
                                                                  run_id: str) -> None:
    # Redis runs nothing else while a script runs: an OTP's admission must not wait for a whole bulk batch.
    store = MessageStateStore(redis_client, run_id)
    batch = ids(BATCH)

    async def claim_and_commit() -> None:
        await store.claim(batch, "sender-a")
        await store.commit([StateChange(mid, failures=1) for mid in batch], batch, "sender-a")

    calls = await script_calls(redis_client, run_id, claim_and_commit)
    assert len(calls) == 6  # three claims, three commits
    assert max(len(keys) for keys in calls) == 2 * SCRIPT_CHUNK  # a lease and a state key per email
    claimed = [key for keys in calls[:3] for key in keys]
    assert claimed == [key for mid in batch for key in (store.lease_key(mid), store.key(mid))]


async def test_a_single_email_takes_one_script_call_each_way(redis_client: aioredis.Redis, run_id: str) -> None:
    store = MessageStateStore(redis_client, run_id)
    [mid] = ids(1)

    async def claim_and_commit() -> None:
        await store.claim([mid], "sender-a")
        await store.commit([StateChange(mid, attempts=1)], [mid], "sender-a")

    calls = await script_calls(redis_client, run_id, claim_and_commit)
    assert calls == [[store.lease_key(mid), store.key(mid)]] * 2


def test_a_sent_marker_keeps_the_recipients_the_provider_refused() -> None:
    marker = SentMarker("relay", "<id|with|bars@relay>", refused={"nobody@no-dot": "553 5.1.3 not valid"})

    again = SentMarker.decode(marker.encode())

    # A delivery that died after recording the marker announces these REJECTED events again, as it does SENT.
    assert again == marker


def test_a_sent_marker_written_before_refusals_were_kept_still_reads() -> None:
    assert SentMarker.decode("relay|<id@relay>|0") == SentMarker("relay", "<id@relay>")
