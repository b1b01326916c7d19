"""A whole mesh of its own for the fuzzers: separate processes on free loopback ports, a database and JetStream
namespace of its own, torn down when the fuzz package is done (so a full run does not keep two meshes alive, and the
junk the fuzzers create never reaches the end-to-end tests' tenant)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dev import mesh as m
from tests.conftest import S3Server
from tests.e2e.conftest import RunningMesh, build_mesh_config, start_mesh


@pytest.fixture(scope="package")
def fuzz_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """The mesh, its gateway and a tenant (``acme``) with credits and an API key."""
    maildir = tmp_path_factory.mktemp("fuzz-mail")
    smtp_port = m.free_port()
    sink = m.start_smtp_sink(smtp_port, maildir, tmp_path_factory.mktemp("fuzz-sink-logs"))
    try:
        config = build_mesh_config(new_database(), redis_url, nats_url, s3_server, f"{run_id}fz",
                                   tmp_path_factory.mktemp("fuzz-mesh-logs"))
        running = start_mesh(config, maildir, smtp_port)
        try:
            yield running
        finally:
            running.stop()
    finally:
        sink.stop()


@pytest.fixture(scope="package")
def gateway_url(fuzz_mesh: RunningMesh) -> str:
    """The REST facade's base URL."""
    return f"http://127.0.0.1:{fuzz_mesh.config.gateway_port}"

