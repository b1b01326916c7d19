"""The periodic work on sending domains: the re-check — a verified domain whose records disappear turns ``failed``
(and its tenant is notified), a pending one verifies on its own once its records are published — and the repair of
the broadcast.

Every router replica runs it; each pass takes the domains whose next check is due with ``FOR UPDATE SKIP LOCKED``
and moves their next check ahead first (``DomainRegistry.check_due``), so replicas share the work. Each pass also
compares the bucket (as the replica's own view of it sees it) with Postgres and puts what a lost broadcast missed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from libs.common.sending_domains import SendingDomains
from libs.common.stopping import pause_unless_stopped
from services.router.domains import DomainRegistry

__all__ = ["DomainChecks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainChecks:
    """Re-checks due domains every ``poll_s``, ``batch`` at a time."""

    registry: DomainRegistry
    view: SendingDomains
    """The replica's view of the bucket, which the repair compares with Postgres."""
    verified_interval_s: float
    """Between two checks of a verified (or failed) domain."""
    pending_interval_s: float
    """Between two checks of a pending domain."""
    poll_s: float = 5.0
    batch: int = 50

    async def run_once(self) -> int:
        """Check every domain due now; the number checked."""
        total = 0
        while True:
            checked = await self.registry.check_due(limit=self.batch, verified_interval_s=self.verified_interval_s,
                                                    pending_interval_s=self.pending_interval_s)
            total += checked
            if checked < self.batch:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop``; a failing pass (Postgres away) is logged and retried."""
        while not stop.is_set():
            try:
                await self.run_once()
                if self.view.loaded:
                    await self.registry.repair(self.view.domains())
            except Exception:
                log.warning("sending-domain re-check or repair failed; retrying", exc_info=True)
            await pause_unless_stopped(stop, self.poll_s)
