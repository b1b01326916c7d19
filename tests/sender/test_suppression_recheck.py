"""The suppression list looked at again just before the provider call: an address suppressed while its email was
queued (a bounce, complaint or unsubscribe during a campaign's drain) gets no more email, in one Redis round trip
for the whole delivery. Against real Redis and JetStream and the provider simulator."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from libs.common.message_classes import MessageClass
from libs.common.suppressions import suppression_key, suppression_key_for_every_class, suppression_key_for_topic
from services.sender.suppressions import Recipients, SuppressionCheck
from tests.sender.conftest import World, send_task

SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT
FAILED = messages_pb2.MESSAGE_EVENT_TYPE_FAILED


@pytest.fixture
async def check(world: World) -> SuppressionCheck:
    """The world's deliverer re-checking suppressions before its calls."""
    recheck = SuppressionCheck(world.states.redis, world.states.namespace)
    world.deliverer.suppressions = recheck
    return recheck


async def suppress(world: World, address: str, *, unsubscribed: bool = False) -> None:
    """Suppress ``address`` for tenant acme as reports would: an unsubscribe stops bulk mail only."""
    await world.states.redis.sadd(suppression_key(world.states.namespace, "acme"), address)
    if not unsubscribed:
        await world.states.redis.sadd(suppression_key_for_every_class(world.states.namespace, "acme"), address)


async def test_an_email_to_an_address_suppressed_after_it_was_queued_fails_and_the_rest_of_the_batch_is_sent(
        world: World, check: SuppressionCheck):
    await world.add_provider("pm", "postmark-1")
    tasks = [send_task("bulk", to=f"r{i}@example.org") for i in range(3)]
    await suppress(world, "r1@example.org")  # a hard bounce while the campaign drained

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    [request] = await world.sim.client.requests("postmark-1")
    assert sorted(m["esp_message_id"] for m in request["messages"]) == sorted(
        t.message_id for t in (tasks[0], tasks[2]))
    [event] = await world.events_of(tasks[1])
    assert event.final and event.event.type == FAILED and event.hold_id == tasks[1].message_id
    assert "suppressed" in event.event.reason and "r1@example.org" in event.event.reason
    assert event.event.attributes["reason_code"] == "SUPPRESSED"
    assert [await world.event_types(t) for t in (tasks[0], tasks[2])] == [[SENT], [SENT]]


async def test_an_unsubscribe_stops_bulk_mail_but_not_a_transactional_email(world: World, check: SuppressionCheck):
    await world.add_provider("pm", "postmark-1")
    newsletter = send_task("bulk", to="reader@example.org")
    receipt = send_task("transactional", to="reader@example.org")
    await suppress(world, "reader@example.org", unsubscribed=True)

    await world.deliver(newsletter)
    await world.deliver(receipt)

    assert await world.event_types(newsletter) == [FAILED]
    assert await world.event_types(receipt) == [SENT]


async def suppress_for_topic(world: World, address: str, topic: str) -> None:
    """Suppress ``address`` for tenant acme's ``topic`` only, as reports does for a topic's one-click unsubscribe."""
    await world.states.redis.sadd(suppression_key_for_topic(world.states.namespace, "acme", topic), address)


def of_topic(task: queue_pb2.SendTask, topic: str) -> queue_pb2.SendTask:
    """``task`` as a campaign with an unsubscribe topic queues it."""
    task.topic = topic
    return task


async def test_a_topic_suppression_stops_bulk_mail_of_that_topic_and_sends_bulk_mail_of_another(
        world: World, check: SuppressionCheck):
    await world.add_provider("pm", "postmark-1")
    deals = of_topic(send_task("bulk", to="reader@example.org"), "weekly-deals")
    updates = of_topic(send_task("bulk", to="reader@example.org"), "product-updates")
    await suppress_for_topic(world, "reader@example.org", "weekly-deals")

    await world.deliver(deals)
    await world.deliver(updates)

    assert await world.event_types(deals) == [FAILED]
    assert await world.event_types(updates) == [SENT]


async def test_a_topic_suppression_does_not_stop_bulk_mail_of_no_topic(world: World, check: SuppressionCheck):
    await world.add_provider("pm", "postmark-1")
    newsletter = send_task("bulk", to="reader@example.org")
    await suppress_for_topic(world, "reader@example.org", "weekly-deals")

    await world.deliver(newsletter)

    assert await world.event_types(newsletter) == [SENT]


@pytest.mark.parametrize("message_class", ["otp", "transactional"])
async def test_a_topic_suppression_never_stops_otp_or_transactional_mail(world: World, check: SuppressionCheck,
                                                                         message_class: str):
    await world.add_provider("pm", "postmark-1")
    email = of_topic(send_task(message_class, to="reader@example.org"), "weekly-deals")
    await suppress_for_topic(world, "reader@example.org", "weekly-deals")

    await world.deliver(email)

    assert await world.event_types(email) == [SENT]


async def test_an_unsubscribe_from_every_topic_stops_bulk_mail_of_a_topic(world: World, check: SuppressionCheck):
    await world.add_provider("pm", "postmark-1")
    deals = of_topic(send_task("bulk", to="reader@example.org"), "weekly-deals")
    await suppress(world, "reader@example.org", unsubscribed=True)

    await world.deliver(deals)

    assert await world.event_types(deals) == [FAILED]


class RoundTrips:
    """A Redis client that only pipelines, counting the pipelines sent and the commands in them."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.sent: list[list[str]] = []

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent.append([str(command[0][0]) for command in pipe.command_stack])
            return await execute(*args, **kwargs)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


async def test_every_email_of_a_delivery_is_checked_in_one_round_trip(world: World):
    redis = RoundTrips(world.states.redis)
    await suppress(world, "b@example.org")
    check = SuppressionCheck(cast(aioredis.Redis, redis), world.states.namespace)
    emails = [Recipients("acme", MessageClass.BULK, [f"{name}@example.org"]) for name in ("a", "b", "c")]
    emails.append(Recipients("acme", MessageClass.OTP, ["B@example.org", "d@example.org"]))

    found = await check.suppressed(emails)

    assert found == [[], ["b@example.org"], [], ["B@example.org"]]
    assert redis.sent == [["SMISMEMBER", "SMISMEMBER"]]  # one round trip: a command per set, not per email


async def test_a_delivery_with_a_topic_is_checked_against_the_topic_in_the_same_round_trip(world: World):
    redis = RoundTrips(world.states.redis)
    await suppress_for_topic(world, "b@example.org", "weekly-deals")
    check = SuppressionCheck(cast(aioredis.Redis, redis), world.states.namespace)
    emails = [Recipients("acme", MessageClass.BULK, [f"{name}@example.org"], "weekly-deals") for name in "abc"]
    emails.append(Recipients("acme", MessageClass.BULK, ["b@example.org"], "product-updates"))

    found = await check.suppressed(emails)

    assert found == [[], ["b@example.org"], [], []]
    assert redis.sent == [["SMISMEMBER", "SMISMEMBER", "SMISMEMBER"]]  # every topic's set, each topic's: one trip


async def test_when_redis_cannot_answer_the_email_is_sent_anyway(world: World):
    await world.add_provider("pm", "postmark-1")
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    world.deliverer.suppressions = SuppressionCheck(unreachable, world.states.namespace)
    task = send_task("bulk", to="r@example.org")
    await suppress(world, "r@example.org")

    [verdict] = await world.deliver(task)
    await unreachable.aclose()

    assert verdict.ack
    assert await world.event_types(task) == [SENT]  # accept checked it; a Redis blip does not hold mail back
