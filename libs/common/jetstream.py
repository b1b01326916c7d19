"""NATS JetStream: stream and consumer declarations in code, publishing with trace context, pull loops.

Layout: one SEND stream per message class (``SEND_OTP``, ``SEND_TRANSACTIONAL``, ``SEND_BULK``: work queues,
subject ``esp.send.<class>``, dedupe window; DESIGN.md's single SEND stream with the three subjects, split
because OTPs queued behind bulk in it: BENCHMARKS.md, session 7) and stream EVENTS
(limits, subjects ``esp.events.<tenant>.final`` for final outcomes and ``esp.events.<tenant>.progress`` for every
other message event, ``esp.account.<tenant>`` for account events). A namespace prefixes names so several meshes
can share one server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from libs.common.message_classes import MessageClass
from libs.common.metrics import JETSTREAM_HANDLED, JETSTREAM_PUBLISHED
from libs.common.telemetry import inject_headers, message_spans

__all__ = [
    "JS_API_PREFIX",
    "AckedPublisher",
    "BatchPuller",
    "Handler",
    "PublishRejected",
    "StreamLayoutError",
    "Topology",
    "connect",
    "ensure_pull_consumer",
    "ensure_streams",
    "open_kv_bucket",
    "publish",
    "pull_loop",
    "server_urls",
    "watch_bucket",
]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("esp.jetstream")

@dataclass(frozen=True)
class Topology:
    """Stream, subject and consumer names of one mesh (``namespace`` isolates test runs), and how many servers
    of a NATS cluster keep each of its streams (``replicas``: 1 on a single server, 3 in production)."""

    namespace: str = ""
    replicas: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:  # JetStream's own bounds, refused here before any stream is touched
            raise ValueError(f"stream replicas must be 1 to 5, got {self.replicas}")

    def _p(self, name: str) -> str:
        return f"{self.namespace}_{name}" if self.namespace else name

    def _s(self, subject: str) -> str:
        return f"{self.namespace}.{subject}" if self.namespace else subject

    def send_stream(self, message_class: str) -> str:
        """The work queue of one message class. Each class has a stream of its own because JetStream serialises
        the writes of one stream (stores, and the deletions its acks cause): in a single stream every OTP's
        publish and delivery queued behind a bulk backlog's, and a backlog of any size must not delay OTP."""
        return self._p(f"SEND_{message_class.upper()}")

    @property
    def legacy_send_stream(self) -> str:
        """The one work queue of every class that versions before the per-class streams declared."""
        return self._p("SEND")

    @property
    def send_streams(self) -> tuple[str, ...]:
        """The work queue of every message class."""
        return tuple(self.send_stream(c) for c in MessageClass)

    @property
    def streams(self) -> tuple[str, ...]:
        """Every stream of the mesh."""
        return (*self.send_streams, self.events_stream, self.held_stream)

    @property
    def events_stream(self) -> str:
        """The stream of every message and account event (limits retention: read by many consumers)."""
        return self._p("EVENTS")

    @property
    def held_stream(self) -> str:
        """Where senders park the queued emails of paused campaigns (a work queue, one subject per campaign) until
        the campaign is resumed or cancelled and they go back to their SEND stream."""
        return self._p("CAMPAIGN_HELD")

    def held_subject(self, campaign_id: str) -> str:
        """The parked emails of one campaign."""
        return self._s(f"esp.held.{campaign_id}")

    @property
    def held_wildcard(self) -> str:
        """The parked emails of every campaign."""
        return self._s("esp.held.*")

    def send_subject(self, message_class: str) -> str:
        """Where emails of ``message_class`` are queued for the sender."""
        return self._s(f"esp.send.{message_class}")

    def events_subject(self, tenant_id: str, *, final: bool = False) -> str:
        """Where a tenant's message events go: final outcomes (SENT, FAILED: what settles a credit hold) apart
        from the progress before and after them, so the ledger's consumer receives only what it acts on."""
        return self._s(f"esp.events.{tenant_id}.{'final' if final else 'progress'}")

    @property
    def events_wildcard(self) -> str:
        """Every message event of every tenant."""
        return self._s("esp.events.>")

    @property
    def final_events_wildcard(self) -> str:
        """Final outcomes of every tenant."""
        return self._s("esp.events.*.final")

    def account_subject(self, tenant_id: str) -> str:
        """Account-level events (low balance ...), on the EVENTS stream but outside the message-event subjects."""
        return self._s(f"esp.account.{tenant_id}")

    @property
    def account_wildcard(self) -> str:
        """Account-level events of every tenant."""
        return self._s("esp.account.>")

    def notify_subject(self, tenant_id: str) -> str:
        """Where the reports service publishes a tenant's message events as recorded (``RecordedEvents``: with
        their per-message sequence, tags and metadata), for the webhook dispatcher; on the EVENTS stream, outside
        the subjects the recorder itself consumes."""
        return self._s(f"esp.notify.{tenant_id}")

    @property
    def notify_wildcard(self) -> str:
        """Recorded message events of every tenant."""
        return self._s("esp.notify.*")

    def consumer(self, name: str) -> str:
        """The durable consumer name ``name`` in this mesh (JetStream names may not contain dots)."""
        return self._p(name).replace(".", "_")


def server_urls(url: str) -> list[str]:
    """The servers of ``ESP_NATS_URL``: one URL, or the URLs of a cluster's nodes separated by commas (nats-py
    takes a list; it would parse a comma list as one URL)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError("no NATS server URL given")
    return urls


async def connect(url: str, name: str) -> NATS:
    """Connect with reconnects forever (a NATS restart must not kill the service). ``url`` may list a cluster's
    nodes separated by commas: the client connects to one and fails over to the others (and to any node the
    cluster announces)."""
    return await nats.connect(
        server_urls(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
        allow_reconnect=True,
    )


async def ensure_streams(js: JetStreamContext, topology: Topology, *, events_max_age_s: float = 7 * 86400,
                         duplicate_window_s: float = 120.0) -> None:
    """Create or update the SEND streams (one per class), the EVENTS stream and the held campaign emails' stream,
    each kept by ``topology.replicas`` servers. A stream's replica count changes in place: NATS adds the peers and
    copies the stream to them (the stream has no leader for a moment meanwhile), so streams a mesh made at R1 on a
    cluster go to R3 with what they hold. A single server refuses more than one replica."""
    wanted = [
        *(StreamConfig(
            name=topology.send_stream(c),
            subjects=[topology.send_subject(c)],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=duplicate_window_s,
            num_replicas=topology.replicas,
        ) for c in MessageClass),
        StreamConfig(
            name=topology.events_stream,
            subjects=[topology.events_wildcard, topology.account_wildcard, topology.notify_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=events_max_age_s,
            duplicate_window=duplicate_window_s,
            num_replicas=topology.replicas,
        ),
        StreamConfig(
            name=topology.held_stream,
            subjects=[topology.held_wildcard],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=duplicate_window_s,
            num_replicas=topology.replicas,
        ),
    ]
    await _retire_shared_send_stream(js, topology)
    for config in wanted:
        await _declare_stream(js, config)


STREAM_API_ATTEMPTS = 6
"""Tries of a stream or consumer declaration whose API request timed out. On a cluster, creating or changing a
stream or a consumer is a round of the meta group's consensus and then of its own group, each write fsynced under
``sync_interval: always``; a whole mesh starting at once on a busy machine took that past nats-py's 5 s request
timeout. Declarations are idempotent, so a try whose answer was lost is harmless to repeat."""


async def _declare(what: str, declaration: Callable[[], Awaitable[object]]) -> None:
    """Run ``declaration`` until it does not time out (at most ``STREAM_API_ATTEMPTS`` times)."""
    for attempt in range(1, STREAM_API_ATTEMPTS + 1):
        try:
            await declaration()
            return
        except NatsTimeoutError:
            if attempt == STREAM_API_ATTEMPTS:
                raise
            log.warning("declaring %s timed out (try %d of %d); trying again", what, attempt, STREAM_API_ATTEMPTS)


async def _declare_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream or update it to ``config``."""

    async def declaration() -> None:
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)

    await _declare(f"stream {config.name}", declaration)


class StreamLayoutError(RuntimeError):
    """The server holds streams of an older layout that cannot be replaced without losing queued email."""


async def _retire_shared_send_stream(js: JetStreamContext, topology: Topology) -> None:
    """Delete the one SEND stream of all classes that earlier versions declared (its subjects would overlap the
    per-class streams') once it is empty; refuse to start while it still queues email, which an earlier
    version's senders must deliver first."""
    legacy = topology.legacy_send_stream
    try:
        info = await js.stream_info(legacy)
    except NotFoundError:
        return
    if info.state.messages:
        raise StreamLayoutError(
            f"stream {legacy} (one queue for every class, from an earlier version) still holds "
            f"{info.state.messages} emails: let that version's senders drain it, then start this one")
    log.warning("deleting the empty stream %s: each class now has a SEND stream of its own", legacy)
    try:
        await js.delete_stream(legacy)
    except NotFoundError:  # another service starting at the same time deleted it first
        pass


async def ensure_pull_consumer(js: JetStreamContext, stream: str, durable: str, filter_subject: str, *,
                               ack_wait_s: float = 30.0, max_ack_pending: int = 1000, max_deliver: int = -1,
                               backoff_s: list[float] | None = None) -> None:
    """Create or update a durable pull consumer."""
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
        backoff=backoff_s,
    )
    await _declare(f"consumer {durable} of {stream}", lambda: js.add_consumer(stream, config))


async def publish(js: JetStreamContext, subject: str, payload: bytes, *, msg_id: str,
                  headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> None:
    """Publish and wait for the stream's ack. ``msg_id`` becomes ``Nats-Msg-Id`` so replays are dropped."""
    carrier: dict[str, str] = dict(inject_headers(dict(headers or {})))
    carrier["Nats-Msg-Id"] = msg_id
    await js.publish(subject, payload, timeout=timeout_s, headers=carrier)
    JETSTREAM_PUBLISHED.labels(subject.rsplit(".", 1)[0]).inc()


class PublishRejected(Exception):
    """JetStream answered a publish with an error (or no stream listens on the subject)."""


class AckedPublisher:
    """Publishes to JetStream without waiting for each ack: every message carries its own reply subject and the
    acks are matched to futures as they arrive.

    nats-py's ``publish_async`` costs a task, a timer and an event-loop turn per message (its stall semaphore is
    awaited through ``asyncio.wait_for``), so a batch of publishes becomes one socket write per message; here a
    batch of publishes made without awaiting in between leaves in one write, and only the acks are awaited.
    """

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._next = 0
        self._subscribing = asyncio.Lock()
        self._published: dict[str, Any] = {}
        """The publish counter's child per subject prefix (a label lookup per message costs more than the rest)."""

    async def publish(self, subject: str, payload: bytes, msg_id: str,
                      headers: dict[str, str] | None = None) -> asyncio.Future[None]:
        """Send one message (``Nats-Msg-Id`` = ``msg_id``); the future resolves when JetStream has stored it."""
        if not self._prefix:
            async with self._subscribing:
                if not self._prefix:
                    # The prefix is published only once the subscription is on the wire (ahead of any publish
                    # naming it), so no concurrent first publish can get its ack before anyone listens.
                    prefix = f"{self.nc.new_inbox()}."
                    await self.nc.subscribe(f"{prefix}*", cb=self._on_ack)
                    self._prefix = prefix
        self._next += 1
        token = str(self._next)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = ack
        carrier = dict(headers) if headers else {}
        carrier["Nats-Msg-Id"] = msg_id
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=carrier)
        except BaseException:
            self._pending.pop(token, None)
            raise
        prefix = subject.rsplit(".", 1)[0]
        counter = self._published.get(prefix)
        if counter is None:
            counter = self._published[prefix] = JETSTREAM_PUBLISHED.labels(prefix)
        counter.inc()
        return ack

    def forget(self, acks: Sequence[asyncio.Future[None]]) -> None:
        """Stop waiting for these acks (timed out): a late ack is then ignored."""
        waiting = set(map(id, acks))
        for token in [t for t, f in self._pending.items() if id(f) in waiting]:
            self._pending.pop(token).cancel()

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._pending.pop(msg.subject[len(self._prefix):], None)
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            ack.set_exception(PublishRejected(f"no stream listens on {msg.subject}"))
        elif b'"error"' in msg.data:  # a PubAck is small JSON; only errors need parsing
            ack.set_exception(PublishRejected(str(json.loads(msg.data).get("error"))))
        else:
            ack.set_result(None)


Handler = Callable[[list[Msg]], Awaitable[None]]


JS_API_PREFIX = "$JS.API"
_HEARTBEAT = "100"
_ROUTINE_ENDS = frozenset({"404", "408"})
"""Statuses ending a pull request the ordinary way: nothing pending (no_wait), or the request expired."""


class BatchPuller:
    """Pull requests of one durable consumer, answered into one inbox.

    nats-py's ``PullSubscription.fetch`` waits for each message of a batch through ``asyncio.wait_for`` (a task,
    a timer and a ``uuid4`` per message); for consumers that see every event of every email that machinery cost
    as much CPU as the work itself. Here pull requests are plain NATS requests answered into one inbox whose
    callback only appends the messages to a list:

    - a batch first asks for whatever is pending without waiting (``no_wait``), so a backlog is taken in batches
      of up to ``batch`` messages;
    - when nothing is pending it long-polls for a single message, so an idle stream's next message is handled
      at once.

    A message delivered after its request was given up on (late) is kept for the next batch.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, api_prefix: str = JS_API_PREFIX) -> None:
        self._nc = nc
        self._subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._arrived: list[Msg] = []
        self._wanted = 0
        self._ended_with = ""
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        """Subscribe the inbox that every pull request of this puller is answered to."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        """Unsubscribe the inbox; messages still in flight are redelivered by JetStream after ``ack_wait``."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a stream message (JetStream gives each its ack subject); statuses have none
            self._arrived.append(msg)
            if len(self._arrived) >= self._wanted:
                self._wakeup.set()
            return
        status = msg.headers.get("Status", "") if msg.headers else ""
        if status != _HEARTBEAT:
            self._ended_with = status or "?"
            self._wakeup.set()

    async def next_batch(self, batch: int, idle_timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages: those pending now, else the first to arrive within ``idle_timeout_s``
        (else none)."""
        msgs = await self._request(batch, no_wait=True, timeout_s=5.0)
        if msgs:
            return msgs
        return await self._request(1, no_wait=False, timeout_s=idle_timeout_s)

    async def _request(self, batch: int, *, no_wait: bool, timeout_s: float) -> list[Msg]:
        if len(self._arrived) < batch:
            self._wanted = batch
            self._ended_with = ""
            self._wakeup.clear()
            request: dict[str, object] = {"batch": batch - len(self._arrived)}
            if no_wait:
                request["no_wait"] = True
            else:
                # The server ends the request (408) just before we would stop waiting for it.
                request["expires"] = max(1, int(timeout_s * 1e9) - 50_000_000)
            await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except TimeoutError:
                pass
            if self._ended_with and self._ended_with not in _ROUTINE_ENDS:
                log.warning("pull request on %s ended with status %s", self._subject, self._ended_with)
                if not self._arrived:
                    await asyncio.sleep(0.2)  # e.g. the consumer is being recreated: do not spin
        msgs, self._arrived = self._arrived[:batch], self._arrived[batch:]
        return msgs


async def pull_loop(nc: NATS, stream: str, durable: str, handler: Handler, stop: asyncio.Event, *,
                    batch: int = 100, idle_timeout_s: float = 1.0) -> None:
    """Hand batches of a durable pull consumer's messages to ``handler`` until ``stop`` is set.

    The handler acks (or naks) each message itself: acking only after its effect is durable is what makes
    delivery at-least-once. A handler error leaves the batch unacked, so it is redelivered after ``ack_wait``.
    With tracing on, each message of a batch gets a consumer span under the trace its headers carry.
    """
    puller = BatchPuller(nc, stream, durable)
    await puller.start()
    try:
        while not stop.is_set():
            try:
                msgs = await puller.next_batch(batch, idle_timeout_s)
            except Exception:  # e.g. reconnecting: the request could not be published
                log.warning("pull request on %s failed", durable, exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                continue
            try:
                with message_spans(_tracer, f"process {stream}", [msg.headers for msg in msgs],
                                   attributes={"messaging.system": "nats", "messaging.consumer.group.name": durable,
                                               "messaging.batch.message_count": len(msgs)}):
                    await handler(msgs)
                JETSTREAM_HANDLED.labels(durable, "ok").inc(len(msgs))
            except Exception:
                JETSTREAM_HANDLED.labels(durable, "error").inc(len(msgs))
                log.exception("consumer %s failed on a batch of %d; it will be redelivered", durable, len(msgs))
                await asyncio.sleep(0.2)
    finally:
        try:
            await puller.stop()
        except Exception:  # the connection may already be closed
            log.debug("unsubscribe failed", exc_info=True)


async def open_kv_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The KV bucket ``name``, created on first use with one value per key (a bucket holds current state, read by
    :func:`watch_bucket`; its history is not kept)."""
    try:
        return await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(bucket=name, history=1))


async def watch_bucket(kv: KeyValue, apply: Callable[[str, bytes | None], None], loaded: asyncio.Event,
                       stop: asyncio.Event, *, what: str) -> None:
    """Hand every entry of the KV bucket ``kv`` to ``apply(key, value, or None once deleted)`` until ``stop``: its
    contents first (then ``loaded`` is set), then each change as it comes. After connection trouble, or an entry
    ``apply`` raised on, it watches again from the bucket's current contents; ``what`` names it in the log."""
    while not stop.is_set():
        try:
            watcher = await kv.watchall()
            try:
                while not stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=0.5)
                    except TimeoutError:
                        continue
                    except Exception as exc:  # nats raises its own TimeoutError subclass
                        if "Timeout" in type(exc).__name__:
                            continue
                        raise
                    if entry is None:  # end of the initial snapshot
                        loaded.set()
                        continue
                    deleted = entry.operation in ("DEL", "PURGE") or not entry.value
                    apply(entry.key, None if deleted else entry.value)
            finally:
                await watcher.stop()
        except Exception:
            log.exception("%s watch failed; retrying", what)
            await asyncio.sleep(0.5)
