"""Ledger settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive


@dataclass(frozen=True)
class LedgerSettings(CommonSettings):
    hold_ttl_s: float = 86_400.0
    """Default life of a hold that is neither committed nor released."""
    sweep_interval_s: float = 1.0
    """How often expired holds are returned."""
    reserve_batch_size: int = 1000
    """Most reserves grouped in one transaction."""
    reserve_workers: int = 4
    """Reserve transactions in flight at once."""
    outcome_batch_size: int = 100
    """Final outcome events settled per transaction. Settling runs on the event loop that also answers reserves
    (an OTP's accept waits on one), so a batch is kept to a few milliseconds of CPU; a backlog still goes by in
    full batches, each one transaction."""

    def __post_init__(self) -> None:
        check_positive(self, "hold_ttl_s", "sweep_interval_s", "reserve_batch_size", "reserve_workers",
                       "outcome_batch_size")
