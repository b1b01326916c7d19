"""Ledger throughput: concurrent reserve() calls through the domain API on a throw-away database.

Prints one JSON line per metric, each the median of ``--runs`` runs:

- ``ledger.hot_tenant_reserve_per_s``: every reserve on one tenant (one balance row), group-committed;
- ``ledger.many_tenants_reserve_per_s``: reserves spread over many tenants, group-committed;
- ``ledger.single_row_txn_reserve_per_s``: one tenant, one transaction per reserve (batches of one) — the
  baseline that shows what group commit buys.

Before them it measures the floors (:mod:`bench.floor`) in the same database, and prints each figure against the
Postgres floor as ``<metric>_vs_floor``.

Run: ``python -m bench.ledger_bench`` (admin DSN from ``ESP_BENCH_POSTGRES_DSN``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import floor
from dev import pgtools
from libs.common.batching import BatchingOptions
from libs.common.db import create_pool, migrate_services
from services.ledger.errors import InsufficientCredits
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.models import MessageClass

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
# More than anyone can reserve in a run, so the balance never runs out mid-measurement.
PLENTY_OF_CREDITS = 10**12


HEADLINES: dict[str, floor.FloorName] = {
    "ledger.hot_tenant_reserve_per_s": "pg",
    "ledger.many_tenants_reserve_per_s": "pg",
    "ledger.single_row_txn_reserve_per_s": "pg",
}
"""The figures printed against a floor too, and which (:mod:`bench.floor`): reserves are Postgres transactions."""


@dataclass(frozen=True)
class Scenario:
    """One measured workload."""

    metric: str
    tenants: int
    batching: BatchingOptions
    duration_s: float
    callers: int
    """Concurrent callers, each reserving in a loop (like concurrent ingest requests)."""


async def measure(dsn: str, scenario: Scenario, run: int) -> float:
    """Reserves per second for one run of ``scenario`` on fresh tenants."""
    pool = await create_pool(dsn, min_size=2, max_size=scenario.batching.workers + 2, name="ledger-bench")
    ledger = Ledger(pool, LedgerOptions(reserve_batching=scenario.batching))
    tenants = [f"{scenario.metric}-{run}-{i}" for i in range(scenario.tenants)]
    try:
        for tenant in tenants:
            await ledger.top_up(tenant, PLENTY_OF_CREDITS, "bench")
        refused = 0
        deadline = time.monotonic() + scenario.duration_s

        async def caller(caller_id: int) -> int:
            nonlocal refused
            done = 0
            while time.monotonic() < deadline:
                tenant = tenants[(caller_id + done) % len(tenants)]
                try:
                    await ledger.reserve(tenant, f"{tenant}-{caller_id}-{done}", MessageClass.BULK)
                except InsufficientCredits:
                    refused += 1
                done += 1
            return done

        started = time.monotonic()
        counts = await asyncio.gather(*(caller(i) for i in range(scenario.callers)))
        elapsed = time.monotonic() - started
        if refused:
            raise RuntimeError(f"{refused} reserves were refused: the benchmark's balance ran out")
        return sum(counts) / elapsed
    finally:
        await ledger.close()
        await pool.close()


async def bench(dsn: str, scenarios: Sequence[Scenario], runs: int) -> list[dict[str, object]]:
    """Run every scenario ``runs`` times (interleaved, so drift hits all alike) and return the medians."""
    await migrate_services(dsn, ["ledger"])
    samples: dict[str, list[float]] = {s.metric: [] for s in scenarios}
    for run in range(runs):
        for scenario in scenarios:
            rate = await measure(dsn, scenario, run)
            samples[scenario.metric].append(rate)
            print(f"run {run + 1}/{runs} {scenario.metric}: {rate:,.0f}/s", file=sys.stderr)
    return [
        {"metric": metric, "value": round(statistics.median(values)), "unit": "1/s"}
        for metric, values in samples.items()
    ]


def scenarios(duration_s: float) -> list[Scenario]:
    """The three workloads; the single-row baseline runs shorter (it is slow and only a reference)."""
    grouped = BatchingOptions(max_batch_size=1000, max_delay_s=0.0, workers=4)
    return [
        Scenario("ledger.hot_tenant_reserve_per_s", 1, grouped, duration_s, callers=2000),
        Scenario("ledger.many_tenants_reserve_per_s", 1000, grouped, duration_s, callers=2000),
        Scenario(
            "ledger.single_row_txn_reserve_per_s",
            1,
            BatchingOptions(max_batch_size=1, workers=8, shards=1),
            max(1.0, duration_s / 2),
            callers=64,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Create a database, measure the floors, then the reserves, print JSON lines, drop the database."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    args = parser.parse_args(argv)
    name = pgtools.unique_database_name("esp_bench_ledger")
    dsn = pgtools.create_database(ADMIN_DSN, name)
    try:
        yardstick = floor.measure(dsn)
        results = asyncio.run(bench(dsn, scenarios(args.duration), args.runs))
    finally:
        pgtools.drop_database(ADMIN_DSN, name)
    floor.print_figures(results, yardstick, HEADLINES)


if __name__ == "__main__":
    main()
