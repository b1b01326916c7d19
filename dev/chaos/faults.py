"""The faults a chaos run injects: each breaks one thing and then lets (or makes) it heal."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dev.chaos.cluster import CHEAPEST_PROVIDER, ChaosCluster


@dataclass(frozen=True)
class Fault:
    """``kind`` is one of kill (a service process), worker (one worker process of a service), dependency (stop and
    start Postgres, Redis or NATS) or provider (simulator knobs on the cheapest provider)."""

    name: str
    kind: str
    target: str
    detail: str = ""
    down_s: float = 4.0
    """How long a dependency stays down, or a provider stays faulty."""

    @property
    def crash_window(self) -> bool:
        """Whether the fault can cut a delivery between a provider's answer and its recording, which allows a
        second send under at-least-once."""
        if self.kind in ("kill", "worker"):
            return self.target == "sender"
        return self.kind == "dependency"

    async def inject(self, cluster: ChaosCluster) -> None:
        if self.kind == "kill":
            await asyncio.to_thread(cluster.kill_service, self.target)
        elif self.kind == "worker":
            await asyncio.to_thread(cluster.kill_worker, self.target, self.detail)
        elif self.kind == "dependency":
            await asyncio.to_thread(cluster.kill_dependency, self.target)
        else:
            await cluster.set_knobs(CHEAPEST_PROVIDER, **PROVIDER_FAULTS[self.target])

    async def heal(self, cluster: ChaosCluster) -> None:
        """End the fault: dependencies and providers come back after a while; killed services are restarted by
        the cluster's supervisor, as an orchestrator would."""
        if self.kind == "dependency":
            await asyncio.sleep(self.down_s)
            await asyncio.to_thread(cluster.start_dependency, self.target)
        elif self.kind == "provider":
            await asyncio.sleep(self.down_s)
            await cluster.set_knobs(CHEAPEST_PROVIDER, **HEALTHY)
        await cluster.wait_serving()


HEALTHY: dict[str, object] = {"outage": False, "latency_ms": 20, "jitter_ms": 20, "error_rate": 0.0,
                              "throttle_rps": None, "hang_rate": 0.0}
PROVIDER_FAULTS: dict[str, dict[str, object]] = {
    "outage": {"outage": True},
    "brownout": {"latency_ms": 2000, "error_rate": 0.3},
    "throttle": {"throttle_rps": 2.0, "retry_after_s": 1.0},
    # Past the adapters' 10 s timeout: the provider takes the email and the answer never comes in time.
    "ambiguous": {"hang_rate": 0.3, "hang_s": 12.0},
}

FAULTS: dict[str, Fault] = {f.name: f for f in [
    *(Fault(f"kill-{name}", "kill", name)
      for name in ("ingest", "ledger", "sender", "reports", "router", "gateway", "campaigns", "webhooks")),
    Fault("kill-ledger-settlement", "worker", "ledger", "services.ledger.settlement_worker"),
    Fault("kill-sender-pool", "worker", "sender", "services.sender.worker"),
    Fault("kill-campaigns-expander", "worker", "campaigns", "services.campaigns.expander"),
    *(Fault(f"restart-{name}", "dependency", name) for name in ("nats", "postgres", "redis")),
    # Ten seconds without Redis: routing state (health, quotas, breakers) is gone when it returns, and what was
    # held back meanwhile must not rush to the dearest providers.
    Fault("restart-redis-long", "dependency", "redis", down_s=10.0),
    *(Fault(f"provider-{name}", "provider", name, down_s=8.0) for name in PROVIDER_FAULTS),
]}

PAIRS: tuple[tuple[str, str], ...] = (
    ("kill-sender", "restart-redis"),
    ("kill-ingest", "restart-nats"),
    ("restart-postgres", "provider-outage"),
    ("kill-ledger", "kill-reports"),
    ("kill-sender", "provider-ambiguous"),
)
FULL_MATRIX: tuple[tuple[str, ...], ...] = (*((name,) for name in FAULTS), *PAIRS)
SHORT_MATRIX: tuple[tuple[str, ...], ...] = (("kill-sender",), ("restart-redis",), ("provider-ambiguous",))
"""What ``make test`` runs: a process crash mid-delivery, a dependency restart, and the ambiguous provider."""
