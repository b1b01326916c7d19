"""A class pool: one durable JetStream consumer, its own connection and its own concurrency per message class.

Classes never share slots, consumers or connections, so a bulk backlog of any size cannot hold an OTP behind
it: the OTP consumer always has a fetch outstanding and free slots of its own. Emails are acked (or naked with
the delivery's computed delay) only after their delivery made its events durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from esp.internal.v1 import queue_pb2
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Gauge

from libs.common.jetstream import BatchPuller, Topology, ensure_pull_consumer
from libs.common.metrics import JETSTREAM_HANDLED
from libs.common.telemetry import TRACE_HEADERS
from services.sender.delivery import Deliverer, Incoming, Verdict

log = logging.getLogger(__name__)

ERROR_RETRY_S = 2.0
"""A delivery that crashed (Redis or NATS trouble) is offered again after this long."""
LONG_POLL_S = 1.0
FETCH_MAX = 255
"""Most emails one pull asks for."""
POOL_CAPACITY = Gauge("esp_sender_pool_capacity", "Emails a class pool keeps in flight at most now", ["class"])


class Slots:
    """Counts emails in flight against a limit (a semaphore that can take several permits without waiting)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Event()

    async def take_one(self) -> None:
        """Wait for a free slot and take it."""
        while self.used >= self.capacity:
            self._freed.clear()
            await self._freed.wait()
        self.used += 1

    def take_up_to(self, wanted: int) -> int:
        """Take as many free slots as there are, up to ``wanted``, without waiting."""
        taken = max(0, min(wanted, self.capacity - self.used))
        self.used += taken
        return taken

    def release(self, count: int) -> None:
        """Give ``count`` slots back."""
        self.used -= count
        self._freed.set()

    def resize(self, capacity: int) -> None:
        """Allow ``capacity`` emails in flight from now on; when lowered, those in flight above it finish first."""
        self.capacity = capacity
        self._freed.set()


class ClassPool:
    """Keeps up to ``concurrency`` emails of one class in flight, fetched from the class's durable consumer."""

    def __init__(self, nc: NATS, topology: Topology, message_class: str, deliverer: Deliverer, *,
                 concurrency: int, ack_wait_s: float, batch_max: int = 1,
                 on_delivered: Callable[[], None] | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.topology = topology
        self.message_class = message_class
        self.deliverer = deliverer
        self.concurrency = concurrency
        self.ack_wait_s = ack_wait_s
        self.batch_max = max(1, batch_max)
        """Emails one delivery may carry (batch provider calls); 1 delivers each email on its own."""
        self.on_delivered = on_delivered
        """Called after each delivery (urgent pools renew the signal bulk yields to: ``services.sender.yielding``)."""
        self.durable = topology.consumer(f"sender-{message_class}")
        self.slots = Slots(concurrency)
        POOL_CAPACITY.labels(message_class).set(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def setup(self) -> None:
        """Declare the class's durable pull consumer."""
        await ensure_pull_consumer(
            self.js, self.topology.send_stream(self.message_class), self.durable,
            self.topology.send_subject(self.message_class), ack_wait_s=self.ack_wait_s,
            max_ack_pending=self.concurrency * 4)

    async def _handle(self, msgs: list[Msg]) -> None:
        try:
            batch: list[Incoming] = []
            decoded: list[Msg] = []
            for msg in msgs:
                try:
                    task = queue_pb2.SendTask.FromString(msg.data)
                except Exception:
                    log.error("dropping an undecodable send task", extra={"consumer": self.durable})
                    await msg.term()
                    continue
                metadata = msg.metadata
                delivery = metadata.num_delivered if metadata else 1
                sequence = metadata.sequence.stream if metadata else 0
                trace = {k: v for k, v in (msg.headers or {}).items() if k in TRACE_HEADERS}
                batch.append(Incoming(task, delivery, msg.in_progress, trace, sequence, msg.data))
                decoded.append(msg)
            if not batch:
                return
            try:
                verdicts = await self.deliverer.deliver(batch)
            except Exception:
                JETSTREAM_HANDLED.labels(self.durable, "error").inc(len(decoded))
                log.exception("delivery failed; the emails will be offered again", extra={"consumer": self.durable})
                verdicts = [Verdict(ack=False, retry_in_s=ERROR_RETRY_S)] * len(decoded)
            for msg, verdict in zip(decoded, verdicts, strict=True):
                try:
                    if verdict.ack:
                        await msg.ack()
                    else:
                        await msg.nak(delay=verdict.retry_in_s)
                except Exception:  # JetStream redelivers it after ack_wait; the sent marker prevents a resend
                    log.warning("ack failed", exc_info=True, extra={"consumer": self.durable})
            if self.on_delivered is not None:
                self.on_delivered()
            acked = sum(1 for v in verdicts if v.ack)
            JETSTREAM_HANDLED.labels(self.durable, "ack").inc(acked)
            JETSTREAM_HANDLED.labels(self.durable, "retry").inc(len(verdicts) - acked)
        finally:
            self.slots.release(len(msgs))

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` emails in flight from now on (bulk yielding to urgent mail)."""
        self.slots.resize(capacity)
        POOL_CAPACITY.labels(self.message_class).set(capacity)

    def _dispatch(self, msgs: list[Msg]) -> None:
        task = asyncio.create_task(self._handle(msgs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Take whatever is queued, up to the free slots, without waiting (throughput); when nothing is, long-poll
        for the next email and start it the moment it arrives (latency).

        The pulls are :class:`libs.common.jetstream.BatchPuller`'s: a message JetStream delivers after a pull gave
        up is kept for the next one, never left unprocessed until ``ack_wait`` redelivers it."""
        puller = BatchPuller(self.nc, self.topology.send_stream(self.message_class), self.durable)
        await puller.start()
        try:
            while not stop.is_set():
                await self.slots.take_one()
                wanted = 1 + self.slots.take_up_to(min(FETCH_MAX, self.slots.capacity) - 1)
                try:
                    msgs = await puller.next_batch(wanted, LONG_POLL_S)
                except Exception:
                    self.slots.release(wanted)
                    log.warning("fetch failed", exc_info=True, extra={"consumer": self.durable})
                    await asyncio.sleep(0.2)
                    continue
                self.slots.release(wanted - len(msgs))
                for start in range(0, len(msgs), self.batch_max):
                    self._dispatch(msgs[start:start + self.batch_max])
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
        finally:
            try:
                await puller.stop()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
