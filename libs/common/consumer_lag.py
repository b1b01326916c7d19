"""JetStream consumer lag as Prometheus gauges, polled by the service that owns each durable consumer.

JetStream knows each consumer's backlog (``num_pending``: stored messages the consumer has not been given yet) and
its messages in flight (``num_ack_pending``: given, not yet acked), but Prometheus cannot ask NATS for them without
a separate exporter. Each consuming service polls the consumers it runs instead, a few times a minute (one
``CONSUMER.INFO`` request each), so the alert on a growing backlog needs nothing beside the mesh's own metrics.
Every replica of a service reports the same numbers for a consumer it shares: aggregate with ``max by (consumer)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from prometheus_client import Gauge

from libs.common.stopping import pause_unless_stopped

__all__ = [
    "CONSUMER_ACK_PENDING",
    "CONSUMER_PENDING",
    "DEFAULT_INTERVAL_S",
    "record_consumer_lag",
    "watch_consumer_lag",
]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 15.0
"""As often as Prometheus usually scrapes: polling faster would only show the same value twice."""

CONSUMER_PENDING = Gauge(
    "esp_jetstream_consumer_pending", "Messages stored for a durable consumer and not yet delivered to it",
    ["consumer"])
CONSUMER_ACK_PENDING = Gauge(
    "esp_jetstream_consumer_ack_pending", "Messages delivered to a durable consumer and not yet acknowledged",
    ["consumer"])


async def record_consumer_lag(js: JetStreamContext, consumers: Sequence[tuple[str, str]]) -> None:
    """Ask JetStream for each ``(stream, durable)`` consumer's backlog and set its gauges (labelled by durable).

    A consumer that cannot be read keeps its last values (and the failure is logged): a NATS hiccup must not read
    as an empty backlog."""
    for stream, durable in consumers:
        try:
            info = await js.consumer_info(stream, durable)
        except Exception:
            log.warning("could not read consumer %s on %s", durable, stream, exc_info=True)
            continue
        CONSUMER_PENDING.labels(durable).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(durable).set(info.num_ack_pending or 0)


async def watch_consumer_lag(js: JetStreamContext, consumers: Sequence[tuple[str, str]], stop: asyncio.Event,
                             interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """:func:`record_consumer_lag` every ``interval_s`` until ``stop`` is set."""
    while not stop.is_set():
        await record_consumer_lag(js, consumers)
        await pause_unless_stopped(stop, interval_s)
