"""An email the provider took for some of its recipients and refused for others (an SMTP relay refusing RCPTs):
it is sent, once, and each refused recipient gets an event of its own saying so, against real Redis, JetStream
and the simulator's SMTP relay (which refuses addresses that are not valid RFC 5321 at RCPT)."""

from __future__ import annotations

from esp.v1 import messages_pb2

from tests.sender.conftest import World, send_task

SENT = messages_pb2.MESSAGE_EVENT_TYPE_SENT
FAILED = messages_pb2.MESSAGE_EVENT_TYPE_FAILED
REJECTED = messages_pb2.MESSAGE_EVENT_TYPE_REJECTED
REFUSAL = "553 5.1.3 The recipient address is not a valid RFC 5321 address"


async def test_each_refused_recipient_gets_a_rejected_event_beside_the_emails_sent(world: World):
    await world.add_provider("relay", "smtp-1")
    task = send_task("transactional", to="alice@example.org")
    task.to.add(email="nobody@no-dot")
    task.cc.add(email="carol@dot-less")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    events = await world.events_of(task)
    [sent] = [e for e in events if e.event.type == SENT]
    rejected = [e for e in events if e is not sent]
    assert sent.final and not sent.event.recipient
    assert sorted(e.event.recipient for e in rejected) == ["carol@dot-less", "nobody@no-dot"]
    for event in rejected:
        assert event.event.type == REJECTED and not event.final  # the email's outcome is its SENT
        assert event.event.reason == REFUSAL
        assert (event.event.provider, event.event.provider_message_id) == ("relay", sent.event.provider_message_id)
        assert event.event.attributes["reason_code"] == "RECIPIENT_REFUSED"
    [message] = await world.sim.client.delivered_messages("smtp-1")
    assert message["recipients"] == ["alice@example.org"]


async def test_an_email_refused_for_some_recipients_is_never_sent_again(world: World):
    await world.add_provider("relay", "smtp-1")
    task = send_task("transactional", to="alice@example.org")
    task.to.add(email="nobody@no-dot")
    await world.deliver(task)

    [verdict] = await world.deliver(task, delivery=2)

    assert verdict.ack
    assert await world.delivered_to("smtp-1", task) == 1


async def test_an_email_refused_for_every_recipient_fails_without_per_recipient_events(world: World):
    await world.add_provider("relay", "smtp-1")
    task = send_task("transactional", to="nobody@no-dot")
    task.to.add(email="carol@dot-less")

    [verdict] = await world.deliver(task)

    assert verdict.ack
    [event] = await world.events_of(task)
    assert event.final and event.event.type == FAILED and REFUSAL in event.event.reason
    assert await world.delivered_to("smtp-1", task) == 0
