"""The consumer records a large batch in lanes (transactions at once, the events split by message): every event
once, numbered per message, counted once in the rollups, and a redelivery of the batch changes nothing."""

from __future__ import annotations

import psycopg
from esp.v1 import messages_pb2
from psycopg_pool import AsyncConnectionPool

from libs.common.outbox import OutboxPublisher
from services.reports.consumer import EventConsumer
from services.reports.customer_events import OUTBOX_TABLE
from services.reports.envelopes import decode_envelope
from tests.reports.builders import accepted, at, new_id, sender_event, sent
from tests.reports.conftest import ReportsService

MESSAGES = 150  # three events each: 450, well over the smallest batch that is split


async def _figures(reports: ReportsService, tenant: str) -> tuple[int, list[list[int]], tuple[int, int, int]]:
    """The tenant's timeline rows, each message's sequence numbers, and its accepted/sent/delivered day counts."""
    async with await psycopg.AsyncConnection.connect(reports.settings.postgres_dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM reports.events WHERE tenant_id = %s", (tenant,))
        events = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(
            """SELECT array_agg(seq ORDER BY seq) FROM reports.events WHERE tenant_id = %s
               GROUP BY message_id ORDER BY message_id""", (tenant,))
        sequences = [row[0] for row in await cur.fetchall()]
        cur = await conn.execute(
            """SELECT sum(accepted), sum(sent), sum(delivered) FROM reports.rollup_day
               WHERE tenant_id = %s AND tag = ''""", (tenant,))
        counts = await cur.fetchone() or (0, 0, 0)
    return events, sequences, (int(counts[0] or 0), int(counts[1] or 0), int(counts[2] or 0))


async def test_a_batch_recorded_in_lanes_counts_every_event_once_and_a_redelivery_changes_nothing(
        reports: ReportsService) -> None:
    tenant = new_id("tenant-")
    envelopes = []
    for index in range(MESSAGES):
        message_id, minute = new_id(), index % 60
        envelopes += [
            accepted(tenant, message_id, at(21, minute)),
            sent(tenant, message_id, at(21, minute, 5), provider="ses", provider_message_id=f"<{message_id}@ses>"),
            sender_event(tenant, message_id, messages_pb2.MESSAGE_EVENT_TYPE_DELIVERED, at(21, minute, 30),
                         provider="ses", recipient="alice@example.com"),
        ]
    records = [decode_envelope(envelope.SerializeToString()) for envelope in envelopes]
    async with AsyncConnectionPool(reports.settings.postgres_dsn, min_size=1, max_size=4, open=False) as pool:
        consumer = EventConsumer(pool, reports.redis, reports.nc, reports.topology,
                                 OutboxPublisher(pool, reports.nc, OUTBOX_TABLE))
        await consumer.record_in_lanes(records)
        first = await _figures(reports, tenant)
        await consumer.record_in_lanes(records)  # redelivered whole, as after a lane failed
        second = await _figures(reports, tenant)

    assert first == (3 * MESSAGES, [[1, 2, 3]] * MESSAGES, (MESSAGES, MESSAGES, MESSAGES))
    assert second == first
