"""h2load (nghttp2's HTTP/2 load generator, written in C) driving one gRPC unary method with one request body.

A Python gRPC client spends about as much CPU per call as the server under test, on the same two cores; h2load
spends a tenth of that. It cannot read gRPC's status trailer, so callers check outcomes on the server's side.
"""

from __future__ import annotations

import resource
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class H2loadRun:
    calls: int
    """Calls that finished (calls still in flight when h2load stops are cancelled and not counted)."""
    http_errors: int
    elapsed_s: float
    load_cpu_s: float
    latencies_s: list[float]


def run_h2load(endpoint: str, method: str, payload: bytes, *, duration_s: float, callers: int, connections: int,
               headers: tuple[str, ...] = ()) -> H2loadRun:
    """``callers`` concurrent calls of ``method`` (``/package.Service/Method``) with ``payload`` (a serialised
    request) over ``connections`` HTTP/2 connections for ``duration_s``."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load is missing: `make bench` installs it (Debian's nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="esp-bench-h2load-") as scratch:
        body_file, log_file = Path(scratch, "body"), Path(scratch, "log")
        body_file.write_bytes(b"\0" + struct.pack(">I", len(payload)) + payload)  # gRPC's length-prefixed frame
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        extra = [arg for header in headers for arg in ("--header", header)]
        finished = subprocess.run(
            [h2load, "--duration", f"{duration_s:g}", "--clients", str(connections), "--threads", "1",
             "--max-concurrent-streams", str(max(1, callers // connections)), "--data", str(body_file),
             "--header", "content-type: application/grpc", "--header", "te: trailers", *extra,
             "--log-file", str(log_file), f"http://{endpoint}{method}"],
            capture_output=True, text=True, timeout=duration_s + 120)
        elapsed = time.perf_counter() - started
        if finished.returncode != 0:
            raise RuntimeError(f"h2load failed ({finished.returncode}): {finished.stderr or finished.stdout}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line.split("\t") for line in log_file.read_text().splitlines() if line]
    load_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return H2loadRun(calls=len(lines), http_errors=sum(1 for _, status, _ in lines if status != "200"),
                     elapsed_s=elapsed, load_cpu_s=load_cpu,
                     latencies_s=[int(micros) / 1e6 for _, _, micros in lines])
