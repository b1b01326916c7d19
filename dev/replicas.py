"""Several processes of one service in the dev mesh, as a Deployment with several pods would run it.

Each replica is its own process on ports of its own: gRPC, and the HTTP port of the services that have one (the
gateway's REST port, reports' provider webhook port). The services find each other through one gRPC target per
service that names every replica (``ipv4:127.0.0.1:p1,127.0.0.1:p2``); their channels balance calls over it with
gRPC's ``round_robin`` policy (``libs.common.grpc_client``), as they balance over the pod addresses a headless
Service's DNS name resolves to in Kubernetes.

The first replica of a service keeps the name and ports the mesh had before replicas (``ingest``, ``ports["ingest"]``,
``gateway_port``, ``webhook_port``), so a mesh of one replica each is what it always was; the others are named
``<service>-2``, ``<service>-3`` …
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = [
    "BLOCK_PORTS", "HTTP_PORT_VARIABLES", "Replica", "free_port_block", "grpc_target", "replica_name", "service_of",
]

HTTP_PORT_VARIABLES = {"gateway": "ESP_GATEWAY_PORT", "reports": "ESP_WEBHOOK_PORT"}
"""The setting that moves a service's HTTP port, for the services that serve HTTP."""


@dataclass(frozen=True)
class Replica:
    """One process of a service and where it listens."""

    service: str
    index: int
    """0 for the first replica."""
    grpc_port: int
    """0 for the gateway, which serves HTTP only."""
    http_port: int = 0
    """The gateway's REST port or reports' webhook port; 0 for the others."""
    metrics_port: int | None = None
    """Its Prometheus port (its workers take the next ones); 0: none; None: whatever the mesh's environment says."""

    @property
    def name(self) -> str:
        return replica_name(self.service, self.index)

    @property
    def port(self) -> int:
        """The port that says it serves: gRPC (health), or HTTP for the gateway."""
        return self.grpc_port or self.http_port

    def env(self) -> dict[str, str]:
        """The variables that put this replica on its own ports."""
        env: dict[str, str] = {}
        if self.grpc_port:
            env["ESP_GRPC_PORT"] = str(self.grpc_port)
        if self.service in HTTP_PORT_VARIABLES:
            env[HTTP_PORT_VARIABLES[self.service]] = str(self.http_port)
        if self.metrics_port is not None:
            env["ESP_METRICS_PORT"] = str(self.metrics_port)
        return env


def replica_name(service: str, index: int) -> str:
    """``ingest`` for the first replica, ``ingest-2`` for the second …"""
    return service if index == 0 else f"{service}-{index + 1}"


def service_of(name: str) -> tuple[str, int]:
    """The service and index a replica name stands for (``ingest-2`` → ``("ingest", 1)``)."""
    service, _, number = name.rpartition("-")
    if service and number.isdigit() and int(number) >= 2:
        return service, int(number) - 1
    return name, 0


def grpc_target(ports: Sequence[int], host: str = "127.0.0.1") -> str:
    """The gRPC target naming every replica: ``host:port`` for one (as before replicas), the ``ipv4:`` list of
    addresses for several, which gRPC's resolver hands to the load-balancing policy whole."""
    if len(ports) == 1:
        return f"{host}:{ports[0]}"
    return "ipv4:" + ",".join(f"{host}:{port}" for port in ports)


BLOCK_PORTS = range(20_000, 32_000)
"""Where ``free_port_block`` looks: below Linux's ephemeral ports (32768-60999), so that an outgoing connection of a
process already running cannot take a port of the block before the process it is meant for binds it."""


def free_port_block(count: int, avoid: Collection[int] = (), attempts: int = 500) -> int:
    """The first of ``count`` consecutive loopback ports that are free now and not in ``avoid`` (a replica's metrics
    port and its workers' after it, which bind seconds after the replica starts)."""
    for _ in range(attempts):
        base = random.randrange(BLOCK_PORTS.start, BLOCK_PORTS.stop - count)
        block = range(base, base + count)
        if not any(port in avoid for port in block) and all(_bindable(port) for port in block):
            return base
    raise RuntimeError(f"no {count} consecutive free loopback ports found in {attempts} attempts")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
