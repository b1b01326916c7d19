"""A real service under ``make run``'s supervisor: killed, it is started again the way ``dev.run`` starts it
(``Mesh.spawn_service``) and serves again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from dev import mesh as m
from dev.supervisor import Supervisor


@pytest.fixture
def gateway_mesh(database: str, redis_url: str, nats_url: str, tmp_path: Path) -> Iterator[m.Mesh]:
    # The gateway alone: it needs no other service to start and serve its OpenAPI document.
    config = m.MeshConfig(postgres_dsn=database, redis_url=redis_url, nats_url=nats_url,
                          s3_endpoint="http://127.0.0.1:9", ports={name: m.free_port() for name in m.GRPC_PORTS},
                          gateway_port=m.free_port(), log_dir=tmp_path, services=("gateway",))
    mesh = m.Mesh(config)
    try:
        yield mesh
    finally:
        mesh.stop()


def test_a_killed_service_is_started_again_by_the_supervisor_and_serves(gateway_mesh: m.Mesh) -> None:
    said: list[str] = []
    supervisor = Supervisor(say=said.append)
    supervisor.add("gateway", partial(gateway_mesh.spawn_service, "gateway"), gateway_mesh.start_service("gateway"))
    killed = supervisor.children()["gateway"].popen.pid
    url = f"http://127.0.0.1:{gateway_mesh.config.gateway_port}/openapi.json"
    assert httpx.get(url, timeout=10).status_code == 200

    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not any(line.startswith("restarted gateway") for line in said) and time.monotonic() < deadline:
        time.sleep(min(0.1, supervisor.check()))  # the run loop's own step

    assert said[:1] == ["gateway exited with code -9; restarting in 1 s"]
    restarted = supervisor.children()["gateway"]
    assert said[1] == f"restarted gateway (pid {restarted.popen.pid})" and restarted.popen.pid != killed
    assert gateway_mesh.processes["gateway"] is restarted  # the mesh stops what the supervisor started
    m.wait_port(gateway_mesh.config.gateway_port, 30, restarted.popen, "gateway")
    assert httpx.get(url, timeout=10).status_code == 200
