"""One delivery, step by step, against real Redis and JetStream and the provider simulator: what gets sent
where, which events say so, and whether the queued email is acked or comes back later."""

from __future__ import annotations

import pytest
from esp.v1 import messages_pb2

from libs.common.jetstream import ensure_streams
from libs.common.message_classes import MessageClass
from libs.providers.model import ProviderConfig
from libs.routing.catalog import ProviderSpec
from libs.routing.health import ProviderLimits
from services.sender.retries import backoff_s
from tests.sender.conftest import World, send_task

SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT
FAILED = messages_pb2.MESSAGE_EVENT_TYPE_FAILED
ATTEMPTED = messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED
DEFERRED = messages_pb2.MESSAGE_EVENT_TYPE_DEFERRED
DEAD = messages_pb2.MESSAGE_EVENT_TYPE_DEAD_LETTERED
PROVIDER_DELAY_MS = 250
"""How long the simulated provider takes to answer where a test measures a call."""
LONGEST_CALL_MS = (ProviderConfig.timeout_s + ProviderConfig.connect_timeout_s) * 1000


async def test_an_accepted_email_is_announced_sent_with_its_attempt_and_acked(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task()

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.final and event.event.type == SENT
    assert event.event.provider == "pm" and event.event.provider_message_id
    assert event.event.outcome == messages_pb2.ATTEMPT_OUTCOME_ACCEPTED and event.event.attempt == 1
    assert await world.delivered_to("postmark-1", task) == 1


async def test_a_redelivered_email_already_sent_is_announced_again_but_never_sent_again(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task()
    await world.deliver(task)

    [verdict] = await world.deliver(task, delivery=2)

    assert verdict.ack
    assert await world.delivered_to("postmark-1", task) == 1
    assert await world.event_types(task) == [SENT]  # the repeat carries the same event id: the stream drops it


async def test_an_email_another_sender_is_working_on_is_left_alone(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task()
    await world.states.redis.set(world.states.lease_key(task.message_id), "someone-else", px=30_000)

    [verdict] = await world.deliver(task)

    assert not verdict.ack and verdict.retry_in_s > 0
    assert await world.delivered_to("postmark-1", task) == 0


async def test_a_retryable_failure_excludes_the_provider_and_backs_off(world: World):
    await world.add_provider("broken", "postmark-1", price_per_email_micros=10)
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=90)
    await world.sim.client.set_knobs("postmark-1", error_rate=1.0, latency_ms=PROVIDER_DELAY_MS, jitter_ms=0)
    task = send_task("transactional")

    [first] = await world.deliver(task)
    [second] = await world.deliver(task, delivery=2)

    assert not first.ack and 0 < first.retry_in_s <= MessageClass.TRANSACTIONAL.policy.retry.base_delay_s
    assert second.ack
    events = await world.events_of(task)
    assert [e.event.type for e in events] == [ATTEMPTED, DEFERRED, SENT]
    attempted = events[0].event
    assert attempted.provider == "broken" and attempted.outcome == messages_pb2.ATTEMPT_OUTCOME_RETRYABLE
    assert attempted.reason
    # The failed call's own duration in milliseconds: at least the delay the provider took to answer, and less than
    # the longest a call may last (a figure in seconds or microseconds would fall outside).
    assert PROVIDER_DELAY_MS <= attempted.latency_ms < LONGEST_CALL_MS
    assert events[2].event.provider == "spare" and events[2].event.attempt == 2


async def test_backoff_ceilings_double_with_each_failure_up_to_the_class_cap():
    policy = MessageClass.TRANSACTIONAL.policy.retry

    ceilings = [max(backoff_s(policy, n) for _ in range(300)) for n in (1, 2, 3, 4, 10)]

    assert [round(c) for c in ceilings[:4]] == [1, 2, 4, 8]
    assert policy.max_delay_s / 2 < ceilings[4] <= policy.max_delay_s


async def test_otp_falls_over_to_the_next_provider_in_the_same_delivery(world: World):
    await world.add_provider("down", "postmark-1")
    await world.add_provider("up", "sendgrid-1", price_per_email_micros=500)
    await world.sim.client.set_knobs("postmark-1", outage=True)
    task = send_task("otp")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert await world.event_types(task) == [ATTEMPTED, SENT]
    assert await world.delivered_to("sendgrid-1", task) == 1


async def test_a_throttled_email_tries_the_next_provider_at_once_and_counts_no_failure(world: World):
    await world.add_provider("busy", "postmark-1", price_per_email_micros=10)
    await world.add_provider("free", "sendgrid-1", price_per_email_micros=90)
    await world.sim.client.set_knobs("postmark-1", throttle_rps=0, retry_after_s=5)
    task = send_task("bulk")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    events = await world.events_of(task)
    assert [e.event.type for e in events] == [ATTEMPTED, SENT]
    assert events[0].event.outcome == messages_pb2.ATTEMPT_OUTCOME_THROTTLED
    state = (await world.states.claim([task.message_id], "test"))[0]
    assert state.failures == 0 and state.excluded == set()


async def test_a_throttled_provider_is_paused_for_every_email_until_retry_after(world: World):
    await world.add_provider("busy", "postmark-1")
    await world.sim.client.set_knobs("postmark-1", throttle_rps=0, retry_after_s=3)
    first, second = send_task("transactional"), send_task("transactional")

    [first_verdict] = await world.deliver(first)
    [second_verdict] = await world.deliver(second)

    assert first_verdict.retry_in_s >= 3 and second_verdict.retry_in_s >= 2.5
    assert len(await world.sim.client.requests("postmark-1")) == 1  # the second never asked the provider


async def test_a_permanent_rejection_fails_the_email_without_retry(world: World):
    await world.add_provider("pm", "postmark-1")
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=900)
    task = send_task("transactional", to="inactive-someone@example.org")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.final and event.event.type == FAILED
    assert event.event.provider == "pm" and event.event.outcome == messages_pb2.ATTEMPT_OUTCOME_PERMANENT
    assert await world.delivered_to("sendgrid-1", task) == 0


async def test_an_email_from_an_identity_ses_has_not_verified_goes_elsewhere_and_counts_against_ses(world: World):
    await world.add_provider("ses", "ses-1", price_per_email_micros=10)
    await world.add_provider("spare", "postmark-1", price_per_email_micros=500)
    task = send_task("otp")
    getattr(task, "from").email = "unverified-shop@example.com"

    [verdict] = await world.deliver(task)

    assert verdict.ack
    attempted, sent = await world.events_of(task)
    assert (attempted.event.type, attempted.event.provider) == (ATTEMPTED, "ses")
    assert attempted.event.outcome == messages_pb2.ATTEMPT_OUTCOME_PERMANENT
    assert "not verified" in attempted.event.reason
    assert (sent.event.type, sent.event.provider) == (SENT, "spare")
    await world.health.refresh(world.catalog.providers)
    assert world.health.snapshot("ses").error_rate == 1.0


async def test_an_ambiguous_otp_is_sent_again_elsewhere_at_once(world: World):
    await world.add_provider("hangs", "postmark-1", options={"timeout_s": "0.3"})
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=500)
    await world.sim.client.set_knobs("postmark-1", hang_rate=1.0, hang_s=2)
    task = send_task("otp")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    events = await world.events_of(task)
    assert [e.event.type for e in events] == [ATTEMPTED, SENT]
    assert events[0].event.outcome == messages_pb2.ATTEMPT_OUTCOME_AMBIGUOUS
    # The rare duplicate otp accepts rather than a late code: both providers took it.
    assert await world.delivered_to("postmark-1", task) == 1 and await world.delivered_to("sendgrid-1", task) == 1


async def test_an_ambiguous_bulk_email_is_recorded_sent_and_not_resent(world: World):
    await world.add_provider("hangs", "postmark-1", options={"timeout_s": "0.3"})
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=500)
    await world.sim.client.set_knobs("postmark-1", hang_rate=1.0, hang_s=2)
    task = send_task("bulk")

    [verdict] = await world.deliver(task)
    [again] = await world.deliver(task, delivery=2)

    assert verdict.ack and again.ack
    [event] = await world.events_of(task)
    assert event.event.type == SENT and event.event.outcome == messages_pb2.ATTEMPT_OUTCOME_AMBIGUOUS
    assert event.event.attributes["ambiguous"] == "true"
    assert await world.delivered_to("sendgrid-1", task) == 0


async def test_an_email_out_of_failures_is_failed_and_dead_lettered(world: World):
    await world.add_provider("broken", "postmark-1")
    await world.sim.client.set_knobs("postmark-1", error_rate=1.0)
    task = send_task("transactional")
    budget = MessageClass.TRANSACTIONAL.policy.retry.max_failures
    await world.states.redis.hset(world.states.key(task.message_id), "failures", budget - 1)

    [verdict] = await world.deliver(task)

    assert verdict.ack
    types = await world.event_types(task)
    assert types == [ATTEMPTED, DEAD, FAILED]


async def test_an_email_past_its_useful_life_is_failed_and_dead_lettered_unsent(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task("otp", accepted_s_ago=MessageClass.OTP.policy.retry.max_age_s + 1)

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert await world.event_types(task) == [DEAD, FAILED]
    assert await world.delivered_to("postmark-1", task) == 0


async def test_bulk_emails_to_the_same_provider_share_one_batch_call(world: World):
    await world.add_provider("pm", "postmark-1")
    tasks = [send_task("bulk", to=f"r{i}@example.org") for i in range(20)]

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    [request] = await world.sim.client.requests("postmark-1")
    assert request["path"] == "/email/batch" and len(request["messages"]) == 20


async def test_a_batch_larger_than_the_quota_left_spills_over_to_the_next_provider(world: World):
    await world.add_provider("cheap", "postmark-1", price_per_email_micros=10, daily_quota=8)
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=90)
    tasks = [send_task("bulk", to=f"r{i}@example.org") for i in range(20)]

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    assert len(await world.sim.client.delivered_messages("postmark-1")) == 8
    assert len(await world.sim.client.delivered_messages("sendgrid-1")) == 12


async def test_an_email_too_large_for_every_provider_fails_at_once(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task("transactional", message_bytes=11_000_000)

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.event.type == FAILED and "exceeds cap" in event.event.reason


async def test_an_email_a_provider_cannot_carry_goes_to_the_next_without_a_failure(world: World):
    await world.add_provider("one-tag", "postmark-1", price_per_email_micros=10)  # Postmark takes one tag
    await world.add_provider("spare", "sendgrid-1", price_per_email_micros=90)
    task = send_task("transactional", tags=("receipt", "march"))

    [verdict] = await world.deliver(task)

    assert verdict.ack
    assert [e.event.provider for e in await world.events_of(task)] == ["spare"]


async def test_when_every_provider_failed_the_email_starts_a_new_round_after_backoff(world: World):
    await world.add_provider("a", "postmark-1")
    await world.add_provider("b", "sendgrid-1")
    task = send_task("transactional")
    await world.states.redis.hset(world.states.key(task.message_id), mapping={"excluded": "a,b", "failures": 2})

    [verdict] = await world.deliver(task)
    [retry] = await world.deliver(task, delivery=2)

    assert not verdict.ack and verdict.retry_in_s > 0
    assert retry.ack


async def test_an_email_whose_provider_is_unavailable_waits_for_it_to_recover(world: World):
    await world.add_provider("pm", "postmark-1")
    await world.sim.client.set_knobs("postmark-1", outage=True)
    tasks = [send_task("transactional") for _ in range(3)]
    for task in tasks:  # three failures open the breaker
        await world.deliver(task)
    late = send_task("transactional")

    [verdict] = await world.deliver(late)

    assert not verdict.ack and 0 < verdict.retry_in_s <= 0.6  # the breaker's cool-down, not a failure's backoff
    assert await world.delivered_to("postmark-1", late) == 0
    assert len(await world.sim.client.requests("postmark-1")) == 3


async def test_slow_sends_keep_telling_jetstream_they_are_in_progress(world: World):
    await world.add_provider("slow", "postmark-1")
    await world.sim.client.set_knobs("postmark-1", latency_ms=300)

    await world.deliver(send_task("transactional"))

    assert world.heartbeats >= 3


async def test_an_email_held_back_by_a_booked_rate_limit_returns_when_a_slot_frees(world: World):
    spec = await world.add_provider("paced", "postmark-1", rate_limit_per_second=2)
    for _ in range(6):  # other senders booked the next three seconds
        await world.health.acquire(spec.id, _limits(spec), max_wait_s=10)
    task = send_task("transactional")

    [verdict] = await world.deliver(task)

    assert not verdict.ack
    assert 1 < verdict.retry_in_s < 3  # when its slot is within reach, not the class's longest wait
    assert await world.delivered_to("postmark-1", task) == 0


def _limits(spec: ProviderSpec) -> ProviderLimits:
    return ProviderLimits(spec.rate_limit_per_second, spec.daily_quota, spec.monthly_quota)


async def test_attachments_too_large_for_every_provider_travel_as_download_links(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task("transactional")
    task.attachments.add(attachment_id="a1", s3_key="acme/a1", filename="holiday.mp4", content_type="video/mp4",
                         size_bytes=150_000_000)
    task.attachments_as_links = True

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [message] = [m for m in await world.sim.client.delivered_messages("postmark-1")
                 if m["esp_message_id"] == task.message_id]
    assert message["attachments"] == []
    assert "holiday.mp4" in message["text"] and "Signature=" in message["text"]
    events = await world.events_of(task)
    assert [e.event.type for e in events] == [messages_pb2.MESSAGE_EVENT_TYPE_ATTACHMENTS_LINKED, SENT]
    assert "Signature" not in str(events[0].event.attributes)  # the links grant access: never in events


async def test_an_email_whose_outcome_cannot_be_made_durable_is_not_acked_and_never_resent(world: World):
    await world.add_provider("pm", "postmark-1")
    task = send_task("transactional")
    await world.js.delete_stream(world.topology.events_stream)  # JetStream cannot store the SENT event

    with pytest.raises(Exception):  # noqa: B017 - whichever error: the pool must not ack
        await world.deliver(task)
    await ensure_streams(world.js, world.topology)
    [verdict] = await world.deliver(task, delivery=2)

    assert verdict.ack
    assert await world.delivered_to("postmark-1", task) == 1
