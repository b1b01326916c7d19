"""``esp-routing``: the routing lab from a terminal.

    esp-routing simulate --scenario FILE [--traffic EVENTS.csv] [--policy NAME ...] [--report PATH.html]
                         [--seed N]
    esp-routing scenarios

``simulate`` runs one scenario's day under the production ranking and the baselines (``--policy`` picks some;
production always runs, as every target is about it) and solves the hindsight oracle over the same emails, then
prints the comparison table and production's targets, and writes the self-contained HTML report (by default
``routing-report-<scenario>.html`` in the current directory). ``--scenario`` takes a file, or the name of a
scenario that ships with the package. ``scenarios`` lists the shipped ones.

``--traffic`` replays a recorded day instead of the scenario's own traffic: the messages of an events export
(``esp events export``, a CSV) on the scenario's market — "what if we add provider X at this price?" asked of real
traffic (``libs.routing_sim.replay``: the earliest message's UTC day, each message at its acceptance, sizes drawn
from the scenario's size models). A line before the table says how many messages were replayed from which day, and
how many were dropped (after that day) or had no known class.

Exit status: 0 when the day was simulated (whether or not production met its targets: that is a finding, not a
failure), 2 for a scenario file that cannot be simulated (its field named on stderr, no traceback), for a traffic
file that is not an events export (its row and column named) or when the lab's packages are missing, 1 when the
report cannot be written.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from libs.routing_sim import policies, scenario
from libs.routing_sim.scenario import ScenarioError

if TYPE_CHECKING:
    from libs.routing_sim.comparison import Comparison
    from libs.routing_sim.replay import RecordedTraffic
    from libs.routing_sim.traffic import Arrival

__all__ = ["LAB_EXTRA", "main"]

LAB_EXTRA = "pip install 'esp-mesh[lab]'"
"""How to install what the lab needs beyond the services' own packages."""
LAB_PACKAGES = ("lupa", "numpy", "scipy")
"""The ``lab`` extra's packages: the health board's Lua, the traffic draw, the oracle's solver."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``esp-routing`` with ``argv`` (the process's arguments by default); return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "scenarios":
        return _scenarios()
    return _simulate(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esp-routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate = commands.add_parser("simulate", help="compare the routing policies and the oracle on one day")
    simulate.add_argument("--scenario", required=True, metavar="FILE",
                          help="a scenario TOML file, or the name of a shipped scenario")
    simulate.add_argument("--traffic", type=Path, metavar="EVENTS.csv",
                          help="replay the messages of this events export (esp events export) instead of the "
                               "scenario's traffic")
    simulate.add_argument("--policy", action="append", choices=policies.POLICIES, metavar="NAME",
                          help=f"a policy to run, repeatable (default: all of {', '.join(policies.POLICIES)}; "
                               "production always runs)")
    simulate.add_argument("--report", type=Path, metavar="PATH.html",
                          help="where to write the HTML report (default: routing-report-<scenario>.html)")
    simulate.add_argument("--seed", type=_seed, metavar="N", help="draw the day with this seed, not the scenario's")
    commands.add_parser("scenarios", help="list the scenarios that ship with the package")
    return parser


def _seed(text: str) -> int:
    # numpy's PCG64 takes no negative seed; say so at the argument rather than with a traceback later.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _scenarios() -> int:
    status = 0
    for path in scenario.shipped():
        try:
            day = scenario.load(path)
        except ScenarioError as exc:
            print(f"esp-routing: {exc}", file=sys.stderr)
            status = 2
            continue
        print(f"{path.stem}\n    {_printable(day.description) or '(no description)'}")
    return status


def _simulate(args: argparse.Namespace) -> int:
    try:
        day = scenario.load(_scenario_path(args.scenario))
    except ScenarioError as exc:
        print(f"esp-routing: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        day = dataclasses.replace(day, seed=args.seed)
    try:
        # The lab's packages are imported only now, so that a missing one is told as such, not as a traceback.
        from libs.routing_sim import replay
        from libs.routing_sim.comparison import compare
        from libs.routing_sim.report import comparison_table, write_report
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in LAB_PACKAGES:
            raise
        print(f"esp-routing: the routing lab needs {missing!r}: {LAB_EXTRA}", file=sys.stderr)
        return 2
    emails: list[Arrival] | None = None  # None: the scenario's own traffic, drawn by compare
    replayed = ""
    if args.traffic is not None:
        try:
            recorded = replay.recorded_arrivals(args.traffic, day)
        except ScenarioError as exc:
            print(f"esp-routing: {_printable(str(exc))}", file=sys.stderr)
            return 2
        # The report's summary and the OTP target then describe the replayed day, not the scenario's own traffic.
        day = replay.recorded_day(day, recorded)
        emails = recorded.arrivals
        replayed = _replayed(args.traffic, recorded)

    def progress(name: str, wall_s: float) -> None:
        print(f"  {name}: {wall_s:.1f} s", file=sys.stderr, flush=True)

    print(f"simulating {_printable(day.name)} ({day.traffic.emails:,} emails, seed {day.seed})", file=sys.stderr)
    result = asyncio.run(compare(day, args.policy or policies.POLICIES, emails=emails, progress=progress))
    if replayed:
        print(replayed)
    print(comparison_table(day, result.results, result.oracle))
    print(_targets(result))
    report_path = args.report or Path(f"routing-report-{_file_name(day.name)}.html")
    try:
        written = write_report(report_path, day, result.results, result.oracle)
    except OSError as exc:
        print(f"esp-routing: cannot write the report to {report_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"report: {written.resolve()}")
    return 0


def _scenario_path(argument: str) -> Path:
    """The file ``argument`` names, or the shipped scenario of that name when there is no such file."""
    path = Path(argument)
    if not path.exists():
        for shipped in scenario.shipped():
            if argument in (shipped.stem, shipped.name):
                return shipped
    return path


def _replayed(path: Path, recorded: RecordedTraffic) -> str:
    """The line saying what a replay took from the traffic file: how many messages of which day, and what not."""
    line = (f"replayed {recorded.messages:,} recorded messages of {recorded.day:%Y-%m-%d} (UTC, the first at "
            f"{recorded.first_event:%H:%M:%S}) from {_printable(str(path))}; dropped {recorded.dropped_outside_day:,} "
            "after that day")
    if recorded.unknown_class:
        line += f"; {recorded.unknown_class:,} without a known class replayed as transactional"
    return line


def _targets(result: Comparison) -> str:
    """Production's figures against the issue's targets, one line each."""
    from libs.routing_sim import comparison

    bounds = {
        "cost_vs_oracle": f"<= {comparison.MAX_COST_VS_ORACLE:g}",
        "delivered_ratio": f">= {comparison.MIN_DELIVERED_RATIO:g}",
        "otp_p99_ms": f"<= {comparison.otp_objective_ms():g}",
        "cost_vs_round_robin": "< 1",
        "delivered_vs_cheapest_first": ">= 1",
    }
    met = result.meets_targets()
    lines = ["targets (production):"]
    for name in comparison.TARGETS:
        value: float = getattr(result, name)
        figure = "-" if math.isnan(value) else f"{value:.6g}"
        verdict = ("met" if met[name] else "MISSED") if name in met else "not run (its baseline was not simulated)"
        lines.append(f"  {name:<29} {figure:>10}  {bounds[name]:<9} {verdict}")
    return "\n".join(lines) + "\n"


def _file_name(name: str) -> str:
    """A scenario's name as part of a file name: it is user input, so no separators, dots first or odd bytes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "scenario"


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a scenario's description must not drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


if __name__ == "__main__":
    sys.exit(main())
