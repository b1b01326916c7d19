"""A class pool: one durable JetStream consumer and its own concurrency, so classes never share slots."""

from __future__ import annotations

import asyncio
import logging

import nats
from esp.internal.v1 import queue_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libs.common.jetstream import Topology, ensure_pull_consumer
from libs.common.metrics import JETSTREAM_HANDLED
from services.sender.delivery import Deliverer

log = logging.getLogger(__name__)


class ClassPool:
    """Keeps up to ``concurrency`` emails of one class in flight."""

    def __init__(self, js: JetStreamContext, topology: Topology, message_class: str, deliverer: Deliverer, *,
                 concurrency: int, ack_wait_s: float) -> None:
        self.js = js
        self.topology = topology
        self.message_class = message_class
        self.deliverer = deliverer
        self.concurrency = concurrency
        self.ack_wait_s = ack_wait_s
        self.durable = topology.consumer(f"sender-{message_class}")
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def setup(self) -> None:
        await ensure_pull_consumer(
            self.js, self.topology.send_stream, self.durable, self.topology.send_subject(self.message_class),
            ack_wait_s=self.ack_wait_s, max_ack_pending=self.concurrency * 4)

    async def _handle(self, msg: Msg) -> None:
        try:
            try:
                task = queue_pb2.SendTask.FromString(msg.data)
            except Exception:
                log.error("dropping an undecodable send task")
                await msg.term()
                return
            delivery = msg.metadata.num_delivered if msg.metadata else 1
            verdict = await self.deliverer.deliver(task, delivery, msg.in_progress)
            if verdict.ack:
                await msg.ack()
            else:
                await msg.nak(delay=verdict.retry_in_s)
            JETSTREAM_HANDLED.labels(self.durable, "ack" if verdict.ack else "retry").inc()
        except Exception:
            # Not acked: JetStream redelivers after ack_wait. Nothing is lost.
            JETSTREAM_HANDLED.labels(self.durable, "error").inc()
            log.exception("delivery failed; the email will be redelivered")
        finally:
            self._slots.release()

    def _dispatch(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take_free_slots(self, most: int) -> int:
        taken = 0
        while taken < most and not self._slots.locked():
            self._slots._value -= 1
            taken += 1
        return taken

    async def run(self, stop: asyncio.Event) -> None:
        """Long-poll for one email and start it at once (latency), then grab whatever else is already queued
        without waiting (throughput). A plain fetch(n) would hold the first email until n arrived or it timed out."""
        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.topology.send_stream)
        try:
            while not stop.is_set():
                await self._slots.acquire()
                try:
                    first = await sub.fetch(1, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    self._slots.release()
                    continue
                except Exception:
                    self._slots.release()
                    log.warning("fetch failed", exc_info=True)
                    await asyncio.sleep(0.2)
                    continue
                for msg in first:
                    self._dispatch(msg)
                extra = self._take_free_slots(min(255, self.concurrency))
                more: list[Msg] = []
                if extra:
                    try:
                        more = await sub.fetch(extra, timeout=0.002)
                    except (TimeoutError, nats.errors.TimeoutError):
                        more = []
                    except Exception:
                        log.warning("fetch failed", exc_info=True)
                for _ in range(extra - len(more)):
                    self._slots.release()
                for msg in more:
                    self._dispatch(msg)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
