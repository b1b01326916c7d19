"""Class isolation through the whole mesh: OTPs sent while a 20,000-email bulk backlog drains are all delivered
before the backlog is gone.

The bulk backlog is published straight onto the SEND stream (JetStream async publish) rather than through
20,000 SendEmail calls: the behaviour under test starts at the queue, and this keeps the test short.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from libs.common.jetstream import Topology
from tests.progress import wait_for_progress_async
from tests.sender.mesh import STALL_S, Delivered, ProviderMesh

pytestmark = pytest.mark.e2e

BACKLOG = 20_000
OTPS = 10


def bulk_task(index: int) -> queue_pb2.SendTask:
    accepted = Timestamp()
    accepted.GetCurrentTime()
    task = queue_pb2.SendTask(
        message_id=str(uuid.uuid4()), tenant_id="acme", message_class=common_pb2.MESSAGE_CLASS_BULK,
        to=[common_pb2.EmailAddress(email=f"reader{index}@example.org")], subject="Our spring newsletter",
        text_body="Spring is here.", message_bytes=1_500, accepted_time=accepted)
    getattr(task, "from").email = "news@example.com"
    return task


@pytest.fixture
async def jetstream(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def queue_backlog(js: JetStreamContext, subject: str, tasks: list[queue_pb2.SendTask]) -> None:
    for start in range(0, len(tasks), 2_000):
        acks = [await js.publish_async(subject, t.SerializeToString(), headers={"Nats-Msg-Id": t.message_id})
                for t in tasks[start:start + 2_000]]
        await asyncio.gather(*acks)


async def test_otps_sent_while_a_bulk_backlog_drains_are_all_delivered_before_it_drains(
        mesh: ProviderMesh, jetstream: JetStreamContext):
    await mesh.create_provider("bulk-cheap", price=10, classes=["bulk"])
    await mesh.create_provider("otp-fast", price=100, classes=["otp"])
    backlog = [bulk_task(i) for i in range(BACKLOG)]
    subject = Topology(mesh.running.config.namespace).send_subject("bulk")

    await queue_backlog(jetstream, subject, backlog)
    otps = []
    for _ in range(OTPS):
        otps.append(await mesh.send("otp", subject="Your code"))
        await asyncio.sleep(0.1)  # spread over the drain, not a wait for anything

    otp_arrivals = [d[0].arrived_at for d in (await mesh.wait_delivered(otps)).values()]
    last_otp = max(otp_arrivals)
    bulk_ids = {t.message_id for t in backlog}

    async def bulk_delivered() -> list[Delivered]:
        return [d for d in await mesh.delivered(["bulk-cheap"]) if d.message_id in bulk_ids]

    def drained(bulk: list[Delivered]) -> bool:
        return len({d.message_id for d in bulk}) == BACKLOG

    bulk = await wait_for_progress_async(bulk_delivered, drained, what="the bulk backlog draining", stall_s=STALL_S,
                                         every_s=1.0, progress=len,
                                         describe=lambda b: f"{len({d.message_id for d in b})} of {BACKLOG} sent")
    assert last_otp < max(d.arrived_at for d in bulk)
    still_queued = sum(1 for d in bulk if d.arrived_at > last_otp)
    assert still_queued > 0
