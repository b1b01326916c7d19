"""``make bench [BENCH=name] [BENCH_ARGS="--runs 5"]``: run every ``bench/<name>_bench.py`` (or the named ones)
and pass their JSON lines through; ``python -m bench e2e -- --runs 5`` passes everything after ``--`` to each
benchmark's own options.

Each benchmark module has a ``main()`` that prints its figures as JSON lines
``{"metric": "e2e.sends_per_s", "value": 1234.5, "unit": "1/s"}``; a benchmark that fails makes the run fail.
Each (but ``grpc``, which measures the floor itself) also measures a floor in the same run and prints its
headline figures against it (``bench/floor.py``).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removesuffix("_bench") for p in HERE.glob("*_bench.py"))


def main() -> None:
    args = sys.argv[1:]
    options: list[str] = []
    if "--" in args:
        args, options = args[:args.index("--")], args[args.index("--") + 1:]
    names = args or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {', '.join(available())}")
    failed: list[str] = []
    for name in names:
        print(f"# bench {name}", file=sys.stderr, flush=True)
        # Each benchmark in its own interpreter: no state (event loops, pools, metrics) leaks between them.
        code = subprocess.call([sys.executable, "-c", f"import bench.{name}_bench as b; b.main()", *options])
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    importlib.invalidate_caches()
    main()
