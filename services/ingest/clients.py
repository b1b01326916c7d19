"""Ingest's clients of other services: the ledger (credit holds)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from esp.v1 import common_pb2, credits_pb2, credits_pb2_grpc

from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.errors import error_from_parts
from libs.common.grpc_client import domain_errors
from services.ingest.payloads import CLASS_TO_PROTO


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
            urgent=lambda request: request.message_class == common_pb2.MESSAGE_CLASS_OTP, name="ingest-ledger")

    async def _flush(self, batch: Sequence[credits_pb2.ReserveCreditsRequest]) -> list[int | Exception]:
        async with domain_errors():
            reply = await self.stub.BatchReserveCredits(
                credits_pb2.BatchReserveCreditsRequest(requests=list(batch)), timeout=self.timeout_s)
        results: list[int | Exception] = []
        for result in reply.results:
            if result.HasField("hold"):
                results.append(result.hold.amount)
            else:
                e = result.error
                results.append(error_from_parts(e.code, e.message, e.reason, dict(e.metadata), list(e.fields)))
        return results

    async def reserve(self, tenant_id: str, hold_id: str, message_class: str, emails: int,
                      attachment_bytes: int) -> int:
        request = credits_pb2.ReserveCreditsRequest(
            tenant=f"tenants/{tenant_id}", hold_id=hold_id, message_class=CLASS_TO_PROTO[message_class],
            email_count=emails, attachment_bytes=attachment_bytes)
        return await self._batcher.submit(request)

    async def reserve_many(self, tenant_id: str, holds: Sequence[tuple[str, str]]) -> list[int | Exception]:
        """Reserve one email without attachments per (hold id, message class): each one's amount or error."""
        return await self._batcher.submit_many([credits_pb2.ReserveCreditsRequest(
            tenant=f"tenants/{tenant_id}", hold_id=hold_id, message_class=CLASS_TO_PROTO[message_class],
            email_count=1) for hold_id, message_class in holds])

    async def release(self, hold_id: str, reason: str) -> None:
        async with domain_errors():
            await self.stub.ReleaseHold(credits_pb2.ReleaseHoldRequest(name=f"holds/{hold_id}", reason=reason),
                                        timeout=self.timeout_s)

    async def close(self) -> None:
        await self._batcher.close()

