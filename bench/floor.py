"""The yardstick every benchmark measures in its own run, so figures from different days compare.

This machine's speed moves by up to 1.6 times between days: the same code gave ``e2e.sends_per_s`` 2,400 one day and
1,481 another, while the bare gRPC figure moved 7,347 → 5,606. So each benchmark also measures two floors, before
its own measurements and while its mesh is idle (a floor measured under load would measure the load):

- ``floor.grpc_unary_per_s``: unary calls per second a bare grpc.aio server (uvloop, an empty handler, as every
  service runs) answers under h2load (256 concurrent calls over 4 HTTP/2 connections), the median of three
  2-second runs on fresh servers (``floor.grpc_unary_cpu_us``, its server CPU per call, alongside). It stands for
  what a Python process and its gRPC layer get done on this machine. ``make bench BENCH=grpc`` measures the same
  thing at length (:func:`bare_unary` is shared).
- ``floor.pg_batched_rows_per_s`` (Postgres-bound benchmarks: ledger, ingest, e2e): rows per second inserted by
  ``executemany`` in batches of 500, one transaction per batch, into a table of the benchmark's own database (an
  id primary key and two text columns, dropped afterwards), the median of three passes of 40,000 rows after a
  warm-up. The table is an ordinary, WAL-logged one and each batch commits with a WAL flush, as the services'
  inserts do; a temporary table would skip both. It takes about a second.

Each benchmark then prints, besides its own figures and the floors, its headline figures against one floor as
``<metric>_vs_floor`` (unit ``1``, with a ``floor`` field naming the floor). The rule, one for all:

- **which floor**: throughput of batched work whose largest CPU share is Postgres (ledger reserves, batch
  accepts, ``e2e.sends_per_s``) goes against the Postgres floor; everything else (unary calls, uploads, the
  sender alone, and every latency, which is a chain of calls and wake-ups) against the gRPC floor;
- **how**: a rate is divided by the floor's rate; a latency is multiplied by it (seconds times floor operations per
  second: the latency counted in floor operations). Either way a machine that is uniformly slower by some factor
  leaves the ratio where it was, and a higher ratio is better for rates, a lower one for latencies.

Run only as a part of the benchmarks; ``python -m bench.floor --serve PORT`` is the bare server's process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import psycopg

from bench.h2load import run_h2load
from bench.processes import cpu_seconds
from dev.mesh import free_port
from libs.common.db import SESSION_OPTIONS

METHOD = "/esp.v1.MessageService/SendEmail"
"""The method the bare server answers (any name would do; h2load needs one)."""
FloorName = Literal["grpc", "pg"]
FLOOR_METRICS: dict[FloorName, str] = {"grpc": "floor.grpc_unary_per_s", "pg": "floor.pg_batched_rows_per_s"}
LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
RATE_UNITS = ("1/s", "MB/s")


# -- the gRPC floor -------------------------------------------------------------------------------------------------
async def _serve(port: int) -> None:
    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "esp.v1.MessageService", {"SendEmail": grpc.unary_unary_rpc_method_handler(answer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve(port: int) -> None:
    """The bare server's process (``python -m bench.floor --serve PORT``)."""
    import uvloop

    uvloop.run(_serve(port))


def bare_unary(duration_s: float, callers: int = 256, connections: int = 4) -> tuple[float, float]:
    """One run against a fresh bare server: (calls/s, server CPU µs per call), after a one-second warm-up."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the bare gRPC server did not start (exit code {server.poll()})")
        run_h2load(f"127.0.0.1:{port}", METHOD, b"", duration_s=1, callers=callers, connections=connections)
        time.sleep(0.5)
        cpu = cpu_seconds(server.pid)
        run = run_h2load(f"127.0.0.1:{port}", METHOD, b"", duration_s=duration_s, callers=callers,
                         connections=connections)
        used = cpu_seconds(server.pid) - cpu
        if run.http_errors or not run.calls:
            raise RuntimeError(f"{run.http_errors} of {run.calls} calls failed")
        return run.calls / run.elapsed_s, used / run.calls * 1e6
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- the Postgres floor ---------------------------------------------------------------------------------------------
FLOOR_TABLE = "bench_floor_rows"


def pg_batched_inserts(dsn: str, *, rows: int = 40_000, batch: int = 500, passes: int = 3) -> list[float]:
    """Rows per second of each of ``passes`` passes inserting ``rows`` rows, ``batch`` a transaction, into a table
    created (and dropped afterwards) in the database ``dsn`` names; one smaller pass first warms up."""

    def insert(cursor: psycopg.Cursor[Any], count: int) -> float:
        started = time.perf_counter()
        for first in range(0, count, batch):
            cursor.executemany(f"INSERT INTO {FLOOR_TABLE} (id, tenant, payload) VALUES (%s, %s, %s)",
                               [(i, f"tenant-{i % 100}", f"message {i}: a body of a few words")
                                for i in range(first, min(count, first + batch))])
            cursor.connection.commit()
        elapsed = time.perf_counter() - started
        cursor.execute(f"TRUNCATE {FLOOR_TABLE}")
        cursor.connection.commit()
        return count / elapsed

    with psycopg.connect(dsn, options=SESSION_OPTIONS) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {FLOOR_TABLE} (id bigint PRIMARY KEY, tenant text NOT NULL, "
                       "payload text NOT NULL)")
        conn.commit()
        try:
            insert(cursor, rows // 4)
            return [insert(cursor, rows) for _ in range(passes)]
        finally:
            conn.rollback()
            cursor.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
            conn.commit()


# -- both, and the figures against them -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Floor:
    """The floors one benchmark run measured (each list holds every run's figure)."""

    grpc_unary_per_s: list[float]
    grpc_unary_cpu_us: list[float]
    pg_batched_rows_per_s: list[float] | None = None

    def rate(self, name: FloorName) -> float:
        """The median of the named floor's runs."""
        if name == "pg":
            if self.pg_batched_rows_per_s is None:
                raise ValueError("this run measured no Postgres floor")
            return statistics.median(self.pg_batched_rows_per_s)
        return statistics.median(self.grpc_unary_per_s)

    def figures(self) -> list[dict[str, Any]]:
        """The floors as JSON-line figures."""
        lines: list[dict[str, Any]] = [
            {"metric": "floor.grpc_unary_per_s", "value": round(self.rate("grpc")), "unit": "1/s",
             "runs": [round(v) for v in self.grpc_unary_per_s], "grpcio": grpc.__version__},
            {"metric": "floor.grpc_unary_cpu_us", "value": round(statistics.median(self.grpc_unary_cpu_us), 1),
             "unit": "us", "runs": [round(v, 1) for v in self.grpc_unary_cpu_us]},
        ]
        if self.pg_batched_rows_per_s is not None:
            lines.append({"metric": "floor.pg_batched_rows_per_s", "value": round(self.rate("pg")), "unit": "1/s",
                          "runs": [round(v) for v in self.pg_batched_rows_per_s]})
        return lines


def measure(dsn: str | None = None, *, grpc_runs: int = 3, grpc_duration_s: float = 2.0) -> Floor:
    """Measure the floors: the gRPC one always, the Postgres one when ``dsn`` (the benchmark's own database) is
    given. Call it before the benchmark's own measurements, with its mesh idle."""
    started = time.perf_counter()
    unary = [bare_unary(grpc_duration_s) for _ in range(grpc_runs)]
    floor = Floor([rate for rate, _ in unary], [cost for _, cost in unary],
                  pg_batched_inserts(dsn) if dsn is not None else None)
    pg = f", Postgres {[round(r) for r in floor.pg_batched_rows_per_s]} rows/s batched" \
        if floor.pg_batched_rows_per_s is not None else ""
    print(f"floor ({time.perf_counter() - started:.1f} s): bare grpc.aio {[round(r) for r in floor.grpc_unary_per_s]}"
          f" calls/s{pg}", file=sys.stderr, flush=True)
    return floor


def against(results: Iterable[Mapping[str, Any]], floor: Floor,
            headlines: Mapping[str, FloorName]) -> list[dict[str, Any]]:
    """``<metric>_vs_floor`` for each of ``results`` named in ``headlines`` (metric → the floor it goes against):
    a rate divided by the floor's rate, a latency multiplied by it (see the module's docstring). A headline a run
    did not measure (an option left it out) is left out too."""
    lines: list[dict[str, Any]] = []
    for result in results:
        metric = result["metric"]
        if metric not in headlines:
            continue
        name = headlines[metric]
        value, unit, rate = float(result["value"]), result["unit"], floor.rate(name)
        if unit in RATE_UNITS:
            ratio = value / rate
        elif unit in LATENCY_UNITS:
            ratio = value * LATENCY_UNITS[unit] * rate
        else:
            raise ValueError(f"{metric} is in {unit}: neither a rate nor a latency")
        lines.append({"metric": f"{metric}_vs_floor", "value": float(f"{ratio:.4g}"), "unit": "1",
                      "floor": FLOOR_METRICS[name]})
    return lines


def median_figures(samples: Mapping[str, Sequence[float]], units: Mapping[str, str],
                   targets: Mapping[str, float], *, digits: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """One figure per metric: the median of its runs (listed), its unit (``ms`` unless ``units`` says otherwise)
    and its target when it has one; rounded to one decimal unless ``digits`` gives the metric more."""
    figures: list[dict[str, Any]] = []
    for metric, values in samples.items():
        places = (digits or {}).get(metric, 1)
        line: dict[str, Any] = {"metric": metric, "value": round(statistics.median(values), places),
                                "unit": units.get(metric, "ms"), "runs": [round(v, places) for v in values]}
        if metric in targets:
            line["target"] = targets[metric]
        figures.append(line)
    return figures


def print_figures(results: Sequence[Mapping[str, Any]], floor: Floor, headlines: Mapping[str, FloorName]) -> None:
    """Print the benchmark's figures, then the floors, then the headlines against them, as JSON lines."""
    for line in [*results, *floor.figures(), *against(results, floor, headlines)]:
        print(json.dumps(line))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, required=True, help="run the bare gRPC server on this port")
    serve(parser.parse_args(argv).serve)


if __name__ == "__main__":
    main()
