"""Halted campaigns, just before the provider call: a cancelled campaign's email is dropped with a final CANCELLED
event, a paused one's is parked on the campaign's held subject, and neither reaches a provider; every other email
goes on as before. Against real Redis and JetStream and the provider simulator."""

from __future__ import annotations

import asyncio

import nats
import pytest
import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from libs.common.campaign_halts import Halt, clear_halt, set_halt
from libs.common.jetstream import ensure_streams, publish
from libs.routing.catalog import ProviderSpec
from libs.routing.health import ProviderLimits
from services.sender.halts import CampaignHalts
from services.sender.pool import ClassPool
from tests.sender.conftest import World, send_task

SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT
CANCELLED = messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED


@pytest.fixture
async def halts(world: World) -> CampaignHalts:
    """The world's deliverer honouring halted campaigns (refreshed by the tests, not in the background)."""
    board = CampaignHalts(world.states.redis, world.states.namespace)
    world.deliverer.halts = board
    return board


async def halt(world: World, halts: CampaignHalts, campaign_id: str, how: Halt | None) -> None:
    """Halt ``campaign_id`` (None: resume it) as the campaigns service would, and refresh the snapshot."""
    if how is None:
        await clear_halt(world.states.redis, campaign_id, namespace=world.states.namespace)
    else:
        await set_halt(world.states.redis, campaign_id, how, namespace=world.states.namespace)
    await halts.refresh()


def campaign_task(campaign_id: str, message_class: str = "bulk", *, to: str = "alice@example.org",
                  accepted_s_ago: float = 0.0) -> queue_pb2.SendTask:
    """An email of campaign ``campaign_id`` as ingest would queue it."""
    task = send_task(message_class, to=to, accepted_s_ago=accepted_s_ago)
    task.campaign_id = campaign_id
    return task


async def test_a_cancelled_campaigns_queued_email_is_cancelled_and_never_reaches_a_provider(
        world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "spring-sale", Halt.CANCELLED)
    task = campaign_task("spring-sale")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.final and event.event.type == CANCELLED
    assert event.hold_id == task.message_id and event.event.reason == "campaign cancelled"
    assert await world.sim.client.requests("postmark-1") == []


async def test_a_cancelled_campaigns_email_past_its_useful_life_is_cancelled_not_dead_lettered(
        world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "old-news", Halt.CANCELLED)
    task = campaign_task("old-news", accepted_s_ago=4 * 86400)

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert await world.event_types(task) == [CANCELLED]


async def test_a_paused_campaigns_email_is_parked_on_its_held_subject_and_acked_without_a_provider_call(
        world: World, halts: CampaignHalts, nats_url: str):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "newsletter", Halt.PAUSED)
    task = campaign_task("newsletter")
    payload = task.SerializeToString()
    nc = await nats.connect(nats_url)
    pool = ClassPool(nc, world.topology, "bulk", world.deliverer, concurrency=8, ack_wait_s=30, batch_max=50)
    await pool.setup()
    stop = asyncio.Event()
    running = asyncio.create_task(pool.run(stop))
    try:
        await publish(world.js, world.topology.send_subject("bulk"), payload, msg_id=task.message_id)

        held = world.topology.held_stream
        for _ in range(200):
            if (await world.js.stream_info(held)).state.messages == 1:
                break
            await asyncio.sleep(0.02)
        parked = await world.js.get_last_msg(held, world.topology.held_subject("newsletter"))
        for _ in range(200):  # the original is acked once the park is durable: the work queue lets it go
            if (await world.js.stream_info(world.topology.send_stream("bulk"))).state.messages == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await running
        await nc.close()

    assert parked.data == payload
    assert parked.headers is not None and parked.headers["Nats-Msg-Id"] == f"{task.message_id}.held.1"
    assert (await world.js.stream_info(world.topology.send_stream("bulk"))).state.messages == 0
    assert await world.sim.client.requests("postmark-1") == []
    assert await world.events_of(task) == []  # parked is not an outcome: the message simply stays queued


async def test_a_parked_email_is_not_acked_when_the_held_stream_cannot_store_it(world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "newsletter", Halt.PAUSED)
    await world.js.delete_stream(world.topology.held_stream)  # nothing stores the park
    task = campaign_task("newsletter")

    [verdict] = await world.deliver(task)
    await ensure_streams(world.js, world.topology)

    assert not verdict.ack and verdict.retry_in_s > 0
    assert await world.sim.client.requests("postmark-1") == []


async def test_after_the_halt_is_cleared_the_campaigns_emails_are_sent_normally(world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "newsletter", Halt.PAUSED)
    task = campaign_task("newsletter")
    [parked] = await world.deliver(task)

    await halt(world, halts, "newsletter", None)
    [verdict] = await world.deliver(task, delivery=2)  # put back in its SEND stream on resume

    assert parked.ack and verdict.ack
    assert [e.event.type for e in await world.events_of(task)] == [SENT]
    assert await world.delivered_to("postmark-1", task) == 1


async def test_emails_without_a_campaign_or_of_running_campaigns_are_unaffected(world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "other", Halt.CANCELLED)
    plain, running = send_task("transactional"), campaign_task("still-running", "transactional")

    verdicts = [*await world.deliver(plain), *await world.deliver(running)]

    assert all(v.ack for v in verdicts)
    for task in (plain, running):
        assert await world.event_types(task) == [SENT]
        assert await world.delivered_to("postmark-1", task) == 1


async def test_in_one_batch_call_only_the_halted_campaigns_emails_are_held_back(world: World, halts: CampaignHalts):
    await world.add_provider("pm", "postmark-1")
    await halt(world, halts, "cancelled", Halt.CANCELLED)
    await halt(world, halts, "paused", Halt.PAUSED)
    dropped = [campaign_task("cancelled", to=f"c{i}@example.org") for i in range(3)]
    parked = [campaign_task("paused", to=f"p{i}@example.org") for i in range(3)]
    going = [send_task("bulk", to=f"g{i}@example.org") for i in range(3)]

    verdicts = await world.deliver(*dropped, *parked, *going)

    assert all(v.ack for v in verdicts)
    [request] = await world.sim.client.requests("postmark-1")
    assert sorted(m["esp_message_id"] for m in request["messages"]) == sorted(t.message_id for t in going)
    assert [await world.event_types(t) for t in dropped] == [[CANCELLED]] * 3
    assert (await world.js.stream_info(world.topology.held_stream)).state.messages == 3


async def test_a_campaign_halted_while_its_batch_waits_for_a_rate_slot_never_reaches_the_provider(
        world: World, halts: CampaignHalts):
    spec = await world.add_provider("paced", "postmark-1", rate_limit_per_second=2)
    for _ in range(2):  # other senders booked the next second: the batch call waits for its slot
        await world.health.acquire(spec.id, _limits(spec), max_wait_s=10)
    halted = [campaign_task("flash-sale", to=f"h{i}@example.org") for i in range(2)]
    going = [send_task("bulk", to=f"g{i}@example.org") for i in range(2)]

    delivering = asyncio.create_task(world.deliver(*halted, *going))
    await asyncio.sleep(0.3)  # placed in one batch call, waiting for its rate slot
    await halt(world, halts, "flash-sale", Halt.CANCELLED)
    verdicts = await delivering

    assert all(v.ack for v in verdicts)
    assert [await world.event_types(t) for t in halted] == [[CANCELLED]] * 2
    [request] = await world.sim.client.requests("postmark-1")
    assert sorted(m["esp_message_id"] for m in request["messages"]) == sorted(t.message_id for t in going)
    daily, _monthly = world.health.quota_keys(spec.id)
    assert int(await world.states.redis.get(daily)) == 2 + 2  # the withheld emails' quota was given back


async def test_the_snapshot_survives_a_redis_error_and_the_refresher_keeps_going(world: World):
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    board = CampaignHalts(unreachable, world.states.namespace, refresh_s=0.05)
    board.snapshot = {"newsletter": Halt.PAUSED}
    stop = asyncio.Event()

    refresher = asyncio.create_task(board.run(stop))
    await asyncio.sleep(0.3)
    alive = not refresher.done()
    stop.set()
    await refresher
    await unreachable.aclose()

    assert alive and board.of("newsletter") is Halt.PAUSED


async def test_the_refresher_picks_up_a_halt_within_its_period(world: World):
    board = CampaignHalts(world.states.redis, world.states.namespace, refresh_s=0.05)
    stop = asyncio.Event()
    refresher = asyncio.create_task(board.run(stop))
    try:
        await set_halt(world.states.redis, "newsletter", Halt.PAUSED, namespace=world.states.namespace)
        await asyncio.sleep(0.2)
        assert board.of("newsletter") is Halt.PAUSED
        await clear_halt(world.states.redis, "newsletter", namespace=world.states.namespace)
        await asyncio.sleep(0.2)
        assert board.of("newsletter") is None
    finally:
        stop.set()
        await refresher


def _limits(spec: ProviderSpec) -> ProviderLimits:
    return ProviderLimits(spec.rate_limit_per_second, spec.daily_quota, spec.monthly_quota)
