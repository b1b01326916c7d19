"""Streams at the replica count of ``ESP_STREAM_REPLICAS``, on a three-node cluster of this test module's own; a
comma list of servers in ``ESP_NATS_URL``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import ServerError

from dev.nats_cluster import NatsCluster
from libs.common.jetstream import Topology, connect, ensure_streams, publish, server_urls
from libs.common.settings import CommonSettings, load_settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    base = tmp_path_factory.mktemp("nats-cluster")
    with NatsCluster(base, base / "logs").running() as running:
        yield running


@pytest.fixture
async def client(cluster: NatsCluster) -> AsyncIterator[NATS]:
    nc = await connect(cluster.url, "replicas-test")
    yield nc
    await nc.close()


def test_a_comma_list_of_servers_is_one_url_per_server():
    assert server_urls("nats://a:4222, nats://b:4222,,nats://c:4222") == [
        "nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert server_urls("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    with pytest.raises(ValueError):
        server_urls(" , ")


def test_the_replica_count_is_a_setting_that_topology_bounds():
    settings = load_settings(CommonSettings, {"ESP_STREAM_REPLICAS": "3"})
    assert settings.stream_replicas == 3
    assert load_settings(CommonSettings, {}).stream_replicas == 1
    for wrong in (0, 6):
        with pytest.raises(ValueError, match="replicas"):
            Topology("x", replicas=wrong)


async def test_every_stream_is_kept_by_three_servers(client: NATS, run_id: str):
    js = client.jetstream()
    topology = Topology(f"{run_id}r3", replicas=3)
    await ensure_streams(js, topology)
    try:
        for stream in topology.streams:
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert {info.cluster.leader, *(peer.name for peer in info.cluster.replicas or [])} == {
                "nats-0", "nats-1", "nats-2"}
    finally:
        for stream in topology.streams:
            await js.delete_stream(stream)


async def test_streams_made_at_one_replica_go_to_three_with_what_they_hold(client: NATS, run_id: str):
    js = client.jetstream()
    one, three = Topology(f"{run_id}up", replicas=1), Topology(f"{run_id}up", replicas=3)
    await ensure_streams(js, one)
    try:
        for index in range(5):
            await publish(js, one.send_subject("bulk"), b"queued", msg_id=f"m-{index}")
        await ensure_streams(js, three)
        info = await js.stream_info(three.send_stream("bulk"))
        assert info.config.num_replicas == 3
        assert info.state.messages == 5
    finally:
        for stream in one.streams:
            await js.delete_stream(stream)


async def test_a_single_server_refuses_three_replicas(nats_url: str, run_id: str):
    # The first stream is refused, so nothing of the namespace is left on the shared server.
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(ServerError, match="non-clustered"):
            await ensure_streams(nc.jetstream(), Topology(f"{run_id}one", replicas=3))
    finally:
        await nc.close()
