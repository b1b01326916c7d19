"""One delivery of one email: rank providers, try them as the class policy says, report every attempt.

Named steps: (1) already sent? → re-announce and ack; (2) rank providers without those that failed this email;
(3) for each candidate: breaker + rate budget, send, record health; (4) accepted → sent marker, SENT event, ack;
retryable/throttled → next provider now (otp) or later with backoff; permanent → FAILED; ambiguous → per class.
Events are made durable (JetStream ack) before the caller acks the email: a crash in between re-runs step (1).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from esp.internal.v1 import queue_pb2
from esp.v1 import common_pb2, messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from libs.common.jetstream import Topology, publish
from libs.providers.base import (
    Address,
    Attachment,
    MessageTooLarge,
    OutboundEmail,
    Outcome,
    ProviderError,
    SendResult,
)
from libs.providers.registry import BUILTIN_TYPES, adapter_class
from libs.routing.catalog import ProviderCatalog
from libs.routing.health import HealthBoard
from libs.routing.scoring import EmailFacts, rank
from services.sender.adapters import AdapterPool
from services.sender.policy import RetryPolicy

log = logging.getLogger(__name__)

CLASS_NAME = {common_pb2.MESSAGE_CLASS_OTP: "otp", common_pb2.MESSAGE_CLASS_TRANSACTIONAL: "transactional",
              common_pb2.MESSAGE_CLASS_BULK: "bulk"}
_OUTCOME = {Outcome.ACCEPTED: messages_pb2.ATTEMPT_OUTCOME_ACCEPTED,
            Outcome.THROTTLED: messages_pb2.ATTEMPT_OUTCOME_THROTTLED,
            Outcome.RETRYABLE: messages_pb2.ATTEMPT_OUTCOME_RETRYABLE,
            Outcome.PERMANENT: messages_pb2.ATTEMPT_OUTCOME_PERMANENT,
            Outcome.AMBIGUOUS: messages_pb2.ATTEMPT_OUTCOME_AMBIGUOUS}
NO_PROVIDER_RETRY_S = 2.0


@dataclass(frozen=True)
class Verdict:
    """What to do with the queued email after this delivery."""

    ack: bool
    retry_in_s: float = 0.0


AttachmentOpener = Callable[[str], AsyncIterator[bytes]]
"""Opens a fresh byte stream of an attachment given its S3 key."""


def outbound_email(task: queue_pb2.SendTask, opener: AttachmentOpener) -> OutboundEmail:
    def addresses(items: Any) -> tuple[Address, ...]:
        return tuple(Address(a.email, a.name) for a in items)

    sender = getattr(task, "from")
    return OutboundEmail(
        message_id=task.message_id, tenant_id=task.tenant_id, message_class=CLASS_NAME[task.message_class],
        sender=Address(sender.email, sender.name), to=addresses(task.to), cc=addresses(task.cc),
        bcc=addresses(task.bcc), reply_to=addresses(task.reply_to), subject=task.subject,
        text=task.text_body or None, html=task.html_body or None, headers=dict(task.headers),
        tags=tuple(task.tags), metadata=dict(task.metadata),
        attachments=tuple(
            Attachment(filename=a.filename, content_type=a.content_type, size=a.size_bytes,
                       chunks=(lambda key=a.s3_key: opener(key)))
            for a in task.attachments),
    )


class EventPublisher:
    """Publishes message events on the EVENTS stream and waits until JetStream has them."""

    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        self.js = js
        self.topology = topology

    async def emit(self, task: queue_pb2.SendTask, event_type: int, *, event_id: str, final: bool = False,
                   provider: str = "", provider_message_id: str = "", reason: str = "", attempt: int = 0,
                   outcome: int = 0, latency_ms: float = 0, attributes: dict[str, str] | None = None) -> None:
        now = Timestamp()
        now.GetCurrentTime()
        envelope = queue_pb2.EventEnvelope(
            tenant_id=task.tenant_id, message_id=task.message_id, final=final, message_class=task.message_class,
            hold_id=task.message_id,
            event=messages_pb2.MessageEvent(
                event_id=event_id, message=f"messages/{task.message_id}", type=event_type, event_time=now,
                provider=provider, provider_message_id=provider_message_id, reason=reason[:1000], attempt=attempt,
                outcome=outcome, latency_ms=int(latency_ms), attributes=attributes or {}))
        await publish(self.js, self.topology.events_subject(task.tenant_id), envelope.SerializeToString(),
                      msg_id=event_id)


class Deliverer:
    """Runs deliveries; shared by the class pools of one sender process."""

    def __init__(self, *, catalog: ProviderCatalog, health: HealthBoard, adapters: AdapterPool,
                 redis: aioredis.Redis, events: EventPublisher, namespace: str, opener: AttachmentOpener,
                 policies: dict[str, RetryPolicy], sent_marker_ttl_s: int = 7 * 86400) -> None:
        self.catalog = catalog
        self.health = health
        self.adapters = adapters
        self.redis = redis
        self.events = events
        self.ns = namespace
        self.opener = opener
        self.policies = policies
        self.sent_marker_ttl_s = sent_marker_ttl_s
        self.size_caps = {t: adapter_class(t).default_capabilities.max_message_bytes for t in BUILTIN_TYPES}

    def _sent_key(self, message_id: str) -> str:
        return f"{self.ns}:sent:{message_id}"

    def _excluded_key(self, message_id: str) -> str:
        return f"{self.ns}:excl:{message_id}"

    async def deliver(self, task: queue_pb2.SendTask, delivery: int,
                      heartbeat: Callable[[], Awaitable[None]]) -> Verdict:
        message_class = CLASS_NAME[task.message_class]
        policy = self.policies[message_class]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._sent_key(task.message_id))
            pipe.smembers(self._excluded_key(task.message_id))
            sent_marker, excluded_raw = await pipe.execute()
        if sent_marker is not None:
            # Sent by an earlier delivery that died before its ack: announce again (same event id → deduped).
            provider, _, provider_message_id = sent_marker.decode().partition("|")
            await self.events.emit(task, messages_pb2.MESSAGE_EVENT_TYPE_SENT, event_id=f"{task.message_id}:sent",
                                   final=True, provider=provider, provider_message_id=provider_message_id)
            return Verdict(ack=True)
        excluded = {e.decode() for e in excluded_raw}
        email = outbound_email(task, self.opener)
        facts = EmailFacts(message_class, task.message_bytes, len(task.to) + len(task.cc) + len(task.bcc),
                           frozenset(excluded))
        decision = rank(self.catalog.providers.values(),
                        {p: self.health.snapshot(p) for p in self.catalog.providers}, facts, self.size_caps)
        if not decision.ranked:
            return await self._no_provider(task, delivery, policy, decision.excluded)
        attempts = 0
        wait_s: float | None = None
        for candidate in decision.ranked:
            if attempts >= policy.max_attempts_per_delivery:
                break
            spec = self.catalog.providers.get(candidate.provider_id)
            if spec is None:
                continue
            allowed, rate_wait = await self.health.acquire(spec.id, spec.rate_limit_per_second)
            if not allowed:
                if rate_wait:
                    wait_s = rate_wait if wait_s is None else min(wait_s, rate_wait)
                continue  # breaker open or out of rate budget: never send a request that would be refused
            attempts += 1
            result = await self._attempt(spec.id, email, heartbeat)
            attempt_no = delivery * 100 + attempts
            if result.outcome is Outcome.ACCEPTED or (
                    result.outcome is Outcome.AMBIGUOUS and not policy.resend_after_ambiguous):
                ambiguous = result.outcome is Outcome.AMBIGUOUS
                await self.redis.set(self._sent_key(task.message_id),
                                     f"{spec.id}|{result.provider_message_id or ''}", ex=self.sent_marker_ttl_s)
                await self.events.emit(
                    task, messages_pb2.MESSAGE_EVENT_TYPE_SENT, event_id=f"{task.message_id}:sent", final=True,
                    provider=spec.id, provider_message_id=result.provider_message_id or "", attempt=attempt_no,
                    outcome=_OUTCOME[result.outcome], latency_ms=(result.elapsed_s or 0) * 1000,
                    reason=result.reason if ambiguous else "",
                    attributes={"ambiguous": "true"} if ambiguous else None)
                return Verdict(ack=True)
            await self.events.emit(
                task, messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED, event_id=f"{task.message_id}:a:{attempt_no}",
                provider=spec.id, attempt=attempt_no, outcome=_OUTCOME[result.outcome],
                latency_ms=(result.elapsed_s or 0) * 1000, reason=result.reason)
            if result.outcome is Outcome.PERMANENT and not result.provider_fault:
                await self._fail(task, f"rejected by {spec.id}: {result.reason}")
                return Verdict(ack=True)
            if result.outcome is Outcome.THROTTLED:
                retry = result.retry_after_s or 1.0
                wait_s = retry if wait_s is None else min(wait_s, retry)
                continue  # not this provider's fault: no exclusion, try the next one now
            await self.redis.sadd(self._excluded_key(task.message_id), spec.id)
            await self.redis.expire(self._excluded_key(task.message_id), 7 * 86400)
            if not policy.failover_now:
                break
        return await self._later(task, delivery, policy, wait_s)

    async def _attempt(self, provider_id: str, email: OutboundEmail,
                       heartbeat: Callable[[], Awaitable[None]]) -> SendResult:
        adapter = self.adapters.get(provider_id)
        started = time.perf_counter()
        beating = asyncio.create_task(_beat(heartbeat))
        try:
            result = await adapter.send(email)
        except MessageTooLarge as exc:
            result = SendResult(Outcome.PERMANENT, reason=str(exc), provider_fault=True)
        except ProviderError as exc:
            result = SendResult(Outcome.PERMANENT, reason=str(exc))
        except Exception as exc:  # an adapter bug must not lose the email: retry elsewhere
            log.exception("adapter %s failed", provider_id)
            result = SendResult(Outcome.RETRYABLE, reason=f"adapter error: {type(exc).__name__}",
                                provider_fault=True)
        finally:
            beating.cancel()
        elapsed_ms = (time.perf_counter() - started) * 1000
        ok = result.outcome is Outcome.ACCEPTED
        counts = result.outcome in (Outcome.ACCEPTED, Outcome.AMBIGUOUS)
        fault = result.outcome in (Outcome.RETRYABLE, Outcome.AMBIGUOUS) or result.provider_fault
        await self.health.record(provider_id, ok=ok, latency_ms=elapsed_ms if ok else None,
                                 counts_toward_quota=counts, provider_fault=fault)
        return result

    async def _later(self, task: queue_pb2.SendTask, delivery: int, policy: RetryPolicy,
                     wait_s: float | None) -> Verdict:
        if delivery >= policy.max_deliveries:
            await self._fail(task, f"gave up after {delivery} deliveries", dead_letter=True)
            return Verdict(ack=True)
        delay = max(wait_s or 0.0, 0.0 if policy.failover_now and wait_s is None else policy.backoff_s(delivery))
        await self.events.emit(task, messages_pb2.MESSAGE_EVENT_TYPE_DEFERRED,
                               event_id=f"{task.message_id}:d:{delivery}", attempt=delivery,
                               reason=f"retry in {delay:.1f}s")
        return Verdict(ack=False, retry_in_s=delay)

    async def _no_provider(self, task: queue_pb2.SendTask, delivery: int, policy: RetryPolicy,
                           excluded: Any) -> Verdict:
        reasons = "; ".join(f"{s.provider_id}: {s.excluded_reason}" for s in excluded) or "no providers configured"
        too_big = excluded and all("exceeds cap" in s.excluded_reason for s in excluded)
        if too_big:
            await self._fail(task, f"no provider takes a message of {task.message_bytes} bytes ({reasons})")
            return Verdict(ack=True)
        if delivery >= policy.max_deliveries:
            await self._fail(task, f"no provider available: {reasons}", dead_letter=True)
            return Verdict(ack=True)
        if excluded and all(s.excluded_reason == "failed for this email already" for s in excluded):
            # Every provider failed once: start a new round rather than give up early.
            await self.redis.delete(self._excluded_key(task.message_id))
        delay = max(NO_PROVIDER_RETRY_S, policy.backoff_s(delivery))
        await self.events.emit(task, messages_pb2.MESSAGE_EVENT_TYPE_DEFERRED,
                               event_id=f"{task.message_id}:d:{delivery}", attempt=delivery,
                               reason=f"no provider available ({reasons}); retry in {delay:.1f}s")
        return Verdict(ack=False, retry_in_s=delay)

    async def _fail(self, task: queue_pb2.SendTask, reason: str, *, dead_letter: bool = False) -> None:
        if dead_letter:
            await self.events.emit(task, messages_pb2.MESSAGE_EVENT_TYPE_DEAD_LETTERED,
                                   event_id=f"{task.message_id}:dead", reason=reason)
        await self.events.emit(task, messages_pb2.MESSAGE_EVENT_TYPE_FAILED, event_id=f"{task.message_id}:failed",
                               final=True, reason=reason)


async def _beat(heartbeat: Callable[[], Awaitable[None]], every_s: float = 10.0) -> None:
    """Tell JetStream the email is still being worked on (slow sends of large attachments)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await heartbeat()
        except Exception:
            log.debug("in-progress ack failed", exc_info=True)


def new_event_id() -> str:
    return uuid.uuid4().hex
