"""``make bench [BENCH=name]``: run every ``bench/<name>_bench.py`` (or one) and pass its JSON lines through.

Each benchmark module has a ``main()`` that prints its figures as JSON lines
``{"metric": "e2e.sends_per_s", "value": 1234.5, "unit": "1/s"}``; a benchmark that fails makes the run fail.
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
    names = sys.argv[1:] or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {', '.join(available())}")
    failed: list[str] = []
    for name in names:
        print(f"# bench {name}", file=sys.stderr, flush=True)
        # Each benchmark in its own interpreter: no state (event loops, pools, metrics) leaks between them.
        code = subprocess.call([sys.executable, "-c", f"import bench.{name}_bench as b; b.main()"])
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    importlib.invalidate_caches()
    main()
