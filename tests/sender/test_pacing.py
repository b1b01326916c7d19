"""A bulk email a cheap provider refuses for its rate budget waits in the queue for it, rather than go on to a
provider several times dearer (``services.sender.outcomes.waits_for_cheaper``); other classes never wait."""

from __future__ import annotations

from esp.v1 import messages_pb2

from libs.common.message_classes import MessageClass
from libs.routing.catalog import ProviderSpec
from libs.routing.health import ProviderLimits
from tests.sender.conftest import World, send_task

DEFERRED = messages_pb2.MESSAGE_EVENT_TYPE_DEFERRED
RATIO = MessageClass.BULK.policy.routing.pace_cost_ratio


async def _cheap_provider_booked_ahead(world: World) -> ProviderSpec:
    """A cheap provider whose rate schedule other senders booked further ahead than bulk may wait."""
    spec = await world.add_provider("cheap", "postmark-1", price_per_email_micros=100, rate_limit_per_second=2)
    limits = ProviderLimits(spec.rate_limit_per_second, spec.daily_quota, spec.monthly_quota)
    for _ in range(8):  # four seconds of slots: beyond bulk's two-second wait
        await world.health.acquire(spec.id, limits, max_wait_s=10)
    return spec


async def test_a_bulk_email_waits_for_a_cheap_providers_rate_budget_rather_than_pay_a_dear_one(world: World):
    await _cheap_provider_booked_ahead(world)
    await world.add_provider("dear", "sendgrid-1", price_per_email_micros=int(100 * RATIO) + 100)
    task = send_task("bulk")

    [verdict] = await world.deliver(task)

    assert not verdict.ack and verdict.retry_in_s > 0
    assert await world.delivered_to("sendgrid-1", task) == 0
    [deferred] = [e.event for e in await world.events_of(task) if e.event.type == DEFERRED]
    assert deferred.event_id == f"{task.message_id}:paced"
    assert "waiting for cheap's rate budget" in deferred.reason


async def test_a_bulk_email_goes_on_to_a_provider_within_the_pacing_ratio(world: World):
    await _cheap_provider_booked_ahead(world)
    await world.add_provider("near", "sendgrid-1", price_per_email_micros=int(100 * RATIO) - 10)
    task = send_task("bulk")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert await world.delivered_to("sendgrid-1", task) == 1


async def test_a_transactional_email_never_waits_for_a_cheaper_provider(world: World):
    await _cheap_provider_booked_ahead(world)
    await world.add_provider("dear", "sendgrid-1", price_per_email_micros=5000)
    task = send_task("transactional")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert await world.delivered_to("sendgrid-1", task) == 1
