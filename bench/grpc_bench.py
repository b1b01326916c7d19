"""The gRPC floor: what a bare grpc.aio server (uvloop, as every service runs) costs per unary call, with no
handler work at all. Every service's per-call figure sits on top of it, so a grpcio upgrade is measured here first.

Prints ``grpc.bare_unary_cpu_us`` (the server's CPU per call, user + system over all its threads) and
``grpc.bare_unary_per_s`` (calls answered per second), the medians of ``--runs`` runs of ``--duration`` seconds
under h2load with ``--callers`` concurrent calls, and the grpcio version in the figures' ``grpcio`` field. Every
other benchmark measures the same thing briefly as its ``floor.grpc_unary_per_s`` (:mod:`bench.floor`); this
one is that floor at length, so it prints no ``_vs_floor`` figures.

Run: ``make bench BENCH=grpc`` or ``python -m bench.grpc_bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence

import grpc

from bench.floor import bare_unary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    args, _ = parser.parse_known_args(argv)  # `make bench BENCH_ARGS=...` hands every benchmark the same options
    rates, costs = zip(*(bare_unary(args.duration, args.callers, args.connections) for _ in range(args.runs)),
                       strict=True)
    print(f"bare grpc.aio {grpc.__version__}: {[round(r) for r in rates]} calls/s, "
          f"{[round(c) for c in costs]} µs CPU/call", file=sys.stderr)
    for metric, values, unit in (("grpc.bare_unary_cpu_us", costs, "us"), ("grpc.bare_unary_per_s", rates, "1/s")):
        print(json.dumps({"metric": metric, "value": round(statistics.median(values), 1), "unit": unit,
                          "runs": [round(v, 1) for v in values], "grpcio": grpc.__version__}))


if __name__ == "__main__":
    main()
