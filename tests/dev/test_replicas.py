"""Replicas in the dev mesh's configuration: names, ports, the addresses services dial and each replica's variables
(``dev.replicas``, ``MeshConfig``). Starting a mesh of replicas is ``tests/e2e/test_two_replicas.py``'s."""

from __future__ import annotations

import socket

import pytest

from dev import mesh as m
from dev.replicas import BLOCK_PORTS, free_port_block, grpc_target, replica_name, service_of


def _config(**fields: object) -> m.MeshConfig:
    return m.MeshConfig(postgres_dsn="postgresql://x", redis_url="redis://x", nats_url="nats://x",
                        s3_endpoint="http://x", **fields)  # type: ignore[arg-type]


def test_a_replica_name_names_its_service_and_index() -> None:
    assert [replica_name("ingest", i) for i in range(3)] == ["ingest", "ingest-2", "ingest-3"]
    assert [service_of(n) for n in ("ingest", "ingest-2", "smtp-sink", "sender-1")] == [
        ("ingest", 0), ("ingest", 1), ("smtp-sink", 0), ("sender-1", 0)]


def test_one_replica_dials_as_before_and_several_as_an_ipv4_list() -> None:
    assert grpc_target([50051]) == "127.0.0.1:50051"
    assert grpc_target([50051, 6000]) == "ipv4:127.0.0.1:50051,127.0.0.1:6000"


def test_a_mesh_without_replicas_is_the_mesh_of_before() -> None:
    config = _config()
    assert config.replica_names() == list(m.SERVICES)
    env = config.env()
    assert env["ESP_INGEST_ADDR"] == "127.0.0.1:50051" and env["ESP_LEDGER_ADDR"] == "127.0.0.1:50053"
    assert config.replica("gateway").env() == {"ESP_GATEWAY_PORT": "8080"}
    assert config.replica("reports").env() == {"ESP_GRPC_PORT": "50054", "ESP_WEBHOOK_PORT": "8081"}
    with pytest.raises(KeyError):
        config.replica("ingest-2")


def test_each_replica_gets_ports_of_its_own_and_every_address_names_them_all() -> None:
    config = _config(replicas={"ingest": 2, "gateway": 2, "reports": 3})
    names = config.replica_names()
    assert [n for n in names if n.startswith(("ingest", "gateway", "reports"))] == [
        "reports", "reports-2", "reports-3", "ingest", "ingest-2", "gateway", "gateway-2"]
    ingest = config.replicas_of("ingest")
    assert config.env()["ESP_INGEST_ADDR"] == f"ipv4:127.0.0.1:50051,127.0.0.1:{ingest[1].grpc_port}"
    assert config.env()["ESP_ROUTER_ADDR"] == "127.0.0.1:50052"
    gateway_2, reports_3 = config.replica("gateway-2"), config.replica("reports-3")
    assert gateway_2.grpc_port == 0 and gateway_2.env() == {"ESP_GATEWAY_PORT": str(gateway_2.http_port)}
    assert reports_3.env() == {"ESP_GRPC_PORT": str(reports_3.grpc_port),
                               "ESP_WEBHOOK_PORT": str(reports_3.http_port)}
    ports = [p for r in config.replicas_of("reports") for p in (r.grpc_port, r.http_port)]
    assert len(set(ports)) == len(ports)


def test_only_the_first_replica_keeps_a_metrics_port_the_environment_gives() -> None:
    config = _config(replicas={"sender": 2}, extra_env={"ESP_METRICS_PORT": "9464"},
                     metrics_ports={"ingest": 21000})
    assert "ESP_METRICS_PORT" not in config.replica("sender").env()  # the environment's 9464 stands
    assert config.replica("sender-2").env()["ESP_METRICS_PORT"] == "0"
    assert config.replica("ingest").env()["ESP_METRICS_PORT"] == "21000"


def test_a_replica_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        _config(replicas={"ingest": 0})


def test_a_port_block_is_free_below_the_ephemeral_range_and_avoids_what_it_is_told() -> None:
    base = free_port_block(4)
    assert BLOCK_PORTS.start <= base and base + 4 <= BLOCK_PORTS.stop
    for port in range(base, base + 4):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    middle = (BLOCK_PORTS.start + BLOCK_PORTS.stop) // 2
    assert all(free_port_block(4, avoid=range(BLOCK_PORTS.start, middle)) >= middle for _ in range(20))
