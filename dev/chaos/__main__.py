"""``make chaos`` / ``python -m dev.chaos``: run the fault matrix against a private mesh and check its history.

Prints one table row per phase and exits non-zero if any phase broke a promise (``dev.chaos.history``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections import Counter
from pathlib import Path

from dev.chaos.faults import FAULTS, FULL_MATRIX, SHORT_MATRIX
from dev.chaos.history import PhaseVerdict
from dev.chaos.matrix import RunSettings, run_matrix, table, write_json


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dev.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the few faults `make test` runs")
    parser.add_argument("--faults", help="comma-separated phases to run, a pair joined by '+' "
                                         f"(known: {', '.join(FAULTS)})")
    parser.add_argument("--rate", type=float, default=RunSettings.rate, help="emails per second offered")
    parser.add_argument("--duration", type=float, default=RunSettings.duration_s, help="seconds of load per phase")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's data and logs even when it passes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="chaos: %(message)s")
    if arguments.faults:
        matrix = tuple(tuple(phase.split("+")) for phase in arguments.faults.split(","))
    else:
        matrix = SHORT_MATRIX if arguments.short else FULL_MATRIX
    settings = RunSettings(rate=arguments.rate, duration_s=arguments.duration)

    def report(verdict: PhaseVerdict) -> None:
        row = verdict.as_row()
        print(f"{row['phase']}: {row['accepted']} accepted, {row['lost']} lost, {row['double_charges']} double "
              f"charges, {row['duplicates']} duplicates {row['duplicate_reasons'] or ''}, recovered in "
              f"{row['recover_s']} s, delivered/accepted {row['delivered_ratio']}, dearer after recovery "
              f"{row['dearer_after_recovery']}", flush=True)
        kinds = Counter(violation.split(":", 1)[0] for violation in verdict.violations)
        for kind, count in kinds.items():
            examples = [v for v in verdict.violations if v.startswith(f"{kind}:")][:3]
            print(f"  VIOLATION {kind} x{count}, e.g.:", *(f"\n    {e}" for e in examples), flush=True)

    result = asyncio.run(run_matrix(matrix, settings, keep=arguments.keep, on_verdict=report))
    print()
    print(table(result.verdicts))
    print(f"\n{len(result.verdicts)} phases in {result.elapsed_s:.0f} s; "
          f"{'no violations' if result.ok else 'VIOLATIONS FOUND'}; data and logs: "
          f"{result.work_dir if result.work_dir and result.work_dir.exists() else 'removed'}")
    if arguments.json:
        write_json(arguments.json, result, settings)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
