"""A whole mesh as processes, the provider simulator as its providers, for campaign tests.

``wait_until`` waits on progress (``tests.progress``): it fails when what it watches stops moving, not when a fixed
deadline passes on a machine slower today than it was yesterday.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from esp.v1 import campaigns_pb2, campaigns_pb2_grpc, common_pb2, credits_pb2, credits_pb2_grpc

from dev import mesh as m
from dev import seed
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.simulator.model import default_personalities
from libs.common.db import migrate_services
from tests.conftest import S3Server
from tests.progress import wait_for_progress

_UNFINISHED = frozenset({campaigns_pb2.CAMPAIGN_STATE_SCHEDULED, campaigns_pb2.CAMPAIGN_STATE_RUNNING,
                         campaigns_pb2.CAMPAIGN_STATE_PAUSED})

PROVIDER = "mailgun-us"
"""The one provider the campaign mesh sends through (Mailgun: it has a batch API)."""


@dataclass
class CampaignMesh:
    """A started mesh, its simulator, and helpers to run campaigns on it."""

    mesh: m.Mesh
    config: m.MeshConfig
    simulator_url: str
    api_key: str
    tenant: str
    tenants: dict[str, str] = field(default_factory=dict)
    """Tenant id by API key."""
    since: int = 0
    """The simulator's last request when this view was made: what it saw before is another module's."""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.ports['ingest']}"

    def auth(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.api_key}"),)

    def campaigns(self) -> tuple[grpc.Channel, campaigns_pb2_grpc.CampaignServiceStub]:
        channel = grpc.insecure_channel(self.endpoint)
        return channel, campaigns_pb2_grpc.CampaignServiceStub(channel)

    def new_tenant(self, credits: int) -> tuple[str, str]:
        """A fresh tenant with ``credits``: (tenant id, API key)."""
        tenant = f"t-{secrets.token_hex(4)}"
        with grpc.insecure_channel(self.endpoint) as channel:
            seed.ensure_tenant(channel, self.config.admin_token, tenant)
            key = seed.create_api_key(channel, self.config.admin_token, tenant)
            if credits:
                seed.top_up(channel, self.config.admin_token, tenant, credits, f"{tenant}-initial")
        self.tenants[key] = tenant
        return tenant, key

    def top_up(self, tenant: str, credits: int) -> None:
        with grpc.insecure_channel(self.endpoint) as channel:
            seed.top_up(channel, self.config.admin_token, tenant, credits, secrets.token_hex(8))

    def balance(self, key: str) -> credits_pb2.Balance:
        with grpc.insecure_channel(self.endpoint) as channel:
            tenant = self.tenant_of(key)
            return credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
                credits_pb2.GetBalanceRequest(tenant=f"tenants/{tenant}"), metadata=self.auth(key), timeout=10)

    def tenant_of(self, key: str) -> str:
        return self.tenants[key]

    def for_module(self) -> CampaignMesh:
        """A view of the same mesh for one test module: a tenant of its own (credits, suppressions, webhooks,
        events) and the simulator's requests from now on."""
        view = replace(self, tenants={}, since=self._last_request())
        view.tenant, view.api_key = view.new_tenant(10_000_000)
        return view

    def cancel_unfinished(self) -> None:
        """Cancel this view's campaigns still scheduled, running or paused, so they do not drain into the next
        module's time."""
        channel, stub = self.campaigns()
        with channel:
            for key in self.tenants:
                listed = stub.ListCampaigns(campaigns_pb2.ListCampaignsRequest(page_size=1000),
                                            metadata=self.auth(key), timeout=10)
                for c in listed.campaigns:
                    if c.state in _UNFINISHED:
                        with contextlib.suppress(grpc.RpcError):  # finished meanwhile
                            stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=c.name),
                                                metadata=self.auth(key), timeout=10)

    def _last_request(self) -> int:
        newest = self.sim("/_sim/requests", since=self.since, limit=1)
        return int(newest[-1]["seq"]) if newest else self.since

    def sim(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.simulator_url}{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def knobs(self, **values: Any) -> None:
        httpx.patch(f"{self.simulator_url}/_sim/personalities/{PROVIDER}/knobs", json=values,
                    timeout=10).raise_for_status()

    def provider_calls(self) -> int:
        """How many requests the simulated providers took so far: it grows while the mesh sends, so it is the
        ``progress`` of a wait for sending to get somewhere (``wait_until``)."""
        personalities = self.sim("/_sim/stats")["personalities"]
        return sum(int(counts["requests"]) for counts in personalities.values())

    def delivered(self, campaign_tag: str) -> list[dict[str, Any]]:
        """Every message the simulator took that carries ``campaign_tag`` (each campaign in a test has its own)."""
        found: list[dict[str, Any]] = []
        since = self.since
        while True:
            records = self.sim("/_sim/requests", since=since)  # (limit= would keep the newest, not the first)
            if not records:
                return found
            since = records[-1]["seq"]
            for record in records:
                if not record["delivered"]:
                    continue
                found.extend(message for message in record["messages"]
                             if message["rejection"] is None and campaign_tag in message.get("tags", []))

    def requests_with(self, campaign_tag: str) -> list[dict[str, Any]]:
        """Provider requests that carried at least one message of ``campaign_tag``, oldest first."""
        found: list[dict[str, Any]] = []
        since = self.since
        while True:
            records = self.sim("/_sim/requests", since=since)
            if not records:
                return found
            since = records[-1]["seq"]
            found.extend(r for r in records if any(campaign_tag in msg.get("tags", []) for msg in r["messages"]))


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1, *,
               progress: Callable[[], Any] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true, and return that.

    ``timeout_s`` is a stall window, not a deadline: the wait fails, naming ``what`` and the last value, once
    neither the predicate's value nor ``progress()`` (when given: a count that grows while the mesh works towards
    the condition, e.g. the emails the simulator took) has changed for that long. While they keep changing it goes
    on, up to ``tests.progress.CAP_FACTOR`` windows."""

    def look() -> tuple[Any, Any]:
        return predicate(), progress() if progress is not None else None

    value, _ = wait_for_progress(look, lambda seen: bool(seen[0]), what=what, stall_s=timeout_s, every_s=every_s,
                                 describe=lambda seen: repr(seen[0]) if progress is None else
                                 f"{seen[0]!r}, progress {seen[1]!r}")
    return value


def campaign(tag: str, **fields: Any) -> campaigns_pb2.Campaign:
    """A campaign with sensible defaults; ``tag`` tells its emails apart at the simulator."""
    values: dict[str, Any] = {
        "display_name": tag, "subject": "Hello {{ first_name }}", "text_body": "Hi {{ first_name }}, code {{ code }}",
        "tags": [tag],
    }
    values.update(fields)
    c = campaigns_pb2.Campaign(**values)
    getattr(c, "from").CopyFrom(common_pb2.EmailAddress(email="news@example.com", name="News"))
    return c


def recipients_frames(name: str, count: int, *, start: int = 0, per_frame: int = 500,
                      domain: str = "example.org") -> Iterator[campaigns_pb2.AddCampaignRecipientsRequest]:
    """Frames of ``count`` recipients r<i>@domain with first_name and code variables."""
    for offset in range(start, start + count, per_frame):
        yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=name, recipients=[
            campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email=f"r{i}@{domain}"),
                                            variables={"first_name": f"Name{i}", "code": f"C{i:06d}"})
            for i in range(offset, min(offset + per_frame, start + count))])


def create_and_fill(stub: campaigns_pb2_grpc.CampaignServiceStub, auth: Sequence[tuple[str, str]],
                    c: campaigns_pb2.Campaign, count: int, domain: str = "example.org") -> campaigns_pb2.Campaign:
    created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=c), metadata=auth, timeout=10)
    added = stub.AddCampaignRecipients(recipients_frames(created.name, count, domain=domain), metadata=auth,
                                       timeout=120)
    assert added.added_count == count, added
    return created


def progress(stub: campaigns_pb2_grpc.CampaignServiceStub, auth: Sequence[tuple[str, str]],
             name: str) -> campaigns_pb2.Campaign:
    return stub.GetCampaign(campaigns_pb2.GetCampaignRequest(name=name), metadata=auth, timeout=10)


def start_campaign_mesh(database: str, redis_url: str, nats_url: str, s3: S3Server, namespace: str,
                        log_dir: Path, extra_env: dict[str, str] | None = None,
                        provider_webhooks: bool = False) -> CampaignMesh:
    """The mesh; with ``provider_webhooks``, the simulated provider also posts its signed delivery webhooks to
    reports (secrets set through the admin RPC), so messages reach ``delivered``."""
    sim_http = m.free_port()
    # The request log must hold every request of a test's campaigns (the default keeps the last 5,000).
    sim_proc, description = m.start_simulator(sim_http, m.free_port(), log_dir, extra_args=("--log-cap", "1000000"))
    config = m.MeshConfig(
        postgres_dsn=database, redis_url=redis_url, nats_url=nats_url, s3_endpoint=s3.endpoint, namespace=namespace,
        admin_token=secrets.token_hex(16), ports={name: m.free_port() for name in m.GRPC_PORTS},
        gateway_port=m.free_port(), webhook_port=m.free_port(), log_dir=log_dir,
        extra_env={"ESP_S3_BUCKET": f"{namespace}-attachments", "ESP_SHUTDOWN_GRACE_S": "3", **(extra_env or {})})
    asyncio.run(migrate_services(database, SERVICES_WITH_SCHEMAS))
    mesh = m.Mesh(config)
    mesh.processes["simulator"] = sim_proc
    try:
        mesh.start()
        http_url = description["http_url"]
        personality = next(p for p in default_personalities() if p.name == PROVIDER)
        provider = personality.provider_config(http_url, description["smtp_host"], description["smtp_port"])
        knobs: dict[str, object] = {"latency_ms": 0, "jitter_ms": 0}
        webhook_secrets: dict[str, str] = {}
        if provider_webhooks:
            knobs.update(webhook_url=f"http://127.0.0.1:{config.webhook_port}/webhooks/{PROVIDER}",
                         webhook_delay_ms=0, webhook_jitter_ms=0)
            webhook_secrets = httpx.get(f"{http_url}/_sim/personalities/{PROVIDER}", timeout=10).json()["webhooks"][
                "receiver_secrets"]
        with grpc.insecure_channel(f"127.0.0.1:{config.ports['ingest']}") as channel:
            seed.ensure_tenant(channel, config.admin_token, "acme")
            api_key = seed.create_api_key(channel, config.admin_token, "acme")
            seed.top_up(channel, config.admin_token, "acme", 10_000_000, "acme-initial")
            seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                id=PROVIDER, type=personality.type, endpoint=provider.endpoint,
                credentials=dict(provider.credentials), options=dict(provider.options),
                webhook_secrets=webhook_secrets))
        httpx.patch(f"{http_url}/_sim/personalities/{PROVIDER}/knobs", json=knobs, timeout=10).raise_for_status()
    except BaseException:
        mesh.stop()
        raise
    return CampaignMesh(mesh, config, http_url, api_key, "acme", {api_key: "acme"})


@pytest.fixture(scope="module")
def campaign_mesh(shared_campaign_mesh: CampaignMesh) -> Iterator[CampaignMesh]:
    """The session's campaign mesh (``tests/conftest.py``: starting one takes some ten seconds) as one module's own:
    a tenant of its own, the simulator's requests from the module's start, its unfinished campaigns cancelled
    at the end."""
    view = shared_campaign_mesh.for_module()
    yield view
    view.cancel_unfinished()


def bulk_price(running: CampaignMesh, key: str) -> int:
    """What one bulk email costs the tenant of ``key``."""
    with grpc.insecure_channel(running.endpoint) as channel:
        book = credits_pb2_grpc.CreditServiceStub(channel).GetPriceBook(
            credits_pb2.GetPriceBookRequest(tenant=f"tenants/{running.tenant_of(key)}"), metadata=running.auth(key),
            timeout=10)
    return int(book.bulk_per_email)
