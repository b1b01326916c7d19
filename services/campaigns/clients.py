"""The campaigns service's clients of other services: the ledger (credit holds) and reports (a campaign's counts)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from esp.v1 import credits_pb2, credits_pb2_grpc, reports_pb2, reports_pb2_grpc

from libs.common.auth import Principal
from libs.common.errors import error_from_parts
from libs.common.grpc_client import domain_errors
from libs.common.message_classes import MessageClass

__all__ = ["CampaignStats", "LedgerHolds", "ReportsStats"]

RESERVES_PER_CALL = 500
"""Holds per BatchReserveCredits call (the ledger's group-commit batch)."""


class LedgerHolds:
    """Credit holds for a chunk of campaign emails, one hold per email (its id is the message id, so a chunk
    replayed after a crash re-uses its holds: reserving an id again is a no-op)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 10.0) -> None:
        self.stub = credits_pb2_grpc.CreditServiceStub(channel)
        self.timeout_s = timeout_s

    async def reserve(self, tenant_id: str, message_class: MessageClass, holds: Sequence[tuple[str, int]],
                      ttl_s: int) -> list[int | Exception]:
        """Hold credits for each (hold id, attachment bytes): its amount, or the error that refused it."""
        async def reserve_slice(start: int) -> list[int | Exception]:
            requests = [credits_pb2.ReserveCreditsRequest(
                tenant=f"tenants/{tenant_id}", hold_id=hold_id, message_class=message_class.proto, email_count=1,
                attachment_bytes=attachment_bytes, ttl_seconds=ttl_s)
                for hold_id, attachment_bytes in holds[start:start + RESERVES_PER_CALL]]
            async with domain_errors():
                reply = await self.stub.BatchReserveCredits(
                    credits_pb2.BatchReserveCreditsRequest(requests=requests), timeout=self.timeout_s)
            results: list[int | Exception] = []
            for result in reply.results:
                if result.HasField("hold"):
                    results.append(result.hold.amount)
                else:
                    e = result.error
                    results.append(error_from_parts(e.code, e.message, e.reason, dict(e.metadata), list(e.fields)))
            return results

        # The slices go at once (the ledger group-commits them); when credits run out mid-way a later slice may be
        # held while an earlier one was refused: the caller keeps the prefix before the first refusal.
        slices = await asyncio.gather(*(reserve_slice(s) for s in range(0, len(holds), RESERVES_PER_CALL)))
        return [result for results in slices for result in results]

    async def release(self, hold_id: str, reason: str) -> None:
        """Give a hold's credits back (an email that will not be queued after all)."""
        async with domain_errors():
            await self.stub.ReleaseHold(credits_pb2.ReleaseHoldRequest(name=f"holds/{hold_id}", reason=reason),
                                        timeout=self.timeout_s)

    async def available(self, tenant_id: str) -> int:
        """The tenant's spendable credits."""
        async with domain_errors():
            balance = await self.stub.GetBalance(credits_pb2.GetBalanceRequest(tenant=f"tenants/{tenant_id}"),
                                                 metadata=_as_tenant(tenant_id), timeout=self.timeout_s)
        return int(balance.available)


@dataclass(frozen=True)
class CampaignStats:
    """A campaign's message counts as reports recorded them (each event once)."""

    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    complained: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def final(self) -> int:
        """Emails that reached a final outcome: handed to a provider, failed for good, or dropped."""
        return self.sent + self.failed + self.cancelled


def _as_tenant(tenant_id: str) -> tuple[tuple[str, str], ...]:
    return Principal(tenant_id=tenant_id, scopes=frozenset({"read"})).as_metadata()


class ReportsStats:
    """A campaign's counts from reports' stats rollups (cheap: no scan of its messages)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 5.0) -> None:
        self.stub = reports_pb2_grpc.StatsServiceStub(channel)
        self.timeout_s = timeout_s

    async def of_campaign(self, tenant_id: str, campaign_id: str) -> CampaignStats:
        """Every count of ``campaign_id`` since it was created."""
        async with domain_errors():
            reply = await self.stub.GetStats(reports_pb2.GetStatsRequest(campaign=f"campaigns/{campaign_id}"),
                                             metadata=_as_tenant(tenant_id), timeout=self.timeout_s)
        t = reply.total
        return CampaignStats(sent=t.sent, delivered=t.delivered, bounced=t.bounced, complained=t.complained,
                             failed=t.failed, cancelled=t.cancelled)
