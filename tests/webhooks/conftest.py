"""A whole mesh (the simulator as providers) with fast webhook retries, and a local receiver."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import pytest

from dev import mesh as m
from tests.campaigns.conftest import CampaignMesh, start_campaign_mesh
from tests.conftest import S3Server
from tests.webhooks.receiver import Receiver, running_receiver

RETRY_SCHEDULE = "0,1,2,3,4,5"
"""Tries at once, then every second (offsets from the first try; a day in all in production)."""


@pytest.fixture(scope="module")
def webhook_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[CampaignMesh]:
    namespace = f"{run_id}w{secrets.token_hex(2)}"
    running = start_campaign_mesh(
        new_database(), redis_url, nats_url, s3_server, namespace, tmp_path_factory.mktemp("webhook-mesh-logs"),
        extra_env={"ESP_WEBHOOK_RETRY_SCHEDULE_S": RETRY_SCHEDULE, "ESP_WEBHOOK_RETRY_JITTER": "0",
                   "ESP_WEBHOOK_TIMEOUT_S": "2", "ESP_WEBHOOK_DISABLE_AFTER_S": "3600"},
        provider_webhooks=True)
    yield running
    running.mesh.stop()
    asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()
