"""The mesh on a three-node JetStream cluster as production runs it (streams at three replicas, ``sync_interval:
always``): the NATS node leading the SEND streams is killed under mixed load, and nothing the mesh accepted is lost.

The load and the checks are the chaos run's (``dev.chaos.load``, ``dev.chaos.history``): every accepted email must
end final with its credit hold resolved, and reach the provider simulator; a second send of one email counts as
explained because the fault can cut a delivery between the provider's answer and its ack (the ack goes to a stream
leader that is gone), as a killed sender can.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats.errors
import psycopg
import pytest
from nats.aio.client import Client as NATS

from dev import mesh as m
from dev import seed
from dev.chaos.cluster import TENANT
from dev.chaos.history import FINAL_STATES, SENT_STATES, check, read_history
from dev.chaos.load import LoadGenerator
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.nats_cluster import NatsCluster, NatsNode
from dev.simulator.model import default_personalities
from libs.common.db import migrate_services
from libs.common.jetstream import Topology, connect
from libs.common.message_classes import MessageClass
from tests.conftest import S3Server
from tests.e2e.conftest import STALL_S, build_mesh_config
from tests.progress import wait_for_progress_async

pytestmark = pytest.mark.e2e

RATE = 25.0
"""Emails per second offered by the load (OTP, transactional and bulk; gRPC and REST)."""
BEFORE_S, AFTER_S = 4.0, 5.0
"""Load before the kill, and after it: the kill lands while the mesh is accepting and sending."""
CAMPAIGN_RECIPIENTS = 40
PROVIDERS = {"mailgun-us": 80, "sendgrid-1": 90}


@dataclass
class ClusteredMesh:
    cluster: NatsCluster
    mesh: m.Mesh
    api_key: str
    simulator_url: str

    @property
    def config(self) -> m.MeshConfig:
        return self.mesh.config

    @property
    def topology(self) -> Topology:
        return Topology(self.config.namespace, replicas=3)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", tmp_path / "logs").running() as cluster:
        yield cluster


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[str, int]]:
    smtp_port = m.free_port()
    proc, description = m.start_simulator(m.free_port(), smtp_port, tmp_path / "logs",
                                          extra_args=("--log-cap", "1000000", "--seed", "7"))
    yield str(description["http_url"]), smtp_port
    proc.stop()


@pytest.fixture
def clustered_mesh(nats_cluster: NatsCluster, simulator: tuple[str, int], new_database: Callable[[], str],
                   redis_url: str, s3_server: S3Server, run_id: str, tmp_path: Path) -> Iterator[ClusteredMesh]:
    simulator_url, smtp_port = simulator
    config = build_mesh_config(new_database(), redis_url, nats_cluster.url, s3_server, f"{run_id}nc",
                               tmp_path / "mesh-logs")
    # JetStream hands an email (or a final event) whose ack was lost with the killed leader to another sender (or
    # the settlement worker) after this long (production: 60 s and 30 s), as in the chaos runs.
    config.extra_env.update({"ESP_STREAM_REPLICAS": "3", "ESP_ACK_WAIT_S": "10",
                              "ESP_SETTLEMENT_ACK_WAIT_S": "10"})
    asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
    mesh = m.Mesh(config)
    try:
        mesh.start()
        api_key = _seed(config, simulator_url, smtp_port)
        yield ClusteredMesh(nats_cluster, mesh, api_key, simulator_url)
    finally:
        mesh.stop()
        asyncio.run(m.forget_namespace(config.namespace, nats_cluster.url, redis_url))


def _seed(config: m.MeshConfig, simulator_url: str, smtp_port: int) -> str:
    """The chaos tenant (the history checker reads its emails) and two simulated providers."""
    with grpc.insecure_channel(f"127.0.0.1:{config.ports['ingest']}") as channel, \
            httpx.Client(base_url=simulator_url, timeout=10) as sim:
        seed.ensure_tenant(channel, config.admin_token, TENANT)
        api_key = seed.create_api_key(channel, config.admin_token, TENANT)
        seed.top_up(channel, config.admin_token, TENANT, 1_000_000_000, f"{TENANT}-initial")
        for personality in default_personalities():
            if personality.name not in PROVIDERS:
                continue
            provider = personality.provider_config(simulator_url, "127.0.0.1", smtp_port)
            seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                id=personality.name, type=personality.type, endpoint=provider.endpoint,
                credentials=dict(provider.credentials), options=dict(provider.options), region=provider.region,
                price_per_email_micros=PROVIDERS[personality.name]))
            sim.patch(f"/_sim/personalities/{personality.name}/knobs",
                      json={"latency_ms": 20, "jitter_ms": 20}).raise_for_status()
    return api_key


async def _leaders(js: Any, streams: tuple[str, ...]) -> dict[str, str]:
    """Each stream's leader ("" while it has none, or while this client reconnects from the killed node)."""
    leaders: dict[str, str] = {}
    for stream in streams:
        try:
            info = await js.stream_info(stream)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError):
            leaders[stream] = ""
            continue
        leaders[stream] = (info.cluster.leader if info.cluster else "") or ""
    return leaders


def _unfinished(dsn: str) -> int:
    """Emails stored and not yet final (counting those reports has not recorded yet), running campaigns, and holds of
    stored emails the ledger has not settled yet (a final event whose ack died with the killed node is delivered
    to the settlement worker again only after its ack wait)."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM ingest.messages m WHERE NOT EXISTS (SELECT 1 FROM reports.messages r "
            "        WHERE r.message_id = m.id::text AND r.state = ANY(%s))) "
            "     + (SELECT count(*) FROM reports.messages WHERE NOT state = ANY(%s)) "
            "     + (SELECT count(*) FROM campaigns.campaigns WHERE state IN ('running', 'scheduled')) "
            "     + (SELECT count(*) FROM ledger.holds h WHERE h.state = 'held' AND EXISTS ("
            "        SELECT 1 FROM ingest.messages m WHERE m.id::text = h.hold_id))",
            (list(FINAL_STATES), list(FINAL_STATES))).fetchone()
    return int(row[0]) if row else -1


def _final_states(dsn: str, message_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT message_id, state FROM reports.messages WHERE message_id = ANY(%s)",
                                 (message_ids,)).fetchall())


async def test_killing_the_send_streams_leader_under_load_loses_nothing(clustered_mesh: ClusteredMesh):
    mesh = clustered_mesh
    cluster, dsn, topology = mesh.cluster, mesh.config.postgres_dsn, mesh.topology
    nc: NATS = await connect(cluster.url, "nats-cluster-test")
    try:
        js = nc.jetstream()
        for stream in topology.streams:
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, f"{stream} is at R{info.config.num_replicas}"
        assert all(node.monitor("/varz")[1]["jetstream"]["config"]["sync_always"] for node in cluster.nodes)
        for message_class in MessageClass:  # the senders' consumers take their streams' replica count
            consumer = await js.consumer_info(topology.send_stream(message_class),
                                              topology.consumer(f"sender-{message_class}"))
            assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2, consumer.cluster

        since = datetime.now(UTC) - timedelta(seconds=2)
        gateway = f"http://127.0.0.1:{mesh.config.gateway_port}"
        async with LoadGenerator(f"127.0.0.1:{mesh.config.ports['ingest']}", gateway, mesh.api_key, RATE,
                                 seed=22) as load:
            await load.upload_attachment("nats")
            await load.start_campaign("nats", CAMPAIGN_RECIPIENTS, send_rate=CAMPAIGN_RECIPIENTS / (BEFORE_S + AFTER_S))
            driving = asyncio.create_task(load.run("nats", BEFORE_S + AFTER_S))
            await asyncio.sleep(BEFORE_S)

            # The node leading most SEND streams (JetStream spreads leaders) goes, so their leadership must move.
            before = await _leaders(js, topology.send_streams)
            victim: NatsNode = cluster.node(Counter(before.values()).most_common(1)[0][0])
            led = [stream for stream, leader in before.items() if leader == victim.name]
            accepted_before_kill = sum(r.outcome == "accepted" for r in load.records)
            await asyncio.to_thread(cluster.kill, victim)
            killed_at = time.time()

            await driving
            await load.settle()
            clients = list(load.records)
            campaigns = list(load.campaigns)

        after = await wait_for_progress_async(
            lambda: _leaders(js, topology.send_streams), lambda seen: all(seen.values()),
            what="a leader for every SEND stream", stall_s=STALL_S)
        # Two stall windows: a settlement redelivered after its 30 s ack wait moves nothing until then.
        await wait_for_progress_async(lambda: asyncio.to_thread(_unfinished, dsn), lambda left: left == 0,
                                      what="every stored email final and settled", stall_s=2 * STALL_S)
        async with httpx.AsyncClient(base_url=mesh.simulator_url, timeout=60) as sim:
            requests = (await sim.get("/_sim/requests", params={"since": 0})).json()
        history = await asyncio.to_thread(read_history, dsn, "nats", ["nats-leader-kill"], True, clients, requests,
                                          since, campaigns)
        verdict = check(history)
        after_kill = [r for r in clients if r.outcome == "accepted" and r.sent_at > killed_at and not r.cancel]
        print(f"killed {victim.name}, which led {led}; leaders before {before}, after {after}; "
              f"{len(after_kill)} accepted after the kill; {verdict.as_row()}")

        assert verdict.violations == [], "\n".join(verdict.violations[:20])
        assert verdict.lost == 0
        assert accepted_before_kill > 0
        # Every accepted email that was not cancelled reached a provider (check() flags sent-but-never-taken).
        assert verdict.failed == 0, verdict.as_row()
        assert verdict.sent == verdict.accepted - verdict.cancelled, verdict.as_row()
        assert set(history.campaign_recipients.values()) == {CAMPAIGN_RECIPIENTS}
        # The mesh kept accepting and sending: emails accepted after the kill were all delivered.
        assert after_kill, "no email was accepted after the kill"
        states = await asyncio.to_thread(_final_states, dsn, [r.message_id for r in after_kill])
        assert {states.get(r.message_id) for r in after_kill} <= SENT_STATES, Counter(states.values())
        # Leadership of what the victim led moved to the survivors.
        assert all(after[stream] not in ("", victim.name) for stream in led), (before, after)

        await asyncio.to_thread(cluster.restart, victim)
        assert victim.running
    finally:
        await nc.close()


def test_the_cluster_runs_what_production_runs(nats_cluster: NatsCluster):
    """Each node names itself, routes to the other two and fsyncs every write (``sync_interval: always``)."""
    for node in nats_cluster.nodes:
        varz = node.monitor("/varz")[1]
        assert varz["server_name"] == node.name
        assert varz["jetstream"]["config"]["sync_always"] is True
        routez = node.monitor("/routez")[1]
        assert {route["remote_name"] for route in routez["routes"]} == {
            other.name for other in nats_cluster.nodes if other is not node}
    assert nats_cluster.meta_leader() in {node.name for node in nats_cluster.nodes}


def test_a_killed_node_comes_back_into_the_cluster(nats_cluster: NatsCluster):
    victim = nats_cluster.nodes[0]
    nats_cluster.kill(victim)
    assert not victim.running
    survivors = nats_cluster.nodes[1:]
    nats_cluster.wait_ready(survivors)  # two of three are a quorum: they agree on a meta leader among them
    assert nats_cluster.meta_leader() in {node.name for node in survivors}
    nats_cluster.restart(victim)
    assert victim.running
    assert nats_cluster.meta_leader() == victim.monitor("/jsz")[1]["meta_cluster"]["leader"]

