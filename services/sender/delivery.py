"""One delivery of a batch of queued emails of one class: rank providers, call them, report every attempt.

The steps, each a method below:

1. ``_claim`` — lease each email and read its memory (one Redis round trip for the batch). Another sender
   holds it → leave it to that sender. Already sent (sent marker) → announce SENT again (same event id, so the
   stream drops the duplicate) and ack: a redelivered email is never sent twice. Older than its class's
   useful life → FAILED and dead-lettered (unless it or its campaign is halted: see step 2). Each email to send
   carries the DKIM keys of the verified domain covering its From (``services.sender.signing``).
2. ``_rank`` — the fallback chain for each email from the local catalog and health snapshot (no round trip),
   without the providers that failed it last time or were tried in this delivery. Before it (and in step 1),
   an email cancelled itself or whose campaign is halted (the in-process snapshot of ``services.sender.halts``)
   leaves the delivery: cancelled → final CANCELLED and ack; paused → parked on the campaign's held subject and
   acked once the park is durable.
   After it, ``_drop_suppressed`` looks up every recipient of the ranked emails on the suppression list again
   (one round trip, ``services.sender.suppressions``): one suppressed since the email was queued → FAILED.
3. ``_place`` — walk each email down its chain: the provider's adapter must accept it (its ``precheck`` at the
   size ingest measured: recipients, features, size), then ``acquire`` (breaker, Retry-After pause, quota, rate
   slot — one pipelined round trip for all calls) must grant it; a refusal moves the email to its next provider at
   once — except that an email of a class that paces (bulk) waits in the queue for a provider that refused it
   for its rate budget rather than go on to one several times dearer (``services.sender.outcomes.waits_for_cheaper``).
   Bulk emails going to the same provider share the batch calls its adapter plans (``plan_batches``).
4. ``_perform`` — the provider calls, concurrently (after the booked rate slot, if any). Right before each
   call the halts are looked at again, so an email or campaign halted during the rate wait reaches no provider
   either.
5. ``_record`` — the calls' outcomes into the shared provider health (one round trip for all calls).
6. ``_conclude`` — per email, per its class's retry policy (``libs.common.message_classes``): accepted → SENT,
   and one REJECTED per recipient the provider refused while it took the email for the others (the event names
   the recipient; the email is not sent again for them); rejected → FAILED; throttled → next provider now, or
   wait the Retry-After; failed → next provider now (otp, probes) or backoff; failure budget spent → FAILED +
   DEAD_LETTERED. Emails to retry now go back to step 2 (steps 2 to 6 are one ``_round``).
7. ``_commit`` — after the last round: each email's new memory (sent marker, failed providers, failure
   count) and its lease given back, one round trip for the batch; then every event decided along the way is
   published and made durable together, and the paused campaigns' emails parked on the held stream. Only then
   does ``deliver`` return and the pool ack (or nak with the computed delay) the emails; a park the held stream
   did not acknowledge is naked, never acked. The marker is written before the SENT event exists, so a crash in
   between re-announces and never resends; a crash anywhere else re-runs the delivery from step 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from opentelemetry import trace as otel_trace
from prometheus_client import Counter, Histogram

from libs.common.campaign_halts import Halt
from libs.common.event_types import REASON_CODE_ATTRIBUTE, RECIPIENT_REFUSED_REASON_CODE, SUPPRESSED_REASON_CODE
from libs.common.message_classes import MessageClass, RetryPolicy
from libs.common.sending_domains import SendingDomains
from libs.common.telemetry import message_spans, span_headers
from libs.providers.base import ProviderAdapter
from libs.providers.errors import AdapterConfigError, InvalidMessage, ProviderError
from libs.providers.model import Address, Attachment, OutboundEmail, Outcome, SendResult
from libs.routing.catalog import ProviderCatalog, ProviderSpec
from libs.routing.health import HealthBoard, Permit, ProviderLimits, Refusal
from libs.routing.readiness import NOT_READY, address_domain
from libs.routing.scoring import EmailFacts, RouteDecision, rank
from services.sender.adapters import AdapterPool
from services.sender.events import NO_ATTEMPT, AttemptFacts, EventPublisher
from services.sender.halts import CampaignHalts, held_msg_id
from services.sender.links import LinkedAttachments
from services.sender.outcomes import (
    MIN_RETRY_S,
    Next,
    Unroutable,
    after_attempt,
    paced_delay_s,
    rate_limited_cheapest,
    recorded_call,
    sent,
    unavailable_delay_s,
    unroutable,
    waits_for_cheaper,
)
from services.sender.retries import backoff_s
from services.sender.signing import DKIM_SIGNED, SigningKeys
from services.sender.state import MessageState, MessageStateStore, SentMarker, StateChange
from services.sender.suppressions import Recipients, SuppressionCheck

log = logging.getLogger(__name__)
_tracer = otel_trace.get_tracer("esp.sender")

RETRY_POLICIES: Mapping[str, RetryPolicy] = {c.value: c.policy.retry for c in MessageClass}
"""Each class's retry policy as the class table sets it; what the sender service runs with."""
LEASE_BUSY_RETRY_S = 5.0
"""Another sender holds the email: look again after this long (it will normally have acked it by then)."""
SIZE_BUCKET_BYTES = 4096
"""Emails whose sizes round up to the same bucket share one ranking within a delivery (bulk batches) ..."""
SIZE_BUCKET_LIMIT = 1_000_000
"""... when they are smaller than this; larger ones are ranked by their exact size (caps are 10 MB and up)."""

ATTEMPTS = Counter("esp_sender_attempts_total", "Provider calls per email, by outcome", ["provider", "outcome"])
CALL_SECONDS = Histogram("esp_sender_provider_call_seconds", "Provider call latency", ["provider"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
FALLBACK_DECISION = Histogram(
    "esp_sender_fallback_decision_seconds",
    "From a failed attempt's answer to the next provider call for the same email (same delivery)",
    buckets=(0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1))
ACCEPT_TO_SENT = Histogram(
    "esp_sender_accept_to_sent_seconds",
    "From the email's acceptance (a scheduled one's send time) to the provider accepting it, by class",
    ["class"], buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600))
VERDICTS = Counter("esp_sender_deliveries_total", "Emails handled per delivery, by verdict", ["class", "verdict"])
WITHHELD = Counter("esp_sender_withheld_total", "Emails kept from every provider just before the call, by why",
                   ["class", "why"])
PARK_RETRY_S = 2.0
"""An email whose park on the held stream was not acknowledged is offered again after this long."""


@dataclass(frozen=True)
class Verdict:
    """What to do with the queued email after this delivery."""

    ack: bool
    retry_in_s: float = 0.0


ACK = Verdict(ack=True)


@dataclass(frozen=True)
class Incoming:
    """One email as fetched from its class's queue."""

    task: queue_pb2.SendTask
    delivery: int
    """JetStream's delivery count (1 the first time)."""
    heartbeat: Callable[[], Awaitable[None]]
    """Tells JetStream the email is still being worked on (in-progress ack)."""
    trace: Mapping[str, str] = field(default_factory=dict)
    """The W3C trace context the email was queued with; its events carry it on, so one trace spans the send."""
    sequence: int = 0
    """Its sequence in the SEND stream (0: unknown, the delivery count stands in): names its park, if parked."""
    payload: bytes = b""
    """The task as queued (empty: ``task`` encoded again); a parked email is parked as it was queued."""


AttachmentOpener = Callable[[str], AsyncIterator[bytes]]
"""Opens a fresh byte stream of an attachment given its S3 key."""
AttachmentLinker = Callable[[queue_pb2.SendTask], LinkedAttachments]
"""Replaces a task's attachments by expiring download links (``services.sender.links.link_attachments``)."""


def outbound_email(task: queue_pb2.SendTask, opener: AttachmentOpener) -> OutboundEmail:
    """The provider-neutral email a queued task describes; attachments stream from S3 when read."""
    # Empty repeated and map fields are skipped rather than converted: this runs for every email of a bulk
    # backlog, and iterating an empty protobuf container costs as much as a small copy.
    def addresses(items: Any) -> tuple[Address, ...]:
        return tuple(Address(a.email, a.name) for a in items) if items else ()

    sender = getattr(task, "from")
    to = addresses(task.to)
    return OutboundEmail(
        message_id=task.message_id, tenant_id=task.tenant_id, message_class=_class_of(task),
        sender=Address(sender.email, sender.name), to=to, cc=addresses(task.cc),
        bcc=addresses(task.bcc), reply_to=addresses(task.reply_to), subject=task.subject,
        text=task.text_body or None, html=task.html_body or None,
        headers=dict(task.headers) if task.headers else {}, tags=tuple(task.tags) if task.tags else (),
        metadata=dict(task.metadata) if task.metadata else {},
        attachments=tuple(
            Attachment(filename=a.filename, content_type=a.content_type, size=a.size_bytes,
                       chunks=partial(opener, a.s3_key))
            for a in task.attachments) if task.attachments else (),
        # The values of the placeholders left in the content, for its single `to`: a batching provider substitutes
        # them, so a campaign's emails share one call; the others are rendered before the call (`personalize`).
        recipient_variables={to[0].email: dict(task.recipient_variables)}
        if task.recipient_variables and len(to) == 1 else {},
    )


@dataclass(eq=False)
class Job:
    """One email going through this delivery."""

    incoming: Incoming
    message_class: MessageClass
    policy: RetryPolicy
    state: MessageState
    email: OutboundEmail | None = None
    tried: set[str] = field(default_factory=set)
    """Providers tried or found unusable for it during this delivery."""
    calls: int = 0
    """Provider calls made for it during this delivery."""
    verdict: Verdict | None = None
    wait_hint_s: float | None = None
    """The soonest a provider it was refused by could take it."""
    failed_at: float | None = None
    """When its last failed attempt answered (perf counter), to time the fallback decision."""
    dirty: bool = False
    """Its memory changed and must be written back."""
    marked: bool = False
    """It was sent during this delivery: the sent marker must be written."""
    last_refusal: str = ""
    costs: dict[str, float] = field(default_factory=dict)
    """What the email costs at each provider of its chain, this round."""
    rate_refused_cost: float | None = None
    """The cost of the cheapest provider that refused it for its rate budget this round (None: none did) ..."""
    rate_refused_by: str = ""
    """... and that provider."""
    waiting_for: str = ""
    """The cheap provider it waits for in the queue rather than pay a dear one (``waits_for_cheaper``)."""
    parked: bool = False
    """Its campaign is paused: it goes to the held stream, and is acked only once it is there."""
    span: otel_trace.Span | None = None
    """Its delivery's span (tracing on), under the trace it was queued with: its provider call and events join it."""

    @property
    def task(self) -> queue_pb2.SendTask:
        """The queued send task (as ingest encoded it)."""
        return self.incoming.task

    @property
    def message_id(self) -> str:
        """The email's message id."""
        message_id: str = self.incoming.task.message_id
        return message_id

    @property
    def size(self) -> int:
        """The email's encoded size as ingest measured it (with links, when its attachments travel as links)."""
        size: int = self.incoming.task.message_bytes
        return size

    def hint(self, seconds: float) -> None:
        """Remember the soonest time a refusing provider could take the email."""
        if seconds > 0 and (self.wait_hint_s is None or seconds < self.wait_hint_s):
            self.wait_hint_s = seconds


@dataclass(frozen=True)
class EventIntent:
    """An event decided during the delivery; all are published together once the email's memory is written."""

    task: queue_pb2.SendTask
    event_type: int
    event_id: str
    final: bool = False
    reason: str = ""
    facts: AttemptFacts = NO_ATTEMPT
    recipient: str = ""
    """The one recipient the event is about; empty for the whole email."""


Outbox = list[EventIntent]


@dataclass
class Call:
    """One provider call carrying one email, or several through the provider's batch API."""

    provider_id: str
    jobs: list[Job]
    permit: Permit
    results: list[SendResult] = field(default_factory=list)
    reached_provider: bool = True
    """False when the call failed before any network I/O (its quota is given back)."""
    withheld: int = 0
    """Emails taken out of the call after their permit was granted (cancelled, or campaign halted): their quota is
    given back."""


class Deliverer:
    """Runs deliveries; shared by the class pools of one sender process."""

    def __init__(self, *, catalog: ProviderCatalog, health: HealthBoard, adapters: AdapterPool,
                 states: MessageStateStore, events: EventPublisher, opener: AttachmentOpener,
                 policies: Mapping[str, RetryPolicy], linker: AttachmentLinker | None = None,
                 heartbeat_s: float = 20.0, halts: CampaignHalts | None = None,
                 suppressions: SuppressionCheck | None = None, domains: SendingDomains | None = None) -> None:
        self.catalog = catalog
        self.health = health
        self.adapters = adapters
        self.states = states
        self.events = events
        self.opener = opener
        self.linker = linker
        self.policies = policies
        self.heartbeat_s = heartbeat_s
        self.halts = halts
        """Halted campaigns and cancelled messages (None: none are ever halted)."""
        self.suppressions = suppressions
        """The suppression re-check before the call (None: only accept's check)."""
        self.domains = domains
        """The tenants' sending domains: DKIM keys and provider readiness (None: no domain is known)."""
        self.signing_keys = SigningKeys()
        """The DKIM keys each email carries to its adapter, built once per domain (``services.sender.signing``)."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- the whole delivery ----------------------------------------------------------------------------------
    async def deliver(self, batch: Sequence[Incoming]) -> list[Verdict]:
        """Deliver a batch of emails of one class; returns one verdict per email, once every event is durable."""
        pending: Outbox = []
        beating = asyncio.create_task(_beat([i.heartbeat for i in batch], self.heartbeat_s))
        spans = message_spans(_tracer, "deliver", [i.trace for i in batch],
                              attributes={"messaging.system": "nats", "messaging.batch.message_count": len(batch)})
        try:
            with spans as delivery_spans:
                jobs = await self._claim(batch, pending)
                for job, span in zip(jobs, delivery_spans, strict=False):
                    job.span = span
                    span.set_attribute("esp.message_id", job.message_id)
                await self._run_rounds(jobs, pending)
        finally:
            beating.cancel()
        verdicts = [job.verdict or Verdict(ack=False, retry_in_s=MIN_RETRY_S) for job in jobs]
        counts = Tally((job.message_class, "ack" if verdict.ack else "retry")
                         for job, verdict in zip(jobs, verdicts, strict=True))
        for labels, count in counts.items():  # one label lookup per kind, not per email
            VERDICTS.labels(*labels).inc(count)
        return verdicts

    async def _run_rounds(self, jobs: list[Job], pending: Outbox) -> None:
        """Steps 2 to 7 for the claimed ``jobs``: rounds of placement and calls, then the commit."""
        active = [job for job in jobs if job.verdict is None]
        for _round in range(len(self.catalog.providers) + 2):
            if not active:
                break
            active = await self._round(active, pending)
        for job in active:  # only when every round asked for another: wait like any retry
            self._later(job, backoff_s(job.policy, max(1, job.state.failures)), "no provider left", pending)
        await self._commit(jobs, pending)

    # -- step 1 --------------------------------------------------------------------------------------------------
    async def _claim(self, batch: Sequence[Incoming], pending: Outbox) -> list[Job]:
        states = await self.states.claim([i.task.message_id for i in batch], self.owner)
        jobs: list[Job] = []
        for incoming, state in zip(batch, states, strict=True):
            message_class = _class_of(incoming.task)
            job = Job(incoming, message_class, self.policies[message_class], state)
            jobs.append(job)
            if not state.leased:
                job.verdict = Verdict(ack=False, retry_in_s=LEASE_BUSY_RETRY_S)
            elif state.sent is not None:
                # Sent by an earlier delivery that died before its ack: announce again (the stream drops it if
                # the first announcement got through), never send again.
                facts = AttemptFacts(
                    provider=state.sent.provider, provider_message_id=state.sent.provider_message_id,
                    attributes={"ambiguous": "true"} if state.sent.ambiguous else {})
                self._sent(job, facts, pending)
                self._refused(job, facts, state.sent.refused, pending)
            elif self._halted(job, pending):
                pass  # a cancelled email, or a halted campaign's, is cancelled or parked, however long it waited
            elif _age_s(incoming.task) > job.policy.max_age_s:
                self._fail(job, f"not sent within {job.policy.max_age_s:.0f}s of acceptance", pending,
                           dead_letter=True)
            else:
                job.email = self._outbound(job, pending)
        return jobs

    def _outbound(self, job: Job, pending: Outbox) -> OutboundEmail | None:
        """The email to send; attachments too large for every provider travel as download links (ingest decided
        at accept: ``attachments_as_links``), made fresh on each delivery."""
        task = job.task
        if task.attachments_as_links and task.attachments:
            if self.linker is None:
                self._fail(job, "attachments must be sent as links but this sender cannot sign them", pending)
                return None
            linked = self.linker(task)
            pending.append(EventIntent(task, linked.event_type, linked.event_id,
                                       facts=AttemptFacts(attributes=linked.event_attributes)))
            task = linked.task
        email = outbound_email(task, self.opener)
        if self.domains is not None:
            covering, keys = self.signing_keys.for_email(self.domains, email)
            if keys or covering is not None:
                email = replace(email, dkim_keys=keys, sending_domain=covering.domain if covering else "")
        return email

    # -- steps 2 to 6, once ----------------------------------------------------------------------------------------
    async def _round(self, jobs: list[Job], pending: Outbox) -> list[Job]:
        chains: dict[Job, list[str]] = {}
        decisions: dict[tuple[object, ...], RouteDecision] = {}
        for job in jobs:
            # A halted campaign's backlog leaves before it books any quota or rate slot (a paused campaign's
            # emails are parked at full speed, never at the provider's rate).
            if self._halted(job, pending):
                continue
            decision = self._rank(job, decisions)
            job.costs = {s.provider_id: s.expected_cost_micros for s in decision.ranked}
            job.rate_refused_cost, job.rate_refused_by, job.waiting_for = None, "", ""
            booked = rate_limited_cheapest(decision)
            if booked is not None:  # left out by the snapshot: its schedule is booked beyond the class's wait
                job.rate_refused_by, job.rate_refused_cost = booked
            if decision.ranked:
                chains[job] = [s.provider_id for s in decision.ranked]
            else:
                self._unroutable(job, decision, pending)
        await self._drop_suppressed(chains, pending)
        calls, unplaced = await self._place(chains, pending)
        for job in unplaced:
            if job.waiting_for:
                self._wait_for_cheaper(job, pending)
            else:
                self._unavailable(job, pending)
        if calls:
            await asyncio.gather(*(self._perform(call, pending) for call in calls))
            await self._record(calls)
        again: list[Job] = []
        for call in calls:
            for job, result in zip(call.jobs, call.results, strict=True):
                if self._conclude(job, call, result, pending):
                    again.append(job)
        return again

    # -- step 2 --------------------------------------------------------------------------------------------------
    def _rank(self, job: Job, cache: dict[tuple[object, ...], RouteDecision]) -> RouteDecision:
        task = job.task
        excluded = frozenset(job.state.excluded | job.tried)
        recipients = len(task.to) + len(task.cc) + len(task.bcc)
        size = job.size
        if size <= SIZE_BUCKET_LIMIT:  # far below any cap: rounding up cannot change eligibility
            size = -(-max(size, 1) // SIZE_BUCKET_BYTES) * SIZE_BUCKET_BYTES
        sender_domain = address_domain(getattr(task, "from").email)  # providers not ready for it are left out
        key = (job.message_class, size, recipients, excluded, task.tenant_id, sender_domain)
        decision = cache.get(key)
        if decision is None:
            facts = EmailFacts(job.message_class, size, recipients, excluded, tenant_id=task.tenant_id,
                               from_domain=sender_domain)
            decision = rank(self.catalog.providers.values(), self.health.snapshots, facts, domains=self.domains)
            cache[key] = decision
        return decision

    def _halted(self, job: Job, pending: Outbox) -> bool:
        """Take the email out of the delivery if it was cancelled (``CancelMessage``) or its campaign is halted:
        cancelled → final CANCELLED (its hold is released), paused → parked (``_commit``). True when it was taken
        out."""
        if self.halts is None:
            return False
        if self.halts.message_cancelled(job.message_id):
            self._cancelled(job, "message cancelled", pending)
            WITHHELD.labels(job.message_class, "message_cancelled").inc()
            return True
        halt = self.halts.of(job.task.campaign_id)
        if halt is None:
            return False
        if halt is Halt.CANCELLED:
            self._cancelled(job, "campaign cancelled", pending)
        else:
            job.parked = True  # acked only once the park is durable: _commit takes the ack back if it is not
            job.verdict = ACK
        WITHHELD.labels(job.message_class, halt.value).inc()
        return True

    @staticmethod
    def _cancelled(job: Job, reason: str, pending: Outbox) -> None:
        """Drop the email for good: a final CANCELLED event (the same id ingest gives it when it withdraws a scheduled
        email, so the stream keeps one), then ack."""
        pending.append(EventIntent(
            job.task, messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED, event_id=f"{job.message_id}:cancelled",
            final=True, reason=reason))
        job.verdict = ACK

    async def _drop_suppressed(self, chains: dict[Job, list[str]], pending: Outbox) -> None:
        """Fail the emails with a recipient suppressed since they were queued (every email in one round trip)."""
        if self.suppressions is None or not chains:
            return
        jobs = list(chains)
        found = await self.suppressions.suppressed([
            Recipients(job.task.tenant_id, job.message_class, _recipients(job.task), job.task.topic) for job in jobs])
        for job, addresses in zip(jobs, found, strict=True):
            if not addresses:
                continue
            del chains[job]
            self._fail(job, f"suppressed: {', '.join(addresses)} joined the suppression list after the email was "
                            f"accepted", pending,
                       facts=AttemptFacts(attributes={REASON_CODE_ATTRIBUTE: SUPPRESSED_REASON_CODE,
                                                      "suppressed_recipients": ", ".join(addresses)}))
            WITHHELD.labels(job.message_class, "suppressed").inc()

    # -- step 3 --------------------------------------------------------------------------------------------------
    async def _place(self, chains: dict[Job, list[str]],
                     pending: Outbox) -> tuple[list[Call], list[Job]]:
        position = dict.fromkeys(chains, 0)
        calls: list[Call] = []
        unplaced: list[Job] = []
        while position:
            by_provider: dict[str, list[Job]] = {}
            for job in list(position):
                index = self._next_usable(job, chains[job], position[job], pending)
                if index is None:
                    del position[job]
                    if job.verdict is None:
                        unplaced.append(job)
                    continue
                position[job] = index
                by_provider.setdefault(chains[job][index], []).append(job)
            proposed = [(pid, group) for pid, jobs in by_provider.items() for group in self._split(pid, jobs)]
            if not proposed:
                break
            permits = await self.health.acquire_many([
                (pid, _limits(self.catalog.providers[pid]), len(group),
                 group[0].message_class.policy.routing.max_rate_wait_s) for pid, group in proposed])
            for (pid, group), permit in zip(proposed, permits, strict=True):
                granted, refused = group[:permit.granted], group[permit.granted:]
                if granted:
                    calls.append(Call(pid, granted, permit))
                    for job in granted:
                        del position[job]
                for job in refused:
                    job.tried.add(pid)
                    job.last_refusal = f"{pid}: {(permit.refusal or Refusal.QUOTA).value}"
                    if permit.refusal is Refusal.RATE and pid in job.costs:
                        cost = job.costs[pid]
                        if job.rate_refused_cost is None or cost < job.rate_refused_cost:
                            job.rate_refused_cost, job.rate_refused_by = cost, pid
                    job.hint(permit.wait_s)
                    position[job] += 1
        return calls, unplaced

    def _next_usable(self, job: Job, chain: list[str], start: int, pending: Outbox) -> int | None:
        """The first provider from ``start`` on whose adapter accepts the email (None: none does)."""
        for index in range(start, len(chain)):
            provider_id = chain[index]
            if provider_id not in self.catalog.providers:
                continue
            if waits_for_cheaper(job.message_class.policy.routing, job.rate_refused_cost,
                                 job.costs.get(provider_id, 0.0)):
                job.waiting_for = job.rate_refused_by
                return None
            problem = self._unfit(job, provider_id)
            if problem is None:
                return index
            if isinstance(problem, InvalidMessage):
                self._fail(job, f"cannot be sent: {problem}", pending)
                return None
            job.tried.add(provider_id)
            job.last_refusal = f"{provider_id}: {problem}"
        return None

    def _unfit(self, job: Job, provider_id: str) -> Exception | None:
        """Why the provider's adapter would refuse the email before any network call, if it would: its
        ``precheck`` at the size ingest measured, so no email's MIME is built just to learn its size."""
        try:
            adapter = self.adapters.get(provider_id)
        except (KeyError, AdapterConfigError) as exc:
            return exc
        if job.email is None:
            return None
        return adapter.precheck(job.email, job.size)

    def _split(self, provider_id: str, jobs: list[Job]) -> list[list[Job]]:
        """Calls for the emails going to one provider: batch calls where the class and the provider allow, within
        the provider's batch limits and its registry entry's ``batch_size``."""
        if len(jobs) == 1 or not jobs[0].policy.batch_calls:
            return [[job] for job in jobs]
        emails: list[OutboundEmail] = []
        for job in jobs:
            assert job.email is not None  # placed emails were built in step 1
            emails.append(job.email)
        plan = self.adapters.get(provider_id).plan_batches(
            emails, [job.size for job in jobs], max_emails=self.catalog.providers[provider_id].batch_size)
        return [[jobs[index] for index in call] for call in plan]

    # -- step 4 --------------------------------------------------------------------------------------------------
    async def _perform(self, call: Call, pending: Outbox) -> None:
        now = time.perf_counter()
        for job in call.jobs:
            job.calls += 1
            if job.failed_at is not None:
                FALLBACK_DECISION.observe(now - job.failed_at)
                job.failed_at = None
        if call.permit.wait_s > 0:
            await asyncio.sleep(call.permit.wait_s)  # the rate slot booked for this call
        # The last look before the provider has the emails: a campaign halted since the round began (during the
        # rate wait, say) must not reach it either. Each email of a batch call on its own; the others go on.
        going = [job for job in call.jobs if not self._halted(job, pending)]
        if len(going) < len(call.jobs):
            call.withheld += len(call.jobs) - len(going)
            call.jobs = going
            if not going:
                call.reached_provider = False
                return
        emails = [job.email for job in call.jobs if job.email is not None]
        first_span = call.jobs[0].span
        try:
            adapter: ProviderAdapter = self.adapters.get(call.provider_id)
            # The HTTP call's client span is a child of the (first) email's delivery span.
            with otel_trace.use_span(first_span, end_on_exit=False) if first_span else contextlib.nullcontext():
                if len(emails) == 1:
                    call.results = [await adapter.send(emails[0])]
                else:
                    call.results = list(await adapter.send_batch(emails))
        except (KeyError, ProviderError) as exc:
            # The provider went away or the email stopped fitting it between placement and the call.
            call.reached_provider = False
            call.results = [SendResult(Outcome.PERMANENT, reason=f"not sent: {exc}", provider_fault=True)] * len(
                emails)
        except Exception as exc:  # an adapter bug must not lose the email: retry elsewhere
            log.exception("provider adapter %s failed", call.provider_id)
            call.results = [SendResult(Outcome.RETRYABLE, reason=f"adapter error: {type(exc).__name__}",
                                       provider_fault=True)] * len(emails)
        if call.reached_provider and call.results and call.results[0].elapsed_s is not None:
            CALL_SECONDS.labels(call.provider_id).observe(call.results[0].elapsed_s)

    # -- step 5 --------------------------------------------------------------------------------------------------
    async def _record(self, calls: list[Call]) -> None:
        await self.health.record_many([
            recorded_call(call.provider_id, call.results, emails=len(call.jobs), probe=call.permit.probe,
                          reached_provider=call.reached_provider, withheld=call.withheld)
            for call in calls])
        attempts = Tally((call.provider_id, result.outcome.value) for call in calls for result in call.results)
        for labels, count in attempts.items():
            ATTEMPTS.labels(*labels).inc(count)
        for call in calls:
            for job, result in zip(call.jobs, call.results, strict=True):
                if sent(job.policy, result):
                    job.state.sent = SentMarker(call.provider_id, result.provider_message_id or "",
                                                ambiguous=result.outcome is Outcome.AMBIGUOUS,
                                                refused=dict(result.refused_recipients))
                    job.marked = True
                    for algorithm in result.dkim_algorithms:
                        DKIM_SIGNED.labels(algorithm).inc()

    # -- step 6 --------------------------------------------------------------------------------------------------
    def _conclude(self, job: Job, call: Call, result: SendResult, pending: Outbox) -> bool:
        """Settle the email after its call; True when it should try another provider in this delivery."""
        job.dirty = True
        job.state.attempts += 1
        facts = AttemptFacts(provider=call.provider_id, provider_message_id=result.provider_message_id or "",
                             attempt=job.state.attempts, outcome=result.outcome,
                             latency_ms=(result.elapsed_s or 0.0) * 1000)
        policy = job.policy
        if job.state.sent is not None:  # accepted, or ambiguous and the class does not resend blindly
            ambiguous = result.outcome is Outcome.AMBIGUOUS
            if job.task.HasField("accepted_time") and job.task.accepted_time.seconds:  # the OTP latency objective
                ACCEPT_TO_SENT.labels(job.message_class).observe(max(0.0, _age_s(job.task)))
            if ambiguous:
                facts = AttemptFacts(facts.provider, facts.provider_message_id, facts.attempt, facts.outcome,
                                     facts.latency_ms, {"ambiguous": "true"})
            self._sent(job, facts, pending, reason=result.reason if ambiguous else "")
            self._refused(job, facts, result.refused_recipients, pending)
            return False
        verdict = after_attempt(policy, result, failures=job.state.failures, calls=job.calls,
                                probe=call.permit.probe, reached_provider=call.reached_provider)
        if verdict.next is Next.REJECTED:
            self._fail(job, f"rejected by {call.provider_id}: {result.reason}", pending, facts=facts)
            return False
        pending.append(EventIntent(
            job.task, messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED,
            event_id=f"{job.message_id}:a:{job.state.attempts}", reason=result.reason, facts=facts))
        job.tried.add(call.provider_id)
        job.hint(verdict.wait_hint_s)
        if verdict.failure:
            job.state.excluded.add(call.provider_id)
            job.state.failures += 1
            job.failed_at = time.perf_counter()
        if verdict.next is Next.GIVE_UP:
            self._fail(job, f"gave up after {job.state.failures} failed attempts; last: "
                            f"{call.provider_id}: {result.reason}", pending, dead_letter=True)
            return False
        if verdict.next is Next.OTHER_PROVIDER_NOW:
            return True
        self._later(job, verdict.delay_s, f"{call.provider_id}: {result.reason}", pending)
        return False

    # -- step 7 --------------------------------------------------------------------------------------------------
    async def _commit(self, jobs: list[Job], pending: Outbox) -> None:
        """Write every email's memory and give back its lease, then publish the delivery's events durably."""
        # The memory first (sent markers included), then the events: a crash in between re-announces, never
        # resends. Only once the events are durable does the pool ack.
        changes = [self._change(job) for job in jobs if job.dirty]
        await self.states.commit(changes, [j.message_id for j in jobs if j.state.leased], self.owner)
        # An event's parent is the email's delivery span when there is one (tracing on), else the trace it was
        # queued with, passed on unchanged.
        trace = {job.message_id: span_headers(job.span) if job.span is not None else job.incoming.trace
                 for job in jobs}
        staged: list[asyncio.Future[None]] = [
            await self.events.stage(e.task, e.event_type, event_id=e.event_id, final=e.final, reason=e.reason,
                                    facts=e.facts, recipient=e.recipient, trace=trace.get(e.task.message_id))
            for e in pending]
        parks = [(job, await self._park(job)) for job in jobs if job.parked]
        try:
            await self.events.flush(staged)
        except BaseException:
            self.events.publisher.forget([ack for _, ack in parks if ack is not None])
            raise
        await self._parked(parks)

    async def _park(self, job: Job) -> asyncio.Future[None] | None:
        """Publish the email, as it was queued, to its paused campaign's held subject (the ack awaited in
        ``_parked``); None when it could not even be sent."""
        incoming = job.incoming
        payload = incoming.payload or incoming.task.SerializeToString()
        msg_id = held_msg_id(job.message_id, incoming.sequence or incoming.delivery)
        try:
            return await self.events.publisher.publish(self.events.topology.held_subject(job.task.campaign_id),
                                                       payload, msg_id, dict(incoming.trace) or None)
        except Exception:
            log.warning("could not park an email of paused campaign %s", job.task.campaign_id, exc_info=True)
            return None

    async def _parked(self, parks: list[tuple[Job, asyncio.Future[None] | None]]) -> None:
        """Wait for the held stream to store the parked emails; one it did not is not acked but offered again
        (at least once: a parked email is only acked once its park is durable)."""
        acks = [ack for _, ack in parks if ack is not None]
        if not acks:
            outcomes: list[BaseException | None] = []
        else:
            try:
                outcomes = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True),
                                                  self.events.timeout_s)
            except TimeoutError:
                self.events.publisher.forget(acks)
                outcomes = [TimeoutError()] * len(acks)
        durable = iter(outcomes)
        for job, ack in parks:
            problem = next(durable) if ack is not None else RuntimeError("not published")
            if problem is not None:
                log.warning("the held stream did not take an email of paused campaign %s: %s; it will be offered "
                            "again", job.task.campaign_id, problem)
                job.verdict = Verdict(ack=False, retry_in_s=PARK_RETRY_S)

    # -- when no provider can take the email now -------------------------------------------------------------------
    def _unroutable(self, job: Job, decision: RouteDecision, pending: Outbox) -> None:
        reasons = "; ".join(f"{s.provider_id}: {s.excluded_reason}" for s in decision.excluded)
        policy = job.policy
        why = unroutable(decision, job.state.excluded)
        if why is Unroutable.NO_CARRIER:
            ready = any(s.excluded_reason.startswith(NOT_READY) for s in decision.excluded)
            what = f"no provider carries {job.message_class}" + (" and is ready for its From domain" if ready else "")
            self._later(job, policy.max_delay_s, f"{what} ({reasons or 'no providers configured'})", pending)
        elif why is Unroutable.TOO_LARGE:
            self._fail(job, f"no provider takes a message of {job.task.message_bytes} bytes ({reasons})", pending)
        elif why is Unroutable.ALL_FAILED:
            # Every usable provider failed it once: the next round starts over with all of them, after backoff.
            job.state.excluded.clear()
            job.dirty = True
            delay = backoff_s(policy, max(1, job.state.failures))
            self._later(job, max(delay, job.wait_hint_s or 0.0), f"every provider failed it ({reasons})", pending)
        else:
            self._unavailable(job, pending, reasons)

    def _wait_for_cheaper(self, job: Job, pending: Outbox) -> None:
        """A cheap provider refused the email for its rate budget and the next one costs several times more: the
        email waits in the queue for the cheap one. One DEFERRED event however often it waits (the same event id)."""
        delay = max(unavailable_delay_s(job.policy, job.message_class, self.catalog.providers.values(),
                                        self.health.snapshots, job.wait_hint_s),
                    paced_delay_s(job.policy, job.incoming.delivery))
        self._later(job, delay, f"waiting for {job.waiting_for}'s rate budget rather than a provider more than "
                                f"{job.message_class.policy.routing.pace_cost_ratio:g} times dearer", pending,
                    event_id=f"{job.message_id}:paced")

    def _unavailable(self, job: Job, pending: Outbox, reasons: str = "") -> None:
        """Every provider refused for now (breaker, Retry-After, quota, rate): wait for the soonest to free up."""
        delay = unavailable_delay_s(job.policy, job.message_class, self.catalog.providers.values(),
                                    self.health.snapshots, job.wait_hint_s)
        self._later(job, delay, f"no provider available now ({reasons or job.last_refusal})", pending)

    # -- outcomes ------------------------------------------------------------------------------------------------
    def _sent(self, job: Job, facts: AttemptFacts, pending: Outbox, *, reason: str = "") -> None:
        spec = self.catalog.providers.get(facts.provider)
        if spec is not None:  # the price when the email was sent: analytics' provider cost
            facts = replace(facts, provider_cost_micros=round(spec.price_micros(job.task.message_bytes)))
        pending.append(EventIntent(
            job.task, messages_pb2.MESSAGE_EVENT_TYPE_SENT, event_id=f"{job.message_id}:sent", final=True,
            reason=reason, facts=facts))
        job.verdict = ACK

    @staticmethod
    def _refused(job: Job, sent: AttemptFacts, refused: Mapping[str, str], pending: Outbox) -> None:
        """One REJECTED event per recipient the provider refused while it took the email for the others: the email
        is SENT, to everyone but them. Not final (the email's outcome is its SENT, which settles its credits) and
        never retried: sending again would repeat the email to the recipients who have it."""
        for recipient, reason in refused.items():
            pending.append(EventIntent(
                job.task, messages_pb2.MESSAGE_EVENT_TYPE_REJECTED,
                event_id=f"{job.message_id}:rejected:{recipient.lower()}", reason=reason, recipient=recipient,
                facts=AttemptFacts(provider=sent.provider, provider_message_id=sent.provider_message_id,
                                   attempt=sent.attempt,
                                   attributes={REASON_CODE_ATTRIBUTE: RECIPIENT_REFUSED_REASON_CODE})))

    def _fail(self, job: Job, reason: str, pending: Outbox, *, dead_letter: bool = False,
              facts: AttemptFacts | None = None) -> None:
        if dead_letter:
            pending.append(EventIntent(
                job.task, messages_pb2.MESSAGE_EVENT_TYPE_DEAD_LETTERED, event_id=f"{job.message_id}:dead",
                reason=reason))
        pending.append(EventIntent(
            job.task, messages_pb2.MESSAGE_EVENT_TYPE_FAILED, event_id=f"{job.message_id}:failed", final=True,
            reason=reason, facts=facts or AttemptFacts()))
        job.verdict = ACK

    def _later(self, job: Job, delay_s: float, reason: str, pending: Outbox, *, event_id: str = "") -> None:
        delay_s = max(MIN_RETRY_S, delay_s)
        pending.append(EventIntent(
            job.task, messages_pb2.MESSAGE_EVENT_TYPE_DEFERRED,
            event_id=event_id or f"{job.message_id}:d:{job.incoming.delivery}",
            reason=f"retry in {delay_s:.1f}s: {reason}",
            facts=AttemptFacts(attempt=job.state.attempts)))
        job.verdict = Verdict(ack=False, retry_in_s=delay_s)

    @staticmethod
    def _change(job: Job) -> StateChange:
        return StateChange(job.message_id, sent=job.state.sent if job.marked else None,
                           excluded=frozenset(job.state.excluded), failures=job.state.failures,
                           attempts=job.state.attempts)


def _limits(spec: ProviderSpec) -> ProviderLimits:
    return ProviderLimits(spec.rate_limit_per_second, spec.daily_quota, spec.monthly_quota)


def _class_of(task: queue_pb2.SendTask) -> MessageClass:
    """The task's class; one without a known class is treated as transactional."""
    try:
        return MessageClass.from_proto(task.message_class)
    except ValueError:
        return MessageClass.TRANSACTIONAL


def _recipients(task: queue_pb2.SendTask) -> list[str]:
    return [a.email for addresses in (task.to, task.cc, task.bcc) for a in addresses]


def _age_s(task: queue_pb2.SendTask) -> float:
    """Seconds since the email was accepted; a scheduled email's task carries its send time as ``accepted_time``
    (``services.ingest.payloads.queued_task``), so its useful life counts from then."""
    if not task.HasField("accepted_time") or task.accepted_time.seconds == 0:
        return 0.0
    accepted_at: float = task.accepted_time.seconds + task.accepted_time.nanos / 1e9
    return time.time() - accepted_at


async def _beat(heartbeats: list[Callable[[], Awaitable[None]]], every_s: float) -> None:
    """Tell JetStream the emails are still being worked on (slow sends of large attachments, rate waits)."""
    while True:
        await asyncio.sleep(every_s)
        for heartbeat in heartbeats:
            try:
                await heartbeat()
            except Exception:
                log.debug("in-progress ack failed", exc_info=True)
