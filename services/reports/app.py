"""Assembles the reports service: Postgres, Redis, NATS, the EVENTS consumer, the public HTTP server (provider
webhooks, one-click unsubscribe) and the gRPC servicers, as one :class:`~libs.common.grpc_server.ServiceApp`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from esp.v1 import events_pb2, events_pb2_grpc, messages_pb2, messages_pb2_grpc, reports_pb2, reports_pb2_grpc

from libs.common.auth import TrustedHeaderAuthenticator
from libs.common.db import create_pool, migrate_services
from libs.common.grpc_server import ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.mailbox_providers import MAILBOX_ENV_PREFIX, MailboxClassifier, MailboxProviderSettings
from libs.common.outbox import OutboxPublisher
from libs.common.redis import create_redis
from libs.common.secret_box import optional_secret_box
from libs.common.settings import load_settings
from libs.providers.webhook_model import CertificateFetcher
from libs.providers.webhooks import RedisReplayGuard, WebhookVerifier
from libs.routing.catalog import ProviderCatalog, open_bucket
from libs.routing.health import HealthBoard
from services.reports.config import DEFAULT_GRPC_PORT, ReportsSettings
from services.reports.consumer import ConsumerOptions, EventConsumer
from services.reports.customer_events import OUTBOX_TABLE
from services.reports.event_listing import EventReader
from services.reports.one_click import OneClickUnsubscriber, unsubscribe_routes
from services.reports.provider_comparison import ProviderComparer
from services.reports.provider_secrets import ProviderWebhookSecrets
from services.reports.queries import MessageReader
from services.reports.retention import RetentionWorker
from services.reports.server import EventServicer, MessageReadServicer, StatsServicer, SuppressionServicer
from services.reports.stats import StatsReader
from services.reports.suppressions import SuppressionStore, resync_redis
from services.reports.webhook_receiver import (
    SubscriptionConfirmer,
    WebhookReceiver,
    log_subscription_confirmation,
    serve_http,
)

SERVICE_NAME = "reports"

log = logging.getLogger(__name__)


async def build_app(settings: ReportsSettings, *,
                    confirmer: SubscriptionConfirmer = log_subscription_confirmation,
                    certificate_fetcher: CertificateFetcher | None = None) -> ServiceApp:
    """Connect to everything, prepare schema, streams and Redis, and describe the service for ``serve()``.

    Args:
        settings: the service's settings.
        confirmer: what to do with a verified SNS subscription confirmation (default: log it).
        certificate_fetcher: how SNS signing certificates are fetched (default: HTTPS).
    """
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        if settings.migrate_on_start:
            await migrate_services(settings.postgres_dsn, [SERVICE_NAME])
        pool = await create_pool(settings.postgres_dsn, name=SERVICE_NAME)
        closers.append(pool.close)
        redis = create_redis(settings.redis_url)
        closers.append(redis.aclose)
        nc = await connect(settings.nats_url, f"esp-{SERVICE_NAME}")
        closers.append(nc.close)
        js = nc.jetstream()
        topology = Topology(settings.namespace, replicas=settings.stream_replicas)
        await ensure_streams(js, topology)
        if settings.resync_suppressions_on_start:
            await resync_redis(pool, redis, settings.namespace)
        secrets = optional_secret_box(settings.secrets_keys)
        catalog = ProviderCatalog(await open_bucket(js, settings.namespace), secrets)
        webhook_secrets = ProviderWebhookSecrets(catalog)
        mailboxes = MailboxClassifier(load_settings(MailboxProviderSettings, prefix=MAILBOX_ENV_PREFIX))
        await mailboxes.start()
        closers.append(mailboxes.aclose)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        raise

    notifications = OutboxPublisher(pool, nc, OUTBOX_TABLE)
    consumer = EventConsumer(pool, redis, nc, topology, notifications, ConsumerOptions(
        batch_size=settings.consumer_batch_size,
        batches_in_flight=settings.consumer_batches_in_flight,
        linger_s=settings.consumer_linger_s,
        max_ack_pending=settings.consumer_max_ack_pending,
        ack_wait_s=settings.consumer_ack_wait_s,
        parked_sweep_interval_s=settings.parked_sweep_interval_s,
    ), mailbox_provider_of=mailboxes.classify)
    replay_guard = RedisReplayGuard(redis, key_prefix=f"{settings.namespace or 'esp'}:webhook-replay:")
    receiver = WebhookReceiver(
        pool, js, topology, WebhookVerifier(replay_guard, certificate_fetcher=certificate_fetcher),
        webhook_secrets, confirmer=confirmer,
    )
    if secrets is None:
        log.warning("ESP_SECRETS_KEYS is not set: webhooks of providers with sealed secrets answer 500")
    suppressions = SuppressionStore(pool, redis, settings.namespace)
    unsubscribe_tokens = settings.unsubscribe_tokens()
    if unsubscribe_tokens is None:
        log.warning("ESP_UNSUBSCRIBE_KEYS is not set: every one-click unsubscribe link answers 404")
    stats = StatsReader(pool, minute_retention=timedelta(days=settings.minute_rollup_retention_days))
    retention = RetentionWorker(pool, settings.retention(), interval_s=settings.partition_interval_s)
    webhook_app = receiver.asgi_app(unsubscribe_routes(OneClickUnsubscriber(unsubscribe_tokens, suppressions)))

    async def webhook_server(stop: asyncio.Event) -> None:
        await serve_http(webhook_app, settings.webhook_host, settings.webhook_port, stop)

    return ServiceApp(
        name=SERVICE_NAME,
        default_port=DEFAULT_GRPC_PORT,
        servicers=[
            (messages_pb2_grpc.add_MessageServiceServicer_to_server, MessageReadServicer(MessageReader(pool))),
            (reports_pb2_grpc.add_StatsServiceServicer_to_server, StatsServicer(stats, ProviderComparer(
                stats, catalog, HealthBoard(redis, settings.namespace)))),
            (reports_pb2_grpc.add_SuppressionServiceServicer_to_server,
             SuppressionServicer(suppressions)),
            (events_pb2_grpc.add_EventServiceServicer_to_server, EventServicer(EventReader(pool))),
        ],
        service_names=[
            messages_pb2.DESCRIPTOR.services_by_name["MessageService"].full_name,
            reports_pb2.DESCRIPTOR.services_by_name["StatsService"].full_name,
            reports_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name,
            events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
        ],
        tasks=[consumer.run, consumer.sweep_loop, consumer.report_lag, notifications.run, webhook_server,
               webhook_secrets.run, retention.run],
        closers=closers,
        authenticator=TrustedHeaderAuthenticator(),
    )
