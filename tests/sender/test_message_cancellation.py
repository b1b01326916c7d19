"""Messages cancelled after their SEND task was queued (CancelMessage): the sender drops them with a final CANCELLED
event and never calls a provider for them; every other email goes on. The cancellation lives in Redis for a bounded
time. Against real Redis and JetStream and the provider simulator."""

from __future__ import annotations

import asyncio
import time

import pytest
from esp.v1 import messages_pb2

from libs.common.campaign_halts import CANCELLED_MESSAGES_KEY, cancel_message, read_snapshot
from libs.routing.health import ProviderLimits
from services.sender.halts import CampaignHalts
from tests.sender.conftest import World, send_task

SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT
CANCELLED = messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED


@pytest.fixture
async def halts(world: World) -> CampaignHalts:
    """The world's deliverer honouring cancellations (refreshed by the tests, not in the background)."""
    board = CampaignHalts(world.states.redis, world.states.namespace)
    world.deliverer.halts = board
    return board


async def cancel(world: World, halts: CampaignHalts, message_id: str) -> None:
    """Cancel ``message_id`` as ingest's CancelMessage does once the message is queued, and refresh the snapshot."""
    await cancel_message(world.states.redis, message_id, lifetime_s=600, namespace=world.states.namespace)
    await halts.refresh()


async def test_a_cancelled_messages_queued_email_is_cancelled_and_never_reaches_a_provider(
        world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    task = send_task("transactional")
    await cancel(world, halts, task.message_id)

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.final and event.event.type == CANCELLED
    assert event.hold_id == task.message_id and event.event.reason == "message cancelled"
    assert event.event.event_id == f"{task.message_id}:cancelled"
    assert await world.sim.client.requests("postmark-1") == []


async def test_in_one_batch_call_only_the_cancelled_message_is_held_back(world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    dropped = send_task("bulk", to="dropped@example.org")
    going = [send_task("bulk", to=f"g{i}@example.org") for i in range(3)]
    await cancel(world, halts, dropped.message_id)

    verdicts = await world.deliver(dropped, *going)

    assert all(v.ack for v in verdicts)
    [request] = await world.sim.client.requests("postmark-1")
    assert sorted(m["esp_message_id"] for m in request["messages"]) == sorted(t.message_id for t in going)
    assert await world.event_types(dropped) == [CANCELLED]


async def test_a_message_cancelled_while_its_call_waits_for_a_rate_slot_never_reaches_the_provider(
        world: World, halts: CampaignHalts):
    spec = await world.add_provider("paced", "postmark-1", rate_limit_per_second=2)
    for _ in range(2):  # other senders booked the next second: the call waits for its slot
        await world.health.acquire(spec.id, ProviderLimits(spec.rate_limit_per_second, spec.daily_quota,
                                                           spec.monthly_quota), max_wait_s=10)
    task = send_task("bulk")  # bulk waits up to 2 s for a rate slot

    delivering = asyncio.create_task(world.deliver(task))
    await asyncio.sleep(0.3)  # placed, waiting for its rate slot
    await cancel(world, halts, task.message_id)
    [verdict] = await delivering

    assert verdict.ack
    assert await world.event_types(task) == [CANCELLED]
    assert await world.sim.client.requests("postmark-1") == []


async def test_a_sent_message_cancelled_afterwards_is_announced_sent_again_not_cancelled(
        world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    task = send_task("transactional")
    [first] = await world.deliver(task)
    await cancel(world, halts, task.message_id)

    [again] = await world.deliver(task, delivery=2)  # redelivered: its ack was lost

    assert first.ack and again.ack
    assert set(await world.event_types(task)) == {SENT}
    assert await world.delivered_to("postmark-1", task) == 1


async def test_a_cancellation_is_forgotten_after_its_lifetime_and_pruned_by_the_next_one(world: World):
    redis, namespace = world.states.redis, world.states.namespace
    now = time.time()
    await cancel_message(redis, "old", lifetime_s=60, namespace=namespace, now=now - 120)

    assert "old" not in (await read_snapshot(redis, namespace=namespace)).messages

    await cancel_message(redis, "new", lifetime_s=60, namespace=namespace, now=now)
    members = await redis.zrange(f"{namespace}:{CANCELLED_MESSAGES_KEY}", 0, -1)
    assert members == [b"new"]
    assert (await read_snapshot(redis, namespace=namespace)).messages == {"new"}


async def test_the_refresher_picks_up_a_cancelled_message_within_its_period(world: World):
    board = CampaignHalts(world.states.redis, world.states.namespace, refresh_s=0.05)
    stop = asyncio.Event()
    refresher = asyncio.create_task(board.run(stop))
    try:
        await cancel_message(world.states.redis, "m-1", lifetime_s=60, namespace=world.states.namespace)
        await asyncio.sleep(0.2)
        assert board.message_cancelled("m-1") and not board.message_cancelled("m-2")
    finally:
        stop.set()
        await refresher
