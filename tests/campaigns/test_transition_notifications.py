"""A transition's notification is written to the campaigns outbox in the transition's own transaction: the store
against a campaigns database of this module's own (real Postgres, migrated; no publisher takes the rows)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from esp.internal.v1 import queue_pb2

from libs.common.db import create_pool, migrate_services
from libs.common.errors import FailedPrecondition
from libs.common.event_types import ACCOUNT_EVENT_TYPES
from libs.common.jetstream import Topology
from libs.common.outbox import CommittedRow
from services.campaigns.model import Action, CampaignSpec, Mailbox
from services.campaigns.recipients import Recipient
from services.campaigns.store import CampaignStore

TOPOLOGY = Topology("notices")


def new_id(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4()}"


def _spec() -> CampaignSpec:
    return CampaignSpec(
        display_name="spring", sender=Mailbox("news@example.com"), reply_to=(), subject="Hi", text_body="Hello",
        html_body="", headers={}, tags=(), attachment_ids=(), metadata={}, default_variables={},
        missing_variable_policy="FAIL", message_class="bulk")


class Recorder:
    """What the store handed to the outbox publisher after its commits."""

    def __init__(self) -> None:
        self.handed: list[CommittedRow] = []

    def __call__(self, rows: Sequence[CommittedRow]) -> None:
        self.handed += rows


@pytest.fixture(scope="module")
async def campaigns_dsn(new_database: Callable[[], str]) -> str:
    dsn = new_database()
    await migrate_services(dsn, ["campaigns"])
    return dsn


@pytest.fixture
async def store(campaigns_dsn: str) -> AsyncIterator[tuple[CampaignStore, Recorder]]:
    pool = await create_pool(campaigns_dsn, min_size=1, max_size=2, name="notices-tests")
    handed = Recorder()
    yield CampaignStore(pool, TOPOLOGY, on_commit=handed), handed
    await pool.close()


async def _running(store: CampaignStore) -> tuple[str, str]:
    """A fresh tenant's campaign, started: (tenant, campaign id)."""
    tenant, campaign_id = new_id("tenant-"), new_id()
    await store.create(campaign_id, tenant, "", _spec())
    await store.add_recipients(tenant, campaign_id, [Recipient(1, "a@example.org", "", {})])
    await store.transition(tenant, campaign_id, Action.START, "")
    return tenant, campaign_id


async def _outbox(store: CampaignStore, tenant: str) -> list[tuple[str, str, queue_pb2.AccountEvent]]:
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT subject, msg_id, payload FROM campaigns.outbox WHERE subject = %s ORDER BY id",
                                 (TOPOLOGY.account_subject(tenant),))
        return [(subject, msg_id, queue_pb2.AccountEvent.FromString(bytes(payload)))
                for subject, msg_id, payload in await cur.fetchall()]


async def test_pausing_writes_one_campaign_paused_event_for_the_account_subject(
        store: tuple[CampaignStore, Recorder]) -> None:
    campaigns, handed = store
    tenant, campaign_id = await _running(campaigns)

    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "pause-1")

    (subject, msg_id, event), = await _outbox(campaigns, tenant)
    assert subject == TOPOLOGY.account_subject(tenant)
    assert msg_id == event.event_id == f"campaign-{campaign_id}-paused-1"
    assert (event.tenant_id, event.kind, dict(event.attributes)) == (
        tenant, "campaign_paused", {"campaign": f"campaigns/{campaign_id}", "reason": "BY_CUSTOMER"})
    assert ACCOUNT_EVENT_TYPES[event.kind] == "campaign.paused"
    assert [r.row.msg_id for r in handed.handed] == [msg_id]


async def test_a_retried_pause_writes_no_second_event(store: tuple[CampaignStore, Recorder]) -> None:
    campaigns, _handed = store
    tenant, campaign_id = await _running(campaigns)
    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "pause-1")

    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "pause-1")  # the same request again
    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "")  # paused already, for the same reason

    assert len(await _outbox(campaigns, tenant)) == 1


async def test_each_later_pause_has_an_event_of_its_own(store: tuple[CampaignStore, Recorder]) -> None:
    campaigns, _handed = store
    tenant, campaign_id = await _running(campaigns)

    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "")
    await campaigns.transition(tenant, campaign_id, Action.RESUME, "")
    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "")

    assert [msg_id for _s, msg_id, _e in await _outbox(campaigns, tenant)] == [
        f"campaign-{campaign_id}-paused-1", f"campaign-{campaign_id}-paused-2"]


async def test_start_resume_and_cancel_write_no_event(store: tuple[CampaignStore, Recorder]) -> None:
    campaigns, handed = store
    tenant, campaign_id = await _running(campaigns)
    await campaigns.transition(tenant, campaign_id, Action.PAUSE, "")
    handed.handed.clear()

    await campaigns.transition(tenant, campaign_id, Action.RESUME, "")
    await campaigns.transition(tenant, campaign_id, Action.CANCEL, "")

    assert [e.kind for _s, _m, e in await _outbox(campaigns, tenant)] == ["campaign_paused"]
    assert handed.handed == []


async def test_a_refused_pause_writes_no_event(store: tuple[CampaignStore, Recorder]) -> None:
    campaigns, handed = store
    tenant, campaign_id = new_id("tenant-"), new_id()
    await campaigns.create(campaign_id, tenant, "", _spec())

    with pytest.raises(FailedPrecondition):
        await campaigns.transition(tenant, campaign_id, Action.PAUSE, "")  # a draft cannot be paused

    assert await _outbox(campaigns, tenant) == []
    assert handed.handed == []
