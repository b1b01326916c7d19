"""Publishes the ledger's notification outbox (:mod:`services.ledger.notifications`: low balance crossed, unbilled
sends) as AccountEvents."""

from __future__ import annotations

import asyncio
import logging

from esp.internal.v1 import queue_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from libs.common.jetstream import Topology, publish
from libs.common.stopping import pause_unless_stopped
from services.ledger.ledger import Ledger

log = logging.getLogger(__name__)


class NotificationPublisher:
    """Rows written by ledger transactions are published after commit, then marked; a crash re-publishes them
    (with the same Nats-Msg-Id, so the stream keeps one copy)."""

    def __init__(self, ledger: Ledger, js: JetStreamContext, topology: Topology, *, interval_s: float = 1.0) -> None:
        self.ledger = ledger
        self.js = js
        self.topology = topology
        self.interval_s = interval_s

    async def publish_pending(self) -> int:
        """Publish up to 500 unpublished outbox rows and mark them; returns how many."""
        pending = await self.ledger.pending_notifications(limit=500)
        for note in pending:
            when = Timestamp()
            if note.created_at is not None:
                when.FromDatetime(note.created_at)
            event = queue_pb2.AccountEvent(
                event_id=f"ledger-notification-{note.notification_id}", tenant_id=note.tenant_id, kind=str(note.kind),
                attributes={k: str(v) for k, v in note.payload.items()}, event_time=when)
            await publish(self.js, self.topology.account_subject(note.tenant_id), event.SerializeToString(),
                          msg_id=event.event_id)
        await self.ledger.mark_notifications_published(n.notification_id for n in pending)
        return len(pending)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set: back to back while rows are pending, else every ``interval_s``."""
        while not stop.is_set():
            try:
                published = await self.publish_pending()
            except Exception:
                log.warning("publishing ledger notifications failed; will retry", exc_info=True)
                published = 0
            if published:
                continue
            await pause_unless_stopped(stop, self.interval_s)
