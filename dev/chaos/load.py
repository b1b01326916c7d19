"""The mixed load a chaos run drives through the mesh, and what each client was told.

Every email carries its phase and a key of its own in its metadata, so the history checker can find it on the
server side whatever the client heard. Clients behave as the API asks them to: a request with a ``request_id`` is
retried on UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED with backoff (AIP-155 makes that safe); one
without is not retried, and an error that leaves it unknown whether the mesh took it is recorded as ``unknown``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    campaigns_pb2,
    campaigns_pb2_grpc,
    common_pb2,
    messages_pb2,
    messages_pb2_grpc,
)
from google.protobuf.timestamp_pb2 import Timestamp

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
#: Codes after which the client cannot know whether the mesh took the request.
AMBIGUOUS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CLASSES = {"otp": common_pb2.MESSAGE_CLASS_OTP, "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
           "bulk": common_pb2.MESSAGE_CLASS_BULK}
CLASS_MIX = (("otp", 0.2), ("transactional", 0.4), ("bulk", 0.4))
RETRY_FOR_S = 60.0
CALL_TIMEOUT_S = 10.0
CANCEL_SHARE = 0.03
"""Share of bulk emails scheduled a few seconds ahead and then cancelled."""
REST_SHARE = 0.1
ATTACHMENT_SHARE = 0.1
REQUEST_ID_SHARE = 0.5


@dataclass
class ClientRecord:
    """One email as its client saw it."""

    key: str
    phase: str
    message_class: str
    via: str
    request_id: str
    outcome: str = "pending"
    """accepted | refused | unknown."""
    message_id: str = ""
    code: str = ""
    """The last status the client got (gRPC code name, or HTTP status for REST)."""
    attempts: int = 0
    sent_at: float = 0.0
    told_at: float = 0.0
    cancel: str = ""
    """For emails the client cancels: acknowledged (answered CANCELLED) | requested:<state> (queued already: it is
    dropped unless a provider call is under way) | refused:<code>."""
    cancel_acked_at: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class CampaignRecord:
    """A phase's campaign: its recipients are sent over several seconds, across the phase's faults."""

    phase: str
    name: str
    recipients: int
    key: str


@dataclass
class LoadGenerator:
    """Sends ``rate`` emails per second while running; keeps a ClientRecord per email."""

    endpoint: str
    gateway_url: str
    api_key: str
    rate: float
    seed: int = 1
    records: list[ClientRecord] = field(default_factory=list)
    campaigns: list[CampaignRecord] = field(default_factory=list)
    concurrency: int = 64
    _rng: random.Random = field(init=False)
    _channel: grpc.aio.Channel | None = None
    _http: httpx.AsyncClient | None = None
    _attachment_ids: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _counter: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    async def __aenter__(self) -> LoadGenerator:
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        self._http = httpx.AsyncClient(base_url=self.gateway_url, timeout=CALL_TIMEOUT_S,
                                       headers={"authorization": f"Bearer {self.api_key}"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.settle()
        if self._channel is not None:
            await self._channel.close()
        if self._http is not None:
            await self._http.aclose()

    async def upload_attachment(self, phase: str) -> None:
        """One small attachment for this phase's emails to reference (retried while the mesh recovers)."""
        assert self._channel is not None
        stub = attachments_pb2_grpc.AttachmentServiceStub(self._channel)
        content = f"chaos attachment of {phase}\n".encode() * 64

        def frames() -> Any:
            yield attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
                filename=f"{phase}.txt", content_type="text/plain", size_bytes=len(content),
                request_id=f"chaos-attachment-{phase}"))
            yield attachments_pb2.UploadAttachmentRequest(chunk=content)

        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                reply = await stub.UploadAttachment(frames(), metadata=self.metadata, timeout=CALL_TIMEOUT_S)
                self._attachment_ids = [reply.id]
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def start_campaign(self, phase: str, recipients: int, send_rate: float) -> CampaignRecord:
        """A bulk campaign to ``recipients`` addresses at ``send_rate`` emails/s, created, filled and started
        (each call retried while the mesh recovers: creation and start carry request ids)."""
        assert self._channel is not None
        stub = campaigns_pb2_grpc.CampaignServiceStub(self._channel)
        key = f"{phase}-campaign"
        campaign = campaigns_pb2.Campaign(
            display_name=key, subject="chaos campaign {{ n }}", text_body="Hello {{ n }}", tags=["chaos"],
            message_class=common_pb2.MESSAGE_CLASS_BULK, send_rate=send_rate,
            metadata={"chaos_phase": phase, "chaos_key": key})
        getattr(campaign, "from").CopyFrom(common_pb2.EmailAddress(email="news@chaos.example.com"))
        created = await _retrying(lambda: stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(
            request_id=f"chaos-{key}", campaign=campaign), metadata=self.metadata, timeout=CALL_TIMEOUT_S))
        frame = campaigns_pb2.AddCampaignRecipientsRequest(campaign=created.name, recipients=[
            campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email=f"{key}-{i}@example.org"),
                                            variables={"n": str(i)}) for i in range(recipients)])
        added = await _retrying(lambda: stub.AddCampaignRecipients(iter([frame]), metadata=self.metadata,
                                                                   timeout=CALL_TIMEOUT_S))
        # A retried frame whose first attempt had landed finds its recipients already there (counted duplicates).
        if added.added_count + added.duplicate_count != recipients:
            raise RuntimeError(f"{key}: {added.added_count} of {recipients} recipients added: {added}")
        await _retrying(lambda: stub.StartCampaign(campaigns_pb2.StartCampaignRequest(
            name=created.name, request_id=f"chaos-start-{key}"), metadata=self.metadata, timeout=CALL_TIMEOUT_S))
        record = CampaignRecord(phase, created.name, recipients, key)
        self.campaigns.append(record)
        return record

    async def run(self, phase: str, duration_s: float) -> None:
        """Start ``rate`` emails per second for ``duration_s`` (each in its own task; ``settle`` waits for them)."""
        semaphore = asyncio.Semaphore(self.concurrency)
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < duration_s:
            due = int(elapsed * self.rate) + 1
            while sent < due:
                sent += 1
                task = asyncio.create_task(self._one(phase, semaphore))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(max(0.0, sent / self.rate - (time.monotonic() - start)))

    async def settle(self) -> None:
        """Wait until every started email has its answer (retries included)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _one(self, phase: str, semaphore: asyncio.Semaphore) -> None:
        self._counter += 1
        rng = self._rng
        draw = rng.random()
        message_class = next((name for name, share in _cumulative(CLASS_MIX) if draw < share), "bulk")
        key = f"{phase}-{self._counter}"
        record = ClientRecord(key=key, phase=phase, message_class=message_class,
                              via="rest" if rng.random() < REST_SHARE else "grpc",
                              request_id=f"chaos-{key}" if rng.random() < REQUEST_ID_SHARE else "")
        cancel = message_class == "bulk" and record.via == "grpc" and rng.random() < CANCEL_SHARE
        attach = bool(self._attachment_ids) and message_class == "transactional" and rng.random() < ATTACHMENT_SHARE
        self.records.append(record)
        request = messages_pb2.SendEmailRequest(
            request_id=record.request_id, message_class=CLASSES[message_class],
            to=[common_pb2.EmailAddress(email=f"rcpt-{self._counter}@example.net")],
            subject=f"chaos {key}", text_body=f"chaos load, email {key}",
            metadata={"chaos_phase": phase, "chaos_key": key}, tags=["chaos"],
            attachment_ids=self._attachment_ids if attach else [],
            **{"from": common_pb2.EmailAddress(email="load@chaos.example.com")})
        if cancel:
            request.send_time.CopyFrom(_timestamp(time.time() + 4))
        async with semaphore:
            record.sent_at = time.time()
            if record.via == "rest":
                await self._send_rest(record, request)
            else:
                await self._send_grpc(record, request)
            record.told_at = time.time()
        if cancel and record.outcome == "accepted":
            await asyncio.sleep(1.0)
            await self._cancel(record)

    async def _send_grpc(self, record: ClientRecord, request: messages_pb2.SendEmailRequest) -> None:
        assert self._channel is not None
        stub = messages_pb2_grpc.MessageServiceStub(self._channel)
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.2
        while True:
            record.attempts += 1
            try:
                reply = await stub.SendEmail(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                record.code = code.name
                record.errors.append(f"{code.name}: {exc.details()}")
                if record.request_id and code in RETRYABLE and time.monotonic() < deadline:
                    await asyncio.sleep(delay * self._rng.uniform(0.5, 1.5))
                    delay = min(2.0, delay * 2)
                    continue
                record.outcome = "unknown" if code in AMBIGUOUS else "refused"
                return
            record.outcome, record.message_id, record.code = "accepted", reply.message.id, "OK"
            return

    async def _send_rest(self, record: ClientRecord, request: messages_pb2.SendEmailRequest) -> None:
        assert self._http is not None
        body: dict[str, Any] = {
            "messageClass": common_pb2.MessageClass.Name(request.message_class),
            "from": {"email": getattr(request, "from").email}, "to": [{"email": request.to[0].email}],
            "subject": request.subject, "textBody": request.text_body, "metadata": dict(request.metadata),
            "tags": list(request.tags), "attachmentIds": list(request.attachment_ids)}
        if request.request_id:
            body["requestId"] = request.request_id
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.2
        while True:
            record.attempts += 1
            try:
                response = await self._http.post("/v1/messages:send", json=body)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = 0
                record.errors.append(f"transport: {exc!r}")
            record.code = str(status)
            if status == 200:
                record.outcome, record.message_id = "accepted", str(response.json()["message"]["id"])
                return
            if status:
                record.errors.append(f"{status}: {response.text[:200]}")
            retryable = status in (0, 429, 502, 503, 504)
            if record.request_id and retryable and time.monotonic() < deadline:
                await asyncio.sleep(delay * self._rng.uniform(0.5, 1.5))
                delay = min(2.0, delay * 2)
                continue
            record.outcome = "unknown" if status in (0, 500, 502, 503, 504) else "refused"
            return

    async def _cancel(self, record: ClientRecord) -> None:
        assert self._channel is not None
        stub = messages_pb2_grpc.MessageServiceStub(self._channel)
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                answer = await stub.CancelMessage(
                    messages_pb2.CancelMessageRequest(name=f"messages/{record.message_id}"), metadata=self.metadata,
                    timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                # Cancelling twice is harmless, so every failure that may be passing is retried.
                if exc.code() in RETRYABLE and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                record.cancel = f"refused:{exc.code().name}"
                return
            # CANCELLED is the promise; another state means the email was already queued: senders drop it unless a
            # provider call for it is under way (services/ingest/cancel.py), and its final state tells which.
            if answer.state == messages_pb2.MESSAGE_STATE_CANCELLED:
                record.cancel, record.cancel_acked_at = "acknowledged", time.time()
            else:
                record.cancel = f"requested:{messages_pb2.MessageState.Name(answer.state)}"
            return


async def probe_recovery(endpoint: str, api_key: str, start: float | None = None, timeout_s: float = 180.0) -> float:
    """Seconds from ``start`` (``time.monotonic()``; default now) until the mesh accepts a transactional email again
    and a provider has taken it."""
    start = time.monotonic() if start is None else start
    metadata = (("authorization", f"Bearer {api_key}"),)
    request = messages_pb2.SendEmailRequest(
        request_id=f"chaos-probe-{time.time_ns()}", message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        to=[common_pb2.EmailAddress(email="probe@example.net")], subject="chaos probe", text_body="probe",
        metadata={"chaos_phase": "probe"}, **{"from": common_pb2.EmailAddress(email="probe@chaos.example.com")})
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        message_id = ""
        while time.monotonic() - start < timeout_s:
            try:
                if not message_id:
                    message_id = (await stub.SendEmail(request, metadata=metadata, timeout=5)).message.id
                state = (await stub.GetMessage(messages_pb2.GetMessageRequest(name=f"messages/{message_id}"),
                                               metadata=metadata, timeout=5)).state
                if state in (messages_pb2.MESSAGE_STATE_SENT, messages_pb2.MESSAGE_STATE_DELIVERED):
                    return time.monotonic() - start
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the mesh did not recover within {timeout_s:.0f}s")


async def _retrying(call: Any) -> Any:
    """``call()`` until it answers, retrying statuses that may pass, for up to ``RETRY_FOR_S``."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _cumulative(mix: tuple[tuple[str, float], ...]) -> list[tuple[str, float]]:
    total, out = 0.0, []
    for name, share in mix:
        total += share
        out.append((name, total))
    return out


def _timestamp(epoch_s: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(epoch_s * 1e9))
    return stamp
