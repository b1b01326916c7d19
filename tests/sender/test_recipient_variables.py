"""A campaign's emails queued unrendered with each recipient's values (``SendTask.recipient_variables``): one
provider call carries many of them where the provider substitutes per recipient, and every recipient still gets
its own subject, bodies and headers, wherever the email goes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2

from services.sender.delivery import outbound_email
from tests.sender.conftest import World, send_task


def campaign_task(index: int) -> queue_pb2.SendTask:
    """One email of a campaign whose templates only substitute variables, as the campaigns expander queues it."""
    task = send_task("bulk", to=f"r{index}@example.org", subject="Hello {{ name }}", text="Dear {{name}},")
    task.html_body = "<p>Dear {{ name }},</p>"
    task.headers["List-Unsubscribe"] = "<https://esp.example/u/{{ unsubscribe_token }}>"
    task.headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    task.recipient_variables.update({"name": f"R{index}", "unsubscribe_token": f"token-{index}"})
    return task


async def unopenable(key: str) -> AsyncIterator[bytes]:
    raise AssertionError(f"no attachment should be opened, asked for {key}")
    yield b""  # an async generator, as an attachment opener is


def test_a_tasks_values_belong_to_its_single_to_recipient() -> None:
    email = outbound_email(campaign_task(3), unopenable)

    assert email.recipient_variables == {"r3@example.org": {"name": "R3", "unsubscribe_token": "token-3"}}


def test_a_task_with_several_to_recipients_has_no_recipient_values() -> None:
    task = campaign_task(3)
    task.to.append(common_pb2.EmailAddress(email="other@example.org"))

    assert outbound_email(task, unopenable).recipient_variables == {}


async def test_a_campaigns_emails_share_one_mailgun_call_each_with_its_own_values(world: World) -> None:
    await world.add_provider("mg", "mailgun-us")
    tasks = [campaign_task(i) for i in range(50)]

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    assert len(await world.sim.client.requests("mailgun-us")) == 1
    delivered = {m["to"][0]: m for m in await world.sim.client.delivered_messages("mailgun-us")}
    for index, task in enumerate(tasks):
        message = delivered[f"r{index}@example.org"]
        assert (message["subject"], message["html"]) == (f"Hello R{index}", f"<p>Dear R{index},</p>")
        assert message["headers"]["List-Unsubscribe"] == f"<https://esp.example/u/token-{index}>"
        assert message["esp_message_id"] == task.message_id


async def test_a_campaigns_emails_share_one_sendgrid_call_each_with_its_own_headers(world: World) -> None:
    await world.add_provider("sg", "sendgrid-1")
    tasks = [campaign_task(i) for i in range(50)]

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    assert len(await world.sim.client.requests("sendgrid-1")) == 1
    delivered = {m["to"][0]: m for m in await world.sim.client.delivered_messages("sendgrid-1")}
    assert delivered["r7@example.org"]["subject"] == "Hello R7"
    assert delivered["r7@example.org"]["headers"]["List-Unsubscribe"] == "<https://esp.example/u/token-7>"


async def test_a_campaigns_emails_are_rendered_for_a_provider_that_takes_whole_messages(world: World) -> None:
    await world.add_provider("pm", "postmark-1")
    tasks = [campaign_task(i) for i in range(5)]

    verdicts = await world.deliver(*tasks)

    assert all(v.ack for v in verdicts)
    delivered = {m["to"][0]: m for m in await world.sim.client.delivered_messages("postmark-1")}
    assert delivered["r4@example.org"]["subject"] == "Hello R4"
    assert delivered["r4@example.org"]["headers"]["List-Unsubscribe"] == "<https://esp.example/u/token-4>"
