"""The gRPC floor: what a bare grpc.aio server (uvloop, as every service runs) costs per unary call, with no
handler work at all. Every service's per-call figure sits on top of it, so a grpcio upgrade is measured here first.

Prints ``grpc.bare_unary_cpu_us`` (the server's CPU per call, user + system over all its threads) and
``grpc.bare_unary_per_s`` (calls answered per second), the medians of ``--runs`` runs of ``--duration`` seconds
under h2load with ``--callers`` concurrent calls, and the grpcio version in the figures' ``grpcio`` field.

Run: ``make bench BENCH=grpc`` or ``python -m bench.grpc_bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc

from bench.h2load import run_h2load
from bench.processes import cpu_seconds
from dev.mesh import free_port

METHOD = "/esp.v1.MessageService/SendEmail"


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
    """The bare server's process (``python -m bench.grpc_bench --serve PORT``)."""
    import uvloop

    uvloop.run(_serve(port))



def measure(duration_s: float, callers: int, connections: int) -> tuple[float, float]:
    """One run against a fresh server: (calls/s, server CPU µs per call)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.grpc_bench", "--serve", str(port)],
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    args, _ = parser.parse_known_args(argv)  # `make bench BENCH_ARGS=...` hands every benchmark the same options
    if args.serve:
        serve(args.serve)
        return
    rates, costs = zip(*(measure(args.duration, args.callers, args.connections) for _ in range(args.runs)),
                       strict=True)
    print(f"bare grpc.aio {grpc.__version__}: {[round(r) for r in rates]} calls/s, "
          f"{[round(c) for c in costs]} µs CPU/call", file=sys.stderr)
    for metric, values, unit in (("grpc.bare_unary_cpu_us", costs, "us"), ("grpc.bare_unary_per_s", rates, "1/s")):
        print(json.dumps({"metric": metric, "value": round(statistics.median(values), 1), "unit": unit,
                          "runs": [round(v, 1) for v in values], "grpcio": grpc.__version__}))


if __name__ == "__main__":
    main()
