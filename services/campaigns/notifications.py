"""What a campaign tells its customer: ``esp.internal.v1.AccountEvent`` kinds ``campaign_paused`` and
``campaign_completed`` on the tenant's account subject (the webhook dispatcher delivers them as ``campaign.paused``
and ``campaign.completed``, ``libs.common.event_types``).

Each event is written to the campaigns outbox in the transaction of the transition it reports, and published after
the commit (at least once): a transition rolled back leaves no event, a crash after the commit leaves the row for
the outbox's reconciling pass. Its id — the ``Nats-Msg-Id`` too — is stable for the transition: a pause is
``campaign-<id>-paused-<n>`` (``n``: the campaign's ``pauses`` count after it), a completion
``campaign-<id>-completed`` (a campaign completes once), so a re-publish is dropped by JetStream's duplicate window.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from esp.internal.v1 import queue_pb2
from psycopg import AsyncConnection

from libs.common.jetstream import Topology
from libs.common.outbox import CommittedRow, OutboxRow
from libs.common.timestamps import to_timestamp
from services.campaigns.model import PauseReason

__all__ = ["CAMPAIGN_COMPLETED", "CAMPAIGN_PAUSED", "completed_event", "paused_event", "queue_event"]

CAMPAIGN_PAUSED = "campaign_paused"
CAMPAIGN_COMPLETED = "campaign_completed"


def _event(topology: Topology, tenant_id: str, event_id: str, kind: str, attributes: Mapping[str, str],
           at: datetime | None) -> OutboxRow:
    event = queue_pb2.AccountEvent(event_id=event_id, tenant_id=tenant_id, kind=kind, attributes=attributes,
                                   event_time=to_timestamp(at or datetime.now(UTC)))
    return OutboxRow(topology.account_subject(tenant_id), event_id, event.SerializeToString())


def paused_event(topology: Topology, tenant_id: str, campaign_id: str, reason: PauseReason, pauses: int, *,
                 at: datetime | None = None) -> OutboxRow:
    """The ``campaign_paused`` event of the campaign's ``pauses``-th pause (reason: ``BY_CUSTOMER``,
    ``INSUFFICIENT_CREDITS`` or ``SEND_WINDOW_CLOSED``, as ``Campaign.pause_reason`` names it)."""
    return _event(topology, tenant_id, f"campaign-{campaign_id}-paused-{pauses}", CAMPAIGN_PAUSED,
                  {"campaign": f"campaigns/{campaign_id}", "reason": reason.value.upper()}, at)


def completed_event(topology: Topology, tenant_id: str, campaign_id: str, counts: Mapping[str, int], *,
                    at: datetime | None = None) -> OutboxRow:
    """The ``campaign_completed`` event, with the campaign's final ``counts`` (sent, failed ...) as attributes."""
    return _event(topology, tenant_id, f"campaign-{campaign_id}-completed", CAMPAIGN_COMPLETED,
                  {"campaign": f"campaigns/{campaign_id}", **{name: str(n) for name, n in counts.items()}}, at)


async def queue_event(conn: AsyncConnection[Any], row: OutboxRow) -> CommittedRow:
    """Write ``row`` to the campaigns outbox in the caller's transaction; hand the result to the outbox publisher's
    ``publish_soon`` once that transaction committed."""
    cur = await conn.execute("INSERT INTO campaigns.outbox (subject, msg_id, payload) VALUES (%s, %s, %s) RETURNING id",
                             (row.subject, row.msg_id, row.payload))
    inserted = await cur.fetchone()
    assert inserted is not None
    return CommittedRow(inserted[0], row)
