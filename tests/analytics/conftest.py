"""One whole mesh for the analytics module (``start_campaign_mesh``: every service as a process, the provider
simulator as its providers, signed delivery webhooks back to reports), two tenants, three priced providers, and the
traffic of ``traffic.py`` sent through the public REST edge, phase by phase, with the simulator's faults."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from esp.v1 import (
    credits_pb2,
    credits_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    reports_pb2_grpc,
)

from dev import mesh as m
from dev.simulator import signing
from libs.common.message_classes import MessageClass
from libs.providers.events import BounceType, DeliveryEvent, EventKind
from tests.analytics.traffic import (
    BOUNCE_TYPES,
    PROVIDERS,
    TIMELINES,
    Outcome,
    PlannedEmail,
    SentEmail,
    TimelineEvent,
    planned_phases,
)
from tests.campaigns.conftest import CampaignMesh, start_campaign_mesh
from tests.conftest import S3Server
from tests.progress import wait_for_progress

M = messages_pb2
T = TypeVar("T")
STALL_S = 45.0
"""A wait for an email's events (or the stats) fails when what it watches has not moved for this long, naming what
it missed; it waits on for as long as they keep moving (``tests.progress``)."""
_SENT_OR_LATER = {M.MESSAGE_STATE_SENT, M.MESSAGE_STATE_DELIVERED, M.MESSAGE_STATE_BOUNCED,
                  M.MESSAGE_STATE_COMPLAINED}


@dataclass
class AnalyticsMesh:
    """The running mesh and the handles the analytics tests use."""

    running: CampaignMesh
    channel: grpc.Channel
    tenant_ids: dict[str, str]
    """Tenant id by label ("A", "B")."""
    keys: dict[str, str]
    """API key by label."""

    @property
    def admin_token(self) -> str:
        return self.running.config.admin_token

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.running.config.gateway_port}"

    @property
    def webhook_base(self) -> str:
        return f"http://127.0.0.1:{self.running.config.webhook_port}/webhooks"

    @property
    def stats(self) -> reports_pb2_grpc.StatsServiceStub:
        return reports_pb2_grpc.StatsServiceStub(self.channel)

    @property
    def messages(self) -> messages_pb2_grpc.MessageServiceStub:
        return messages_pb2_grpc.MessageServiceStub(self.channel)

    def auth(self, label: str) -> tuple[tuple[str, str], ...]:
        """Metadata of a tenant's API key."""
        return (("authorization", f"Bearer {self.keys[label]}"),)

    def admin(self) -> tuple[tuple[str, str], ...]:
        """Metadata of the platform admin token."""
        return (("authorization", f"Bearer {self.admin_token}"),)

    def rest(self, token: str) -> httpx.Client:
        """A REST client of the gateway authenticated with ``token``."""
        return httpx.Client(base_url=self.gateway_url, headers={"authorization": f"Bearer {token}"}, timeout=30)

    def sim(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.running.simulator_url}{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def knobs(self, provider: str, **values: Any) -> None:
        httpx.patch(f"{self.running.simulator_url}/_sim/personalities/{provider}/knobs", json=values,
                    timeout=10).raise_for_status()


def _configure_providers(mesh: CampaignMesh, channel: grpc.Channel) -> None:
    """Each planned provider in the catalog (its class only, its prices, the simulator's webhook secrets) and its
    simulator personality answering after its latency and posting delivery webhooks at once."""
    described = {p["name"]: p for p in httpx.get(f"{mesh.simulator_url}/_sim/personalities", timeout=10).json()}
    stub = providers_pb2_grpc.ProviderServiceStub(channel)
    admin = (("authorization", f"Bearer {mesh.config.admin_token}"),)
    for plan in PROVIDERS.values():
        personality = described[plan.name]
        credentials = personality["credentials"]
        endpoint = f"{mesh.simulator_url}/p/{plan.name}"
        if personality["type"] == "mailgun":
            credentials, options = {"api_key": credentials["api_key"]}, {"domain": credentials["domain"]}
        elif personality["type"] == "sendgrid":
            credentials, options = {"api_key": credentials["api_key"]}, {}
        else:
            credentials, options = {"server_token": credentials["server_token"]}, {}
        provider = providers_pb2.Provider(
            type=personality["type"], display_name=plan.name, endpoint=endpoint, credentials=credentials,
            options=options, webhook_secrets=personality["webhooks"]["receiver_secrets"],
            price_per_email_micros=plan.price_per_email_micros, price_per_mb_micros=plan.price_per_mb_micros,
            allowed_classes=[MessageClass(plan.message_class).proto], weight=1.0)
        try:
            stub.CreateProvider(providers_pb2.CreateProviderRequest(provider_id=plan.name, provider=provider),
                                metadata=admin, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # mailgun-us: the campaign mesh made it
                raise
            provider.name = f"providers/{plan.name}"
            stub.UpdateProvider(providers_pb2.UpdateProviderRequest(provider=provider), metadata=admin, timeout=10)


def _phase_knobs(mesh: AnalyticsMesh, outcome: Outcome) -> None:
    """Set every personality for one fate: the latency of its plan, webhooks at once, bounce and complaint
    rates of 0 or 1; for soft bounces Mailgun posts no webhook (the test posts the soft bounce)."""
    for plan in PROVIDERS.values():
        webhook: str | None = f"{mesh.webhook_base}/{plan.name}"
        if outcome is Outcome.SOFT_BOUNCE and plan.name == "mailgun-us":
            webhook = None
        mesh.knobs(plan.name, latency_ms=plan.latency_ms, jitter_ms=0, webhook_url=webhook, webhook_delay_ms=0,
                   webhook_jitter_ms=0, error_rate=0, bounce_rate=1.0 if outcome is Outcome.HARD_BOUNCE else 0.0,
                   complaint_rate=1.0 if outcome is Outcome.COMPLAINT else 0.0)


def _wait_each(mesh: AnalyticsMesh, sent: Sequence[tuple[PlannedEmail, str]],
               ready: Callable[[PlannedEmail, str], T | None], what: str, stall_s: float = STALL_S) -> list[T]:
    """``ready(email, message_id)`` of every sent email once none is None, in order. Only the emails not ready yet
    are looked at again; the wait fails when no more of them became ready for ``stall_s``, naming (and describing)
    the first that is not."""
    found: dict[int, T] = {}

    def look() -> int:
        for index, (email, message_id) in enumerate(sent):
            if index not in found and (value := ready(email, message_id)) is not None:
                found[index] = value
        return len(found)

    def first_missing(count: int) -> str:
        index = next(i for i in range(len(sent)) if i not in found)
        email, message_id = sent[index]
        return (f"{count} of {len(sent)}; not yet {email.recipient} ({message_id}, {email.outcome}):\n"
                f"{_describe(mesh, email.tenant, message_id)}")

    wait_for_progress(look, lambda count: count == len(sent), what=f"{what} for all {len(sent)} emails",
                      stall_s=stall_s, every_s=0.2, describe=first_missing)
    return [found[index] for index in range(len(sent))]


def _get(mesh: AnalyticsMesh, label: str, message_id: str) -> messages_pb2.Message:
    return mesh.messages.GetMessage(M.GetMessageRequest(name=f"messages/{message_id}"), metadata=mesh.auth(label),
                                    timeout=10)


def _taken_by_a_provider(mesh: AnalyticsMesh, email: PlannedEmail, message_id: str) -> bool | None:
    """True once a provider has taken the email (state SENT or later); None before, and while reports has not yet
    recorded it at all (its read model learns of an accepted email from the event stream, a moment after the send
    call answered)."""
    try:
        return True if _get(mesh, email.tenant, message_id).state in _SENT_OR_LATER else None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _timeline(mesh: AnalyticsMesh, label: str, message_id: str) -> list[messages_pb2.MessageEvent]:
    reply = mesh.messages.ListMessageEvents(M.ListMessageEventsRequest(parent=f"messages/{message_id}",
                                                                       page_size=100),
                                            metadata=mesh.auth(label), timeout=10)
    assert not reply.next_page_token
    return list(reply.events)


def _send_phase(mesh: AnalyticsMesh, emails: Sequence[PlannedEmail]) -> list[tuple[PlannedEmail, str]]:
    """Send every email over REST; wait until a provider has taken each (state SENT or later)."""
    sent: list[tuple[PlannedEmail, str]] = []
    clients = {label: mesh.rest(key) for label, key in mesh.keys.items()}
    try:
        for email in emails:
            response = clients[email.tenant].post("/v1/messages:send", json=email.rest_body(str(uuid.uuid4())))
            assert response.status_code == 200, response.text
            sent.append((email, response.json()["message"]["id"]))
    finally:
        for client in clients.values():
            client.close()
    _wait_each(mesh, sent, partial(_taken_by_a_provider, mesh), "taken by a provider")
    return sent


def _describe(mesh: AnalyticsMesh, label: str, message_id: str) -> str:
    """A message and its timeline, for a failure's message."""
    events = "\n".join(f"  {M.MessageEventType.Name(e.type)} {e.provider} {e.reason} {e.outcome} {e.attributes}"
                       for e in _timeline(mesh, label, message_id))
    return f"{_get(mesh, label, message_id)}\n{events}"


def _post_soft_bounce(mesh: AnalyticsMesh, email: PlannedEmail, message: messages_pb2.Message,
                      signing_key: str) -> None:
    """Mailgun's signed "failed" callback of a soft bounce (reason "old": gave up after retrying for days)."""
    event = DeliveryEvent(kind=EventKind.BOUNCED, provider_type="mailgun", provider_name=email.provider,
                          recipient=email.recipient, occurred_at=datetime.now(UTC), event_id=str(uuid.uuid4()),
                          provider_message_id=message.provider_message_id, message_id=message.id,
                          bounce_type=BounceType.SOFT)
    callback = signing.mailgun_callback(event, signing_key)
    response = httpx.post(f"{mesh.webhook_base}/{email.provider}", content=callback.body, headers=callback.headers,
                          timeout=10)
    assert 200 <= response.status_code < 300, response.text


def _complete_timeline(mesh: AnalyticsMesh, email: PlannedEmail, message_id: str) -> list[TimelineEvent] | None:
    """The email's timeline once it holds every event its planned fate brings (and nothing else), else None."""
    events = [TimelineEvent.of(e) for e in _timeline(mesh, email.tenant, message_id)]
    return events if Counter(e.type for e in events) == TIMELINES[email.outcome] else None


@dataclass(frozen=True)
class Traffic:
    """What was sent and what became of it."""

    emails: tuple[SentEmail, ...]
    start: datetime
    """A minute boundary before the first email was accepted."""
    end: datetime
    """A minute boundary after the last event."""
    price_books: Mapping[str, credits_pb2.PriceBook]
    """Each tenant's prices, by label."""
    simulator_callbacks: Mapping[str, list[str]]
    """Delivery webhooks the simulator posted and reports took, by message id (sorted kinds)."""
    simulator_provider: Mapping[str, str]
    """Which personality took each message, by message id, per the simulator's request log."""

    def cost(self, email: SentEmail) -> int:
        """What the provider charged for ``email`` per the catalog prices."""
        return PROVIDERS[email.provider].cost_micros(email.plan.message_bytes())

    def of(self, label: str, mesh: AnalyticsMesh) -> list[SentEmail]:
        return [e for e in self.emails if e.tenant_id == mesh.tenant_ids[label]]


def _send_traffic(mesh: AnalyticsMesh) -> Traffic:
    run = secrets.token_hex(3)
    signing_key = mesh.sim("/_sim/personalities/mailgun-us")["webhooks"]["receiver_secrets"]["webhook_signing_key"]
    first = datetime.now(UTC)
    sent: list[tuple[PlannedEmail, str]] = []
    for outcome, emails in planned_phases(run):
        _phase_knobs(mesh, outcome)
        phase = _send_phase(mesh, emails)
        if outcome is Outcome.SOFT_BOUNCE:
            for email, message_id in phase:
                _post_soft_bounce(mesh, email, _get(mesh, email.tenant, message_id), signing_key)
        sent += phase
    _phase_knobs(mesh, Outcome.DELIVERED)
    taken: list[SentEmail] = []
    timelines = _wait_each(mesh, sent, partial(_complete_timeline, mesh), "a complete timeline")
    for (email, message_id), events in zip(sent, timelines, strict=True):
        message = _get(mesh, email.tenant, message_id)
        bounce_types = {e.bounce_type for e in events if e.type == M.MESSAGE_EVENT_TYPE_BOUNCED}
        assert bounce_types == ({BOUNCE_TYPES[email.outcome]} if email.outcome in BOUNCE_TYPES else set()), events
        taken.append(SentEmail(email, mesh.tenant_ids[email.tenant], message_id, message.provider, message.credits,
                               message.create_time.ToDatetime(tzinfo=UTC), tuple(events)))
    callbacks: dict[str, list[str]] = {}
    for entry in mesh.sim("/_sim/webhooks"):
        if entry["status"] is not None and 200 <= entry["status"] < 300 and entry["esp_message_id"]:
            callbacks.setdefault(entry["esp_message_id"], []).append(entry["kind"])
    providers: dict[str, str] = {}
    for record in mesh.sim("/_sim/requests"):
        if record["delivered"]:
            for message in record["messages"]:
                if message["rejection"] is None and message["esp_message_id"]:
                    providers[message["esp_message_id"]] = record["personality"]
    books = {}
    credits = credits_pb2_grpc.CreditServiceStub(mesh.channel)
    for label, tenant_id in mesh.tenant_ids.items():
        books[label] = credits.GetPriceBook(credits_pb2.GetPriceBookRequest(tenant=f"tenants/{tenant_id}"),
                                            metadata=mesh.auth(label), timeout=10)
    last = max(e.time for email in taken for e in email.events)
    return Traffic(tuple(taken), first.replace(second=0, microsecond=0) - timedelta(minutes=1),
                   last.replace(second=0, microsecond=0) + timedelta(minutes=2), books,
                   {k: sorted(v) for k, v in callbacks.items()}, providers)


TENANT_B_PRICES = {"otp_per_email": 7, "transactional_per_email": 5, "bulk_per_email": 3}
"""Tenant B's own prices, unlike the defaults tenant A pays, so that credits tell the tenants apart."""


@pytest.fixture(scope="module")
def analytics_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server,
                   run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnalyticsMesh]:
    """The mesh with tenants A and B (an API key each, credits; B with its own price book) and the providers of
    the plan."""
    namespace = f"{run_id}a{secrets.token_hex(2)}"
    running = start_campaign_mesh(new_database(), redis_url, nats_url, s3_server, namespace,
                                  tmp_path_factory.mktemp("analytics-mesh-logs"), provider_webhooks=True)
    channel = grpc.insecure_channel(running.endpoint)
    try:
        _configure_providers(running, channel)
        labels: dict[str, str] = {}
        keys: dict[str, str] = {}
        for label in ("A", "B"):
            labels[label], keys[label] = running.new_tenant(1_000_000)
        credits_pb2_grpc.CreditServiceStub(channel).UpdatePriceBook(credits_pb2.UpdatePriceBookRequest(
            price_book=credits_pb2.PriceBook(tenant=f"tenants/{labels['B']}", **TENANT_B_PRICES)),
            metadata=(("authorization", f"Bearer {running.config.admin_token}"),), timeout=10)
        yield AnalyticsMesh(running, channel, labels, keys)
    finally:
        channel.close()
        running.mesh.stop()
        asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


@pytest.fixture(scope="module")
def traffic(analytics_mesh: AnalyticsMesh) -> Traffic:
    """The plan's emails sent and settled: every timeline complete."""
    return _send_traffic(analytics_mesh)
