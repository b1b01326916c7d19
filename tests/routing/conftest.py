"""Fixtures for the routing tests: a health board on real Redis, under a key prefix of its own per test."""

from __future__ import annotations

import secrets

import pytest
import redis.asyncio as aioredis

from libs.routing.health import BreakerPolicy, HealthBoard

FAST_BREAKER = BreakerPolicy(consecutive_failures=3, failure_rate=0.5, min_samples=10, window_s=10, open_s=0.3,
                             probe_timeout_s=0.5)


@pytest.fixture
def board(redis_client: aioredis.Redis, run_id: str) -> HealthBoard:
    """A health board whose keys start with the run id (deleted after the test by ``redis_client``)."""
    return HealthBoard(redis_client, f"{run_id}{secrets.token_hex(3)}", FAST_BREAKER)
