"""Two replicas of each stateless service — ingest, router, sender, reports, gateway — and of the ledger, as separate
processes on this box, give the end-to-end result one replica gives: every accepted email sent once, each charged
once, a request retried on the other replica stored once. What the replicas share is shared: a provider's breaker
and daily quota live in Redis, so both senders obey one breaker and together stay within one quota; a catalog change
made on one router replica reaches every replica (the JetStream KV bucket each watches) within 2 s.

Services find each other through targets naming every replica (``dev.replicas``) and balance calls round robin:
the per-replica metrics show each replica took part. The history checker of the chaos runs (``dev.chaos.history``)
judges each phase's emails: its tenant is the chaos tenant and its emails carry a phase and a key of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from esp.v1 import common_pb2, messages_pb2, messages_pb2_grpc, providers_pb2, providers_pb2_grpc
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families

from dev import mesh as m
from dev import seed
from dev.chaos.cluster import TENANT
from dev.chaos.history import FINAL_STATES, TOOK_IT, PhaseHistory, PhaseVerdict, check, read_history
from dev.chaos.load import CLASSES, ClientRecord
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.replicas import free_port_block
from dev.simulator.model import default_personalities
from libs.common.db import migrate_services
from tests.conftest import S3Server
from tests.e2e.conftest import STALL_S, build_mesh_config
from tests.progress import wait_for_progress

pytestmark = pytest.mark.e2e

REPLICATED = ("ingest", "router", "sender", "reports", "gateway", "ledger")
PROVIDER_PRICES = {"mailgun-us": 80, "sendgrid-1": 90}
"""The providers every phase may use, cheapest first."""
CHEAPEST, FALLBACK = "mailgun-us", "sendgrid-1"
QUOTA_PROVIDER, QUOTA = "postmark-1", 6
CATALOG_PROBE = "catalog-probe"
CATALOG_BOUND_S = 2.0
"""A catalog change made on one router replica is seen by every replica within this long."""
BREAKER_OPEN_S = 600
"""Longer than the test: an open breaker lets no probe through while the test watches."""
METRICS_BLOCK = 4
"""Ports per replica for Prometheus: the process's own, then one per worker (the sender runs three)."""
CONCURRENCY = 16


@dataclass
class ReplicaMesh:
    """A started mesh of two replicas per replicated service, with the provider simulator."""

    mesh: m.Mesh
    config: m.MeshConfig
    sim_url: str
    sim_smtp: tuple[str, int]
    api_key: str

    def ingest(self, index: int) -> str:
        return f"127.0.0.1:{self.config.replicas_of('ingest')[index].grpc_port}"

    def gateway(self, index: int) -> str:
        return f"http://127.0.0.1:{self.config.replicas_of('gateway')[index].http_port}"

    def router(self, index: int) -> str:
        return f"127.0.0.1:{self.config.replicas_of('router')[index].grpc_port}"

    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    def knobs(self, personality: str, **values: Any) -> None:
        httpx.patch(f"{self.sim_url}/_sim/personalities/{personality}/knobs", json=values,
                    timeout=10).raise_for_status()

    def simulator_requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.sim_url}/_sim/requests", params={"since": 0}, timeout=60)
        response.raise_for_status()
        records: list[dict[str, Any]] = response.json()
        return records

    def metric(self, replica: str, sample: str, **labels: str) -> float:
        """The sum of ``sample`` over a replica's process and its workers, for samples carrying ``labels``."""
        base = self.config.metrics_ports[replica]
        total = 0.0
        for port in range(base, base + METRICS_BLOCK):
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.TransportError:
                continue  # a worker this replica does not run
            for family in text_string_to_metric_families(text):
                for found in family.samples:
                    if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                        total += found.value
        return total

    def provider_spec(self, name: str, price: int, **fields: Any) -> providers_pb2.Provider:
        personality = next(p for p in default_personalities() if p.name == name)
        config = personality.provider_config(self.sim_url, *self.sim_smtp)
        return providers_pb2.Provider(
            type=personality.type, display_name=name, endpoint=config.endpoint, region=config.region,
            credentials=dict(config.credentials), options=dict(config.options), price_per_email_micros=price,
            weight=1.0, **fields)


def _metrics_ports(config: m.MeshConfig, names: list[str]) -> dict[str, int]:
    """A block of ``METRICS_BLOCK`` free ports for each replica, apart from each other and from the mesh's ports."""
    taken = {*config.ports.values(), config.gateway_port, config.webhook_port,
             *(port for ports in config.replica_ports.values() for pair in ports for port in pair)}
    blocks: dict[str, int] = {}
    for name in names:
        blocks[name] = base = free_port_block(METRICS_BLOCK, avoid=taken)
        taken.update(range(base, base + METRICS_BLOCK))
    return blocks


@pytest.fixture(scope="module")
def replica_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaMesh]:
    log_dir = tmp_path_factory.mktemp("replica-mesh-logs")
    namespace = f"{run_id}r2"
    # The request log must hold every request of the module (the default keeps the last 5,000 per provider).
    sim_proc, description = m.start_simulator(m.free_port(), m.free_port(), log_dir,
                                              extra_args=("--log-cap", "1000000", "--seed", "7"))
    base = build_mesh_config(new_database(), redis_url, nats_url, s3_server, namespace, log_dir)
    config = dataclasses.replace(
        base, replicas=dict.fromkeys(REPLICATED, 2),
        extra_env={**base.extra_env, "ESP_BREAKER_OPEN_S": str(BREAKER_OPEN_S)})
    names = [replica.name for service in REPLICATED for replica in config.replicas_of(service)]
    config.metrics_ports.update(_metrics_ports(config, names))
    mesh = m.Mesh(config)
    mesh.processes["simulator"] = sim_proc  # stopped with the mesh
    try:
        asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
        mesh.start()
        running = ReplicaMesh(mesh, config, str(description["http_url"]),
                              (str(description["smtp_host"]), int(description["smtp_port"])), "")
        with grpc.insecure_channel(running.ingest(0)) as channel:
            seed.ensure_tenant(channel, config.admin_token, TENANT)
            running.api_key = seed.create_api_key(channel, config.admin_token, TENANT)
            seed.top_up(channel, config.admin_token, TENANT, 10_000_000_000, "replicas-initial")
            providers = providers_pb2_grpc.ProviderServiceStub(channel)
            for name, price in PROVIDER_PRICES.items():
                providers.CreateProvider(providers_pb2.CreateProviderRequest(
                    provider_id=name, provider=running.provider_spec(name, price)),
                    metadata=(("authorization", f"Bearer {config.admin_token}"),), timeout=10)
                running.knobs(name, latency_ms=5, jitter_ms=5)
    except BaseException:
        mesh.stop()
        raise
    yield running
    mesh.stop()
    asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


# -- sending -----------------------------------------------------------------------------------------------------------
@dataclass
class Retry:
    """A request sent to one replica and again (with its request_id) to the other: both must name one email."""

    key: str
    first: str
    second: str


class Clients:
    """The test's clients of both ingest replicas (gRPC) and both gateways (REST)."""

    def __init__(self, running: ReplicaMesh) -> None:
        self.running = running
        self.channels = [grpc.aio.insecure_channel(running.ingest(i)) for i in range(2)]
        self.http = [httpx.AsyncClient(base_url=running.gateway(i), timeout=30,
                                       headers={"authorization": f"Bearer {running.api_key}"}) for i in range(2)]
        self.grpc_sends = [0, 0]
        """SendEmail calls made straight to each ingest replica (the rest reach them through the gateways)."""

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for client in self.http:
            await client.aclose()

    async def send(self, record: ClientRecord, replica: int, request: messages_pb2.SendEmailRequest) -> str:
        """The message id the replica answers with; records a refusal on ``record`` and returns ""."""
        if record.via == "rest":
            return await self._send_rest(record, replica, request)
        self.grpc_sends[replica] += 1
        stub = messages_pb2_grpc.MessageServiceStub(self.channels[replica])
        try:
            reply = await stub.SendEmail(request, metadata=self.running.auth(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            record.code, record.outcome = exc.code().name, "refused"
            record.errors.append(f"ingest {replica}: {exc.code().name}: {exc.details()}")
            return ""
        return str(reply.message.id)

    async def _send_rest(self, record: ClientRecord, replica: int, request: messages_pb2.SendEmailRequest) -> str:
        body: dict[str, Any] = {
            "messageClass": common_pb2.MessageClass.Name(request.message_class),
            "from": {"email": getattr(request, "from").email}, "to": [{"email": request.to[0].email}],
            "subject": request.subject, "textBody": request.text_body, "metadata": dict(request.metadata)}
        if request.request_id:
            body["requestId"] = request.request_id
        response = await self.http[replica].post("/v1/messages:send", json=body)
        if response.status_code != 200:
            record.code, record.outcome = str(response.status_code), "refused"
            record.errors.append(f"gateway {replica}: {response.status_code}: {response.text[:300]}")
            return ""
        return str(response.json()["message"]["id"])


def _request(phase: str, key: str, message_class: str, request_id: str) -> messages_pb2.SendEmailRequest:
    return messages_pb2.SendEmailRequest(
        request_id=request_id, message_class=CLASSES[message_class],
        to=[common_pb2.EmailAddress(email=f"rcpt-{key}@example.net")], subject=f"replicas {key}",
        text_body=f"two replicas, email {key}", metadata={"chaos_phase": phase, "chaos_key": key},
        **{"from": common_pb2.EmailAddress(email="load@replicas.example.com")})


async def _send_phase(running: ReplicaMesh, phase: str, count: int, classes: tuple[str, ...], *,
                      mixed: bool, rate: float = 0.0) -> tuple[list[ClientRecord], list[Retry], list[int]]:
    """``count`` emails through both replicas; with ``mixed``, a third through the gateways (REST) and half with a
    request_id, of which half are sent again to the other replica (one after the other, or both at once). With
    ``rate``, emails start at that many per second (spread over time, both senders' pulls get some). Returns the
    records, the retries and how many SendEmail calls went straight to each ingest."""
    clients = Clients(running)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    records: list[ClientRecord] = []
    retries: list[Retry] = []
    cycle = itertools.cycle(classes)

    async def one(i: int) -> None:
        key, replica = f"{phase}-{i}", (i // 4) % 2
        shape = i % 4 if mixed else 1
        request_id = "" if shape == 1 else f"replicas-{key}"
        record = ClientRecord(key=key, phase=phase, message_class=next(cycle), request_id=request_id,
                              via="rest" if mixed and i % 3 == 0 else "grpc")
        records.append(record)
        request = _request(phase, key, record.message_class, request_id)
        async with semaphore:
            record.sent_at = time.time()
            if shape == 2:  # the same request to both replicas at once: one waits for the other's outcome
                first, second = await asyncio.gather(clients.send(record, replica, request),
                                                     clients.send(record, 1 - replica, request))
            else:
                first = await clients.send(record, replica, request)
                second = await clients.send(record, 1 - replica, request) if shape == 0 and first else first
            record.told_at = time.time()
        if first and record.outcome != "refused":
            record.outcome, record.message_id, record.code = "accepted", first, "OK"
        if shape in (0, 2):
            retries.append(Retry(key, first, second))

    try:
        tasks = []
        start = time.monotonic()
        for i in range(count):
            if rate:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        await clients.close()
    return records, retries, clients.grpc_sends


def _settled(running: ReplicaMesh, phase: str, since: datetime, records: list[ClientRecord]) -> PhaseHistory:
    """The phase's history once every stored email reached a final state with its hold resolved."""

    def look() -> PhaseHistory:
        return read_history(running.config.postgres_dsn, phase, (), False, records, running.simulator_requests(),
                            since)

    def done_count(history: PhaseHistory) -> int:
        return sum(e.state in FINAL_STATES and e.hold_state in ("committed", "released")
                   for e in history.stored.values())

    return wait_for_progress(look, lambda h: len(h.stored) >= len(records) and done_count(h) == len(h.stored),
                             what=f"{phase}: every email final and its hold resolved", stall_s=STALL_S,
                             progress=done_count, every_s=0.5,
                             describe=lambda h: f"{done_count(h)} of {len(h.stored)} stored settled")


def _judge(running: ReplicaMesh, phase: str, since: datetime, records: list[ClientRecord]) -> PhaseVerdict:
    """Every email accepted, stored once, sent once by a provider and charged once."""
    assert all(r.outcome == "accepted" for r in records), [r.errors for r in records if r.outcome != "accepted"]
    history = _settled(running, phase, since, records)
    verdict = check(history)
    assert verdict.violations == [], verdict.violations
    assert (verdict.accepted, verdict.sent, verdict.lost, verdict.double_charges) == (len(records),) * 2 + (0, 0)
    assert not verdict.duplicates, verdict.duplicates
    return verdict


def _takes(running: ReplicaMesh, personality: str, message_ids: set[str]) -> int:
    """How many times a provider took one of ``message_ids`` (the simulator's request log)."""
    return sum(1 for record in running.simulator_requests() if record["personality"] == personality
               and record["result"] in TOOK_IT for message in record.get("messages", [])
               if message.get("esp_message_id") in message_ids)


def _since() -> datetime:
    # ingest's created_at is Postgres' clock, on this same machine; a second of slack for rounding.
    return datetime.now(UTC) - timedelta(seconds=1)


# -- routing views -----------------------------------------------------------------------------------------------------
def _route(target: str, message_class: int) -> dict[str, providers_pb2.ProviderScore]:
    """RouteEmail on one router replica (called directly, as a mesh-internal caller): every provider it knows."""
    with grpc.insecure_channel(target) as channel:
        reply = providers_pb2_grpc.ProviderServiceStub(channel).RouteEmail(
            providers_pb2.RouteEmailRequest(message_class=message_class, recipient_count=1, message_bytes=1000),
            timeout=5)
    return {s.provider.removeprefix("providers/"): s for s in [*reply.ranked, *reply.excluded]}


def _listed(target: str) -> dict[str, providers_pb2.Provider]:
    with grpc.insecure_channel(target) as channel:
        reply = providers_pb2_grpc.ProviderServiceStub(channel).ListProviders(
            providers_pb2.ListProvidersRequest(page_size=1000, show_disabled=True), timeout=5)
    return {p.name.removeprefix("providers/"): p for p in reply.providers}


def _agreed_within(running: ReplicaMesh, agrees: Callable[[str], bool], what: str) -> list[float]:
    """Seconds until each router replica agrees, polled from now for at most ``CATALOG_BOUND_S``."""
    start = time.monotonic()
    seen: dict[int, float] = {}
    while len(seen) < 2 and time.monotonic() - start < CATALOG_BOUND_S:
        for index in set(range(2)) - set(seen):
            if agrees(running.router(index)):
                seen[index] = time.monotonic() - start
        time.sleep(0.02)
    assert len(seen) == 2, (f"{what}: router replicas {sorted(set(range(2)) - set(seen))} still disagree "
                            f"{CATALOG_BOUND_S} s after the change (replicas agreeing, in s: {seen})")
    return [seen[0], seen[1]]


# -- the tests ---------------------------------------------------------------------------------------------------------
def test_mixed_load_through_both_replicas_is_sent_once_and_charged_once(replica_mesh: ReplicaMesh) -> None:
    running, phase, since = replica_mesh, "load", _since()
    ledgers = [running.metric(r.name, "esp_grpc_requests_total") for r in running.config.replicas_of("ledger")]
    ingest_sends = [running.metric(r.name, "esp_grpc_requests_total", method="/esp.v1.MessageService/SendEmail")
                    for r in running.config.replicas_of("ingest")]
    records, retries, direct = asyncio.run(_send_phase(running, phase, 120, ("transactional", "bulk", "otp"),
                                                       mixed=True))
    assert [r for r in retries if r.first != r.second or not r.first] == []  # one email per request_id
    verdict = _judge(running, phase, since, records)
    assert verdict.told == {"OK": len(records)}

    # Each replica took part: both senders delivered, ingest's calls reached both ledgers, and the gateways' REST
    # calls reached both ingests (each served more SendEmail calls than the test made to it directly).
    for sender in running.config.replicas_of("sender"):
        assert running.metric(sender.name, "esp_sender_deliveries_total") > 0, sender.name
    for ledger, before in zip(running.config.replicas_of("ledger"), ledgers, strict=True):
        assert running.metric(ledger.name, "esp_grpc_requests_total") > before, ledger.name
    for index, (ingest, before) in enumerate(zip(running.config.replicas_of("ingest"), ingest_sends, strict=True)):
        served = running.metric(ingest.name, "esp_grpc_requests_total", method="/esp.v1.MessageService/SendEmail")
        assert served - before > direct[index], (ingest.name, served - before, direct[index])


def test_a_catalog_change_on_one_router_replica_reaches_every_replica_within_two_seconds(
        replica_mesh: ReplicaMesh) -> None:
    running = replica_mesh
    otp = common_pb2.MESSAGE_CLASS_OTP
    spec = running.provider_spec("smtp-1", 7, allowed_classes=[otp])
    with grpc.insecure_channel(running.router(0)) as channel:
        providers_pb2_grpc.ProviderServiceStub(channel).CreateProvider(
            providers_pb2.CreateProviderRequest(provider_id=CATALOG_PROBE, provider=spec), timeout=10)
    added = _agreed_within(running, lambda r: CATALOG_PROBE in _route(r, otp) and CATALOG_PROBE in _listed(r),
                           "an added provider")
    cost = {index: _route(running.router(index), otp)[CATALOG_PROBE].expected_cost_micros for index in range(2)}
    assert cost[0] == cost[1] > 0

    spec.name, spec.price_per_email_micros = f"providers/{CATALOG_PROBE}", 70
    with grpc.insecure_channel(running.router(1)) as channel:  # the other replica this time
        providers_pb2_grpc.ProviderServiceStub(channel).UpdateProvider(providers_pb2.UpdateProviderRequest(
            provider=spec, update_mask=field_mask_pb2.FieldMask(paths=["price_per_email_micros"])), timeout=10)
    # Ten times the price, ten times the expected cost (which also weighs in the provider's error rate).
    repriced = _agreed_within(
        running, lambda r: _route(r, otp)[CATALOG_PROBE].expected_cost_micros > 5 * cost[0], "a new price")

    with grpc.insecure_channel(running.router(0)) as channel:
        providers_pb2_grpc.ProviderServiceStub(channel).DeleteProvider(
            providers_pb2.DeleteProviderRequest(name=f"providers/{CATALOG_PROBE}"), timeout=10)
    removed = _agreed_within(running, lambda r: CATALOG_PROBE not in _route(r, otp), "a removed provider")
    print(f"catalog change seen by both router replicas after (s): added {added}, repriced {repriced}, "
          f"removed {removed}")


def test_both_senders_stay_within_one_shared_daily_quota(replica_mesh: ReplicaMesh) -> None:
    running, phase, since = replica_mesh, "quota", _since()
    transactional = common_pb2.MESSAGE_CLASS_TRANSACTIONAL
    with grpc.insecure_channel(running.router(0)) as channel:
        providers_pb2_grpc.ProviderServiceStub(channel).CreateProvider(providers_pb2.CreateProviderRequest(
            provider_id=QUOTA_PROVIDER, provider=running.provider_spec(QUOTA_PROVIDER, 10, daily_quota=QUOTA)),
            timeout=10)
    _agreed_within(running, lambda r: QUOTA_PROVIDER in _route(r, transactional), "the quota provider")
    senders = [r.name for r in running.config.replicas_of("sender")]
    before = [running.metric(s, "esp_sender_attempts_total", provider=QUOTA_PROVIDER, outcome="accepted")
              for s in senders]
    try:
        records, _, _ = asyncio.run(_send_phase(running, phase, 5 * QUOTA, ("transactional",), mixed=False,
                                                rate=15))
        _judge(running, phase, since, records)
        ids = {r.message_id for r in records}
        assert _takes(running, QUOTA_PROVIDER, ids) == QUOTA
        by_sender = [running.metric(s, "esp_sender_attempts_total", provider=QUOTA_PROVIDER, outcome="accepted")
                     - b for s, b in zip(senders, before, strict=True)]
        # Both senders sent to it, and together no more than its quota: they counted against one counter.
        assert sum(by_sender) == QUOTA and min(by_sender) > 0, by_sender
        for index in range(2):
            assert _route(running.router(index), transactional)[QUOTA_PROVIDER].remaining_daily_quota == 0
    finally:
        with grpc.insecure_channel(running.router(0)) as channel:
            providers_pb2_grpc.ProviderServiceStub(channel).DeleteProvider(
                providers_pb2.DeleteProviderRequest(name=f"providers/{QUOTA_PROVIDER}"), timeout=10)


def test_a_failing_provider_trips_one_breaker_that_both_senders_obey(replica_mesh: ReplicaMesh) -> None:
    running, since = replica_mesh, _since()
    transactional = common_pb2.MESSAGE_CLASS_TRANSACTIONAL
    senders = [r.name for r in running.config.replicas_of("sender")]
    running.knobs(CHEAPEST, outage=True)
    try:
        records, _, _ = asyncio.run(_send_phase(running, "breaker-trip", 30, ("transactional",), mixed=False,
                                                rate=15))
        _judge(running, "breaker-trip", since, records)
        wait_for_progress(lambda: [_route(running.router(i), transactional)[CHEAPEST].breaker_state
                                   for i in range(2)],
                          lambda states: states == ["open", "open"], what=f"{CHEAPEST}'s breaker open on both routers",
                          stall_s=STALL_S)

        def calls_to(provider: str, outcome: str | None = None) -> list[float]:
            labels = {"provider": provider, **({"outcome": outcome} if outcome else {})}
            return [running.metric(s, "esp_sender_attempts_total", **labels) for s in senders]

        failing_before, fallback_before = calls_to(CHEAPEST), calls_to(FALLBACK, "accepted")
        since = _since()
        records, _, _ = asyncio.run(_send_phase(running, "breaker-open", 30, ("transactional",), mixed=False,
                                                rate=15))
        _judge(running, "breaker-open", since, records)
        # Neither sender called the failing provider while its breaker was open; both kept sending elsewhere.
        assert calls_to(CHEAPEST) == failing_before
        assert _takes(running, CHEAPEST, {r.message_id for r in records}) == 0
        assert all(after > before for after, before in zip(calls_to(FALLBACK, "accepted"), fallback_before,
                                                           strict=True)), (fallback_before,
                                                                           calls_to(FALLBACK, "accepted"))
    finally:
        running.knobs(CHEAPEST, outage=False)
