"""The sender's accept-to-sent histogram (the OTP latency alert's metric) counts each email once, when a provider
takes it, from its acceptance time."""

from __future__ import annotations

from prometheus_client import REGISTRY

from tests.sender.conftest import World, send_task


def observed(message_class: str) -> tuple[float, float]:
    """The histogram's (count, sum) for ``message_class`` so far."""
    labels = {"class": message_class}
    return (REGISTRY.get_sample_value("esp_sender_accept_to_sent_seconds_count", labels) or 0.0,
            REGISTRY.get_sample_value("esp_sender_accept_to_sent_seconds_sum", labels) or 0.0)


async def test_a_sent_otp_is_timed_from_its_acceptance_once(world: World) -> None:
    await world.add_provider("pm", "postmark-1")
    task = send_task("otp", accepted_s_ago=2.0)
    count, total = observed("otp")

    [verdict] = await world.deliver(task)
    [again] = await world.deliver(task, delivery=2)  # already sent: announced again, not timed again

    assert verdict.ack and again.ack
    new_count, new_total = observed("otp")
    assert new_count == count + 1
    assert 2.0 <= new_total - total < 10.0
