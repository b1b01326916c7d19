"""``python -m services.ledger.settlement_worker``: the ledger's settlement worker (started by the ledger service;
see ``libs.common.workers``). It consumes final outcome events (:mod:`services.ledger.outcome_consumer`) and
settles their holds (:mod:`services.ledger.outcomes`) — sent commits the hold, failed releases it — one JetStream
batch per transaction.

Settling is background work and a campaign brings a burst of it: 10,000 outcomes in a few seconds. In the
ledger's own process it shared an event loop and a CPU priority with the reserves that every accept waits for;
here it has a loop of its own and runs ``settlement_niceness`` nicer, so on a busy machine the accept path gets
the CPU first and settling catches up afterwards.
"""

from __future__ import annotations

from libs.common import db
from libs.common.consumer_lag import watch_consumer_lag
from libs.common.jetstream import Topology, connect, ensure_pull_consumer, pull_loop
from libs.common.workers import StopEvent, WorkerParts, run_worker
from services.ledger.config import LedgerSettings
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.outcome_consumer import OutcomeConsumer


async def build_settlement(settings: LedgerSettings) -> WorkerParts:
    """The outcome consumer with its own database pool and NATS connection."""
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    pool = await db.create_pool(settings.postgres_dsn, min_size=1, max_size=2, name="ledger-settlement")
    ledger = Ledger(pool, LedgerOptions(default_hold_ttl_s=settings.hold_ttl_s))
    nc = await connect(settings.nats_url, "esp-ledger-settlement")
    durable = topology.consumer("ledger-final")
    await ensure_pull_consumer(nc.jetstream(), topology.events_stream, durable, topology.final_events_wildcard,
                               ack_wait_s=settings.settlement_ack_wait_s)
    consumer = OutcomeConsumer(ledger)

    async def consume(stop: StopEvent) -> None:
        await pull_loop(nc, topology.events_stream, durable, consumer.handle, stop, batch=settings.outcome_batch_size,
                        idle_timeout_s=0.5)

    async def report_lag(stop: StopEvent) -> None:
        await watch_consumer_lag(nc.jetstream(), [(topology.events_stream, durable)], stop)

    async def close_all() -> None:
        await ledger.close()
        await nc.drain()
        await pool.close()

    return WorkerParts(tasks=[consume, report_lag], closers=[close_all])


def main() -> None:
    """Run the settlement worker process (``python -m services.ledger.settlement_worker``)."""
    run_worker(LedgerSettings, build_settlement, name=lambda _settings: "ledger-settlement",
               niceness=lambda settings: settings.settlement_niceness)


if __name__ == "__main__":
    main()
