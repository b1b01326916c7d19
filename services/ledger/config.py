"""Ledger settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive


@dataclass(frozen=True)
class LedgerSettings(CommonSettings):
    """The ledger service's settings (``ESP_*`` variables)."""

    hold_ttl_s: float = 86_400.0
    """Default life of a hold that is neither committed nor released."""
    sweep_interval_s: float = 1.0
    """How often expired holds are returned."""
    reserve_batch_size: int = 1000
    """Most reserves grouped in one transaction."""
    reserve_workers: int = 4
    """Reserve transactions in flight at once."""
    reserve_synchronous_commit: bool = True
    """False: a reserve's commit does not wait for its WAL flush, which takes one of the two flushes (1-3 ms, more
    while a campaign's settlements write) off every accept's critical path. Safe only when ingest's database is on
    the same Postgres server as the ledger's: Postgres has one WAL, ingest commits the message after the reserve
    answered, and that commit's flush makes the earlier hold durable too — so an email is accepted only with a
    durable hold, and a crash before ingest's commit loses an unanswered hold, never a charge. The dev mesh, the
    benchmarks and the Helm chart run both on one server and turn it off; keep it on when they are apart."""
    outcome_batch_size: int = 500
    """Final outcome events settled per transaction (a backlog goes by in full batches). Larger batches cost less
    CPU per event; they hold no lock a reserve needs (commits count on the tenant's commit total, not its balance
    row) and run on the settlement worker's own event loop."""
    processed_event_retention_s: float = 8 * 86_400.0
    """How long an applied outcome event's id is kept to recognise a redelivery: longer than the EVENTS stream's
    retention (7 days), after which no redelivery can happen."""
    settlement_worker: bool = True
    """Settle outcomes in a worker process of its own (``services.ledger.settlement_worker``) rather than on the event
    loop that answers reserves, which every accept waits for."""
    settlement_ack_wait_s: float = 30.0
    """JetStream redelivers a final outcome event to the settlement worker when it was not acked within this long
    (a worker killed mid-batch, or an ack lost with a NATS node): the longest a hold can wait for its settlement
    after such a loss."""
    settlement_niceness: int = 10
    """How much nicer (lower CPU priority) the settlement worker runs than the ledger: on a busy machine a
    campaign's settlement yields the CPU to the accept path and catches up afterwards."""

    def __post_init__(self) -> None:
        check_positive(self, "hold_ttl_s", "sweep_interval_s", "reserve_batch_size", "reserve_workers",
                       "outcome_batch_size", "processed_event_retention_s", "settlement_ack_wait_s")
        if not 0 <= self.settlement_niceness <= 19:
            raise ValueError(f"ESP_SETTLEMENT_NICENESS: must be in [0, 19], got {self.settlement_niceness}")
