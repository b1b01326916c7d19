"""A lean JetStream pull subscription for the ledger's outcome consumer.

nats-py's ``PullSubscription.fetch`` spends a task, an ``asyncio.wait_for`` and a ``uuid4`` on every message it
returns; on the ledger, which sees every event of every email (and settles only the final ones), that machinery
cost more CPU than the settlement itself. Here the pull requests go out as plain NATS requests to one inbox whose
callback appends each delivered message to a list, and a fetch returns when its batch is complete or the server
ends the request with a status (404 no messages, 408 expired, 409 ...).

A fetch first asks for whatever is pending without waiting (``no_wait``); only when nothing is pending does it
long-poll for a single message, so a lone event is settled at once and a backlog is taken in full batches.
Messages that arrive after a fetch gave up (a late delivery of an earlier request) are returned by the next one;
every message is still acked by the handler only after its effect is durable.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.common.jetstream import Handler
from libs.common.metrics import JETSTREAM_HANDLED

log = logging.getLogger(__name__)

JS_API_PREFIX = "$JS.API"
_STATUS = "Status"
_HEARTBEAT = "100"
_ROUTINE_ENDS = ("404", "408")
"""Statuses that end a pull request in the ordinary way (nothing pending, request expired)."""


class LeanPullSubscription:
    """Pull requests for one durable consumer, answered into one inbox."""

    def __init__(self, nc: NATS, stream: str, durable: str, *, api_prefix: str = JS_API_PREFIX) -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._msgs: list[Msg] = []
        self._wanted = 0
        self._ended_with = ""
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a stream message: JetStream gives each its ack subject
            self._msgs.append(msg)
            if len(self._msgs) >= self._wanted:
                self._wakeup.set()
            return
        status = msg.headers.get(_STATUS, "") if msg.headers else ""
        if status != _HEARTBEAT:
            self._ended_with = status or "?"
            self._wakeup.set()

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages: those pending now, else the first to arrive within ``timeout_s`` (then an
        empty list). Raises nothing for a routine end of a request; an unusual status is logged."""
        msgs = await self._pull(batch, timeout_s=5.0, no_wait=True)
        if msgs:
            return msgs
        return await self._pull(1, timeout_s=timeout_s, no_wait=False)

    async def _pull(self, batch: int, *, timeout_s: float, no_wait: bool) -> list[Msg]:
        if len(self._msgs) < batch:
            self._wanted = batch
            self._ended_with = ""
            self._wakeup.clear()
            request: dict[str, object] = {"batch": batch - len(self._msgs)}
            if no_wait:
                request["no_wait"] = True
            else:
                # Expire on the server just before we stop waiting, so its 408 normally ends the wait.
                request["expires"] = max(1, int(timeout_s * 1e9) - 50_000_000)
            await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except TimeoutError:
                pass
            if self._ended_with and self._ended_with not in _ROUTINE_ENDS:
                log.warning("pull request on %s ended with status %s", self._next_subject, self._ended_with)
                if not self._msgs:
                    await asyncio.sleep(0.2)  # e.g. the consumer is being recreated: do not spin
        msgs, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return msgs


async def lean_pull_loop(nc: NATS, stream: str, durable: str, handler: Handler, stop: asyncio.Event, *,
                         batch: int = 1000, fetch_timeout_s: float = 1.0) -> None:
    """Like :func:`libs.common.jetstream.pull_loop`, over :class:`LeanPullSubscription`: the handler acks each
    message itself; a handler error leaves the batch unacked, to be redelivered after ``ack_wait``."""
    sub = LeanPullSubscription(nc, stream, durable)
    await sub.start()
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, fetch_timeout_s)
            except Exception:  # e.g. the connection is reconnecting: the publish of the request failed
                log.warning("pull request on %s failed", durable, exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                continue
            try:
                await handler(msgs)
                JETSTREAM_HANDLED.labels(durable, "ok").inc(len(msgs))
            except Exception:
                JETSTREAM_HANDLED.labels(durable, "error").inc(len(msgs))
                log.exception("consumer %s failed on a batch of %d; it will be redelivered", durable, len(msgs))
                await asyncio.sleep(0.2)
    finally:
        try:
            await sub.stop()
        except Exception:  # the connection may already be closed
            log.debug("unsubscribe failed", exc_info=True)
