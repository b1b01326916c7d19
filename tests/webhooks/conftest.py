"""A whole mesh (the simulator as providers) with fast webhook retries, and a local receiver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.campaigns.conftest import CampaignMesh
from tests.webhooks.receiver import Receiver, running_receiver

RETRY_SCHEDULE = "0,1,2,3,4,5"
"""Tries at once, then every second (offsets from the first try; a day in all in production)."""

WEBHOOK_ENV = {"ESP_WEBHOOK_RETRY_SCHEDULE_S": RETRY_SCHEDULE, "ESP_WEBHOOK_RETRY_JITTER": "0",
               "ESP_WEBHOOK_TIMEOUT_S": "2", "ESP_WEBHOOK_DISABLE_AFTER_S": "3600"}
"""The settings of the session's webhook mesh: fast retries, a short timeout."""


@pytest.fixture(scope="module")
def webhook_mesh(shared_webhook_mesh: CampaignMesh) -> Iterator[CampaignMesh]:
    """The session's webhook mesh (``tests/conftest.py`` starts it with ``WEBHOOK_ENV`` and the provider's webhooks
    on) as one module's own."""
    view = shared_webhook_mesh.for_module()
    yield view
    view.cancel_unfinished()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()
