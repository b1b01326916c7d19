"""The retry schedule: offsets from the first try, gaps jittered; Retry-After in both of its forms."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from services.webhooks.config import WebhooksSettings
from services.webhooks.schedule import next_delay, retry_after_s

DEFAULT = WebhooksSettings.webhook_retry_schedule_s


def test_the_default_schedule_retries_for_a_day_at_the_standard_webhooks_times() -> None:
    gaps = [next_delay(DEFAULT, made, 0.0) for made in range(1, len(DEFAULT))]
    assert sum(g for g in gaps if g is not None) == 24 * 3600
    assert gaps[:3] == [5, 295, 1500]


def test_after_the_last_try_there_is_none() -> None:
    assert next_delay(DEFAULT, len(DEFAULT), 0.1) is None


def test_jitter_stays_within_its_fraction_of_the_gap() -> None:
    rng = random.Random(7)
    delays = [next_delay(DEFAULT, 2, 0.1, rng) for _ in range(200)]
    assert all(d is not None and 265.5 <= d <= 324.5 for d in delays)
    assert len({round(d or 0, 3) for d in delays}) > 100


def test_a_schedule_not_starting_at_zero_or_going_back_is_refused() -> None:
    with pytest.raises(ValueError, match="from 0"):
        WebhooksSettings(webhook_retry_schedule_s=(5, 10))
    with pytest.raises(ValueError, match="never decreasing"):
        WebhooksSettings(webhook_retry_schedule_s=(0, 10, 5))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert retry_after_s("120", now) == 120
    assert retry_after_s("Mon, 07 Dec 2026 12:01:00 GMT", now) == 60
    assert retry_after_s("soon", now) is None
