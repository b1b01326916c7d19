"""Ingest's clients of other services: the ledger (credit holds) and reports (a message's state, for CancelMessage)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from esp.v1 import credits_pb2, credits_pb2_grpc, messages_pb2, messages_pb2_grpc

from libs.common.auth import Principal
from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.errors import NotFound, error_from_parts
from libs.common.grpc_client import domain_errors
from libs.common.message_classes import MessageClass
from libs.common.telemetry import inject_headers
from services.ingest.model import URGENT_CLASSES, HoldRequest

_URGENT_PROTOS = frozenset(MessageClass(name).proto for name in URGENT_CLASSES)
"""The ``esp.v1.MessageClass`` values whose reserves take the batcher's urgent lane."""


class LedgerCreditReserver:
    """Reserves holds through the ledger; concurrent reserves coalesce into BatchReserveCredits calls, because
    one RPC per email would cap ingest at the RPC rate instead of the ledger's group-commit rate."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 5.0, max_batch: int = 500,
                 batch_interval_s: float = 0.0) -> None:
        self.stub = credits_pb2_grpc.CreditServiceStub(channel)
        self.timeout_s = timeout_s
        self._batcher: GroupCommitter[credits_pb2.ReserveCreditsRequest, int] = GroupCommitter(
            self._flush, BatchingOptions(max_batch_size=max_batch, workers=2, shards=1,
                                         min_interval_s=batch_interval_s),
            urgent=lambda request: request.message_class in _URGENT_PROTOS, name="ingest-ledger")

    async def _flush(self, batch: Sequence[credits_pb2.ReserveCreditsRequest]) -> list[int | Exception]:
        async with domain_errors():
            # Runs in the trace context of the batch's first email (the batcher attaches it): the ledger's span
            # joins that email's trace.
            reply = await self.stub.BatchReserveCredits(
                credits_pb2.BatchReserveCreditsRequest(requests=list(batch)), timeout=self.timeout_s,
                metadata=tuple(inject_headers({}).items()))
        results: list[int | Exception] = []
        for result in reply.results:
            if result.HasField("hold"):
                results.append(result.hold.amount)
            else:
                e = result.error
                results.append(error_from_parts(e.code, e.message, e.reason, dict(e.metadata), list(e.fields)))
        return results

    async def reserve_many(self, tenant_id: str, holds: Sequence[HoldRequest]) -> list[int | Exception]:
        """Reserve credits for one email per hold: each one's amount or the error that refused it."""
        return await self._batcher.submit_many([credits_pb2.ReserveCreditsRequest(
            tenant=f"tenants/{tenant_id}", hold_id=hold.hold_id, message_class=MessageClass(hold.message_class).proto,
            email_count=1, attachment_bytes=hold.attachment_bytes, ttl_seconds=hold.ttl_s) for hold in holds])

    async def release(self, hold_id: str, reason: str) -> None:
        """Release a hold at the ledger (the email was refused after its credits were reserved)."""
        async with domain_errors():
            await self.stub.ReleaseHold(credits_pb2.ReleaseHoldRequest(name=f"holds/{hold_id}", reason=reason),
                                        timeout=self.timeout_s, metadata=tuple(inject_headers({}).items()))

    async def close(self) -> None:
        """Flush the reserve calls still waiting and stop batching."""
        await self._batcher.close()



class ReportsMessageStates:
    """A message's state as reports records it from the message's events (ingest keeps no state of its own)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 5.0) -> None:
        self.stub = messages_pb2_grpc.MessageServiceStub(channel)
        self.timeout_s = timeout_s

    async def state(self, tenant_id: str, message_id: str) -> int | None:
        """The message's ``esp.v1.MessageState``; None while reports has not recorded any of its events."""
        # A mesh-internal read on the tenant's behalf: whatever scopes the caller's key holds, ingest may read.
        metadata = Principal(tenant_id, frozenset({"read"})).as_metadata()
        try:
            async with domain_errors():
                message = await self.stub.GetMessage(messages_pb2.GetMessageRequest(name=f"messages/{message_id}"),
                                                     metadata=metadata, timeout=self.timeout_s)
        except NotFound:
            return None
        state: int = message.state
        return state
