"""The halted campaigns and cancelled messages as this sender process last read them: a snapshot refreshed in the
background.

The campaigns service mirrors each paused or cancelled campaign into one Redis hash, and ingest each message
cancelled after its SEND task was queued into a sorted set (``libs.common.campaign_halts``); a delivery checks an
email's campaign and its own id against this in-process copy just before the provider call, so honouring a pause
or a cancellation costs no round trip per email. The copy is read every ``REFRESH_S``: a
pause reaches every replica within that. When Redis cannot answer, the last copy stays in force (a halt is never
forgotten because Redis blinked) and the trouble is logged at most once a ``LOG_EVERY_S``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import Gauge

from libs.common.campaign_halts import REFRESH_S, Halt, read_snapshot
from libs.common.stopping import pause_unless_stopped
from libs.common.workers import StopEvent

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
"""While refreshes keep failing, one warning this often (a refresh runs five times a second)."""
HALTED = Gauge("esp_sender_halted_campaigns", "Halted campaigns in this sender's snapshot")
CANCELLED_MESSAGES = Gauge("esp_sender_cancelled_messages", "Cancelled messages in this sender's snapshot")


def held_msg_id(message_id: str, sequence: int) -> str:
    """The ``Nats-Msg-Id`` of an email parked on the held stream: ``sequence`` is the SEND stream's sequence of
    the queued copy being parked, so a redelivery of that copy is deduplicated while a later copy (put back on
    resume, then paused again) is parked anew."""
    return f"{message_id}.held.{sequence}"


class CampaignHalts:
    """Which campaigns are paused or cancelled, and which messages cancelled, as read from Redis at most
    ``refresh_s`` ago."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, refresh_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.namespace = namespace
        self.refresh_s = refresh_s
        self.snapshot: dict[str, Halt] = {}
        """Campaign id → why its emails must not reach a provider; only halted campaigns are in it."""
        self.cancelled_messages: frozenset[str] = frozenset()
        """Ids of messages cancelled after they were queued: they must not reach a provider."""
        self._clock = clock
        self._failing_since: float | None = None
        self._logged_at = -float("inf")

    def of(self, campaign_id: str) -> Halt | None:
        """The campaign's halt, if it is halted (emails without a campaign never are)."""
        return self.snapshot.get(campaign_id) if campaign_id else None

    def message_cancelled(self, message_id: str) -> bool:
        """Whether the message itself was cancelled (``CancelMessage``)."""
        return message_id in self.cancelled_messages

    async def refresh(self) -> None:
        """Read the halts once (one round trip); raises on Redis trouble (the snapshot is then unchanged)."""
        read = await read_snapshot(self.redis, namespace=self.namespace)
        self.snapshot, self.cancelled_messages = read.campaigns, read.messages
        HALTED.set(len(self.snapshot))
        CANCELLED_MESSAGES.set(len(self.cancelled_messages))

    async def run(self, stop: StopEvent) -> None:
        """Refresh every ``refresh_s`` until ``stop``; an error keeps the last snapshot and is logged, rate-limited."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:
                self._failed()
            else:
                if self._failing_since is not None:
                    log.info("halted campaigns readable again after %.1fs", self._clock() - self._failing_since)
                    self._failing_since = None
            await pause_unless_stopped(stop, self.refresh_s)

    def _failed(self) -> None:
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("could not read the halted campaigns for %.1fs; keeping the last snapshot (%d halted)",
                        now - self._failing_since, len(self.snapshot), exc_info=True)
