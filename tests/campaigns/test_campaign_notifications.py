"""Campaign notifications reach the tenant's account subject on the EVENTS stream, against the real mesh:
one ``campaign_paused`` per pause (with its reason), one ``campaign_completed`` when the campaign completes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import nats.errors
from esp.internal.v1 import queue_pb2
from esp.v1 import campaigns_pb2

from libs.common.jetstream import Topology, connect
from tests.campaigns.conftest import CampaignMesh, bulk_price, campaign, create_and_fill, progress, wait_until

QUIET_S = 2.0
"""How long to listen for a second event that must not come."""


async def _campaign_events(mesh: CampaignMesh, tenant: str, *, expected: int) -> list[queue_pb2.AccountEvent]:
    """The tenant's campaign_* account events: ``expected`` of them, then none more within QUIET_S."""
    topology = Topology(mesh.config.namespace)
    nc = await connect(mesh.config.nats_url, "campaign-notification-tests")
    try:
        sub = await nc.jetstream().subscribe(topology.account_subject(tenant), stream=topology.events_stream,
                                             ordered_consumer=True)
        found: list[queue_pb2.AccountEvent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(found) < expected and loop.time() < deadline:
            try:
                event = queue_pb2.AccountEvent.FromString((await sub.next_msg(timeout=1)).data)
            except nats.errors.TimeoutError:
                continue
            if event.kind.startswith("campaign_"):  # the ledger's low-balance events share the subject
                found.append(event)
        while True:
            try:
                event = queue_pb2.AccountEvent.FromString((await sub.next_msg(timeout=QUIET_S)).data)
            except nats.errors.TimeoutError:
                return found
            if event.kind.startswith("campaign_"):
                found.append(event)
    finally:
        await nc.close()


def _state(mesh: CampaignMesh, key: str, name: str, state: int) -> campaigns_pb2.Campaign | None:
    channel, stub = mesh.campaigns()
    with channel:
        current = progress(stub, mesh.auth(key), name)
    return current if current.state == state else None


async def test_a_customers_pause_publishes_one_campaign_paused_event(campaign_mesh: CampaignMesh) -> None:
    tenant, key = campaign_mesh.new_tenant(10_000_000)
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth(key)
    with channel:
        created = create_and_fill(stub, auth, campaign("notify-pause", send_rate=5.0), 200)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        request = campaigns_pb2.PauseCampaignRequest(name=created.name, request_id="pause-1")
        stub.PauseCampaign(request, metadata=auth, timeout=10)
        stub.PauseCampaign(request, metadata=auth, timeout=10)  # a retry of the same request
        stub.PauseCampaign(campaigns_pb2.PauseCampaignRequest(name=created.name), metadata=auth, timeout=10)

        events = await _campaign_events(campaign_mesh, tenant, expected=1)
        stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=created.name), metadata=auth, timeout=10)

    assert [(e.tenant_id, e.kind, dict(e.attributes)) for e in events] == [
        (tenant, "campaign_paused", {"campaign": created.name, "reason": "BY_CUSTOMER"})]


async def test_a_closed_send_window_publishes_campaign_paused_with_its_reason(campaign_mesh: CampaignMesh) -> None:
    tenant, key = campaign_mesh.new_tenant(10_000_000)
    now_minute = datetime.now(UTC).hour * 60 + datetime.now(UTC).minute
    closed = campaigns_pb2.SendWindow(start_minute=(now_minute + 120) % 1440, end_minute=(now_minute + 180) % 1440,
                                      time_zone="UTC")
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth(key)
    with channel:
        created = create_and_fill(stub, auth, campaign("notify-window", send_window=closed), 5)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        wait_until(lambda: _state(campaign_mesh, key, created.name, campaigns_pb2.CAMPAIGN_STATE_PAUSED), 15,
                   "paused by its window")

        events = await _campaign_events(campaign_mesh, tenant, expected=1)
        stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=created.name), metadata=auth, timeout=10)

    assert [(e.kind, dict(e.attributes)) for e in events] == [
        ("campaign_paused", {"campaign": created.name, "reason": "SEND_WINDOW_CLOSED"})]


async def test_credits_running_out_publishes_campaign_paused_for_insufficient_credits(
        campaign_mesh: CampaignMesh) -> None:
    tenant, key = campaign_mesh.new_tenant(0)
    campaign_mesh.top_up(tenant, 5 * bulk_price(campaign_mesh, key))
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth(key)
    with channel:
        created = create_and_fill(stub, auth, campaign("notify-credits"), 20)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        wait_until(lambda: _state(campaign_mesh, key, created.name, campaigns_pb2.CAMPAIGN_STATE_PAUSED), 30,
                   "paused for credits")

        # The expander retries the next chunk every few seconds and is refused again: no new pause to tell.
        events = await _campaign_events(campaign_mesh, tenant, expected=1)
        await asyncio.sleep(6)
        again = await _campaign_events(campaign_mesh, tenant, expected=1)
        stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=created.name), metadata=auth, timeout=10)

    assert [(e.kind, dict(e.attributes)) for e in events] == [
        ("campaign_paused", {"campaign": created.name, "reason": "INSUFFICIENT_CREDITS"})]
    assert [e.event_id for e in again] == [events[0].event_id]


async def test_a_completed_campaign_publishes_one_campaign_completed_event_with_its_counts(
        campaign_mesh: CampaignMesh) -> None:
    tenant, key = campaign_mesh.new_tenant(10_000_000)
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth(key)
    with channel:
        created = create_and_fill(stub, auth, campaign("notify-complete"), 12)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        wait_until(lambda: _state(campaign_mesh, key, created.name, campaigns_pb2.CAMPAIGN_STATE_COMPLETED), 60,
                   "completed")

    events = await _campaign_events(campaign_mesh, tenant, expected=1)

    assert len(events) == 1
    event = events[0]
    assert (event.tenant_id, event.kind, event.event_id) == (
        tenant, "campaign_completed", f"campaign-{created.id}-completed")
    assert event.attributes["campaign"] == created.name
    assert (event.attributes["recipients"], event.attributes["sent"], event.attributes["failed"]) == ("12", "12", "0")

