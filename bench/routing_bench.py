"""Routing economics: how the production ranking fares on the routing lab's shipped market scenarios.

For every scenario in ``libs/routing_sim/scenarios/`` (or only those named by ``--scenario NAME``, repeatable),
one simulated day under production and the baselines and the hindsight oracle over the same emails
(``libs.routing_sim.comparison.compare``), and per scenario the JSON lines

- ``routing.cost_vs_oracle``: production's cost per delivered email ÷ the oracle's (target <= 1.05);
- ``routing.delivered_ratio``: production's delivered share of the accepted emails (target >= 0.9999);
- ``routing.otp_p99_ms``: production's OTP p99 from acceptance to a provider accepting (target: the OTP class's
  latency objective);
- ``routing.cost_vs_round_robin``: production's cost per delivered ÷ round-robin's (below 1 beats it);
- ``routing.delivered_vs_cheapest_first``: production's delivered share ÷ cheapest-first's (1 or more beats it);
- ``routing.sim_wall_s``: real seconds production's day took to simulate;

each with a ``scenario`` field, then the same five ratios with ``"scenario": "overall"``, the worst scenario's
each (the largest cost ratio and p99, the smallest delivered ratios). A figure that is not a finite number is
``null``: NaN where it does not exist (no OTP delivered in a scenario), which the overall figures skip, or infinity
where production paid and its yardstick cost nothing, which they count as the worst.

The figures are simulated, so they do not depend on the machine (only ``sim_wall_s`` does): no floor is measured.
A scenario takes about 20 s a policy a simulated day. Progress goes to stderr.

Run: ``make bench BENCH=routing`` (``BENCH_ARGS="--scenario cheap-quota-runs-out"`` for one scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from libs.routing_sim import scenario
from libs.routing_sim.comparison import Comparison, compare

RATIOS: tuple[tuple[str, str, Callable[[Sequence[float]], float]], ...] = (
    ("cost_vs_oracle", "ratio", max),
    ("delivered_ratio", "ratio", min),
    ("otp_p99_ms", "ms", max),
    ("cost_vs_round_robin", "ratio", max),
    ("delivered_vs_cheapest_first", "ratio", min),
)
"""Each figure of a scenario: its name (a ``Comparison`` property), unit, and how the overall line takes the worst."""


def emit(metric: str, value: float | None, unit: str, scenario_name: str) -> None:
    # JSON has no NaN or infinity: a figure that does not exist is null rather than invalid JSON.
    finite = value if value is not None and math.isfinite(value) else None
    print(json.dumps({"metric": f"routing.{metric}", "value": finite, "unit": unit, "scenario": scenario_name}),
          flush=True)


def chosen(names: Sequence[str]) -> list[Path]:
    """The shipped scenario files, or those named (by file stem) in ``names``; exits naming an unknown one."""
    shipped = scenario.shipped()
    if not names:
        return shipped
    by_name = {path.stem: path for path in shipped}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        sys.exit(f"routing bench: unknown scenario(s) {', '.join(unknown)}; shipped: {', '.join(by_name)}")
    return [by_name[name] for name in dict.fromkeys(names)]


def run(path: Path) -> Comparison:
    day = scenario.load(path)
    print(f"routing: {path.stem} ({day.traffic.emails:,} emails, {len(day.providers)} providers, "
          f"{len(day.events)} events)", file=sys.stderr, flush=True)

    def progress(name: str, wall_s: float) -> None:
        print(f"routing:   {name} {wall_s:.1f} s", file=sys.stderr, flush=True)

    result = asyncio.run(compare(day, progress=progress))
    met = result.meets_targets()
    print(f"routing:   targets missed: {', '.join(k for k, ok in met.items() if not ok) or 'none'}",
          file=sys.stderr, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME",
                        help="a shipped scenario (file name without .toml); repeatable; default: every one")
    args, _ = parser.parse_known_args(argv)  # `make bench BENCH_ARGS=...` hands every benchmark the same options
    paths = chosen(args.scenario)
    if not paths:
        sys.exit("routing bench: no scenario ships in libs/routing_sim/scenarios/")
    figures: dict[str, list[float]] = {name: [] for name, _, _ in RATIOS}
    for path in paths:
        result = run(path)
        name = result.scenario.name
        for metric, unit, _ in RATIOS:
            value: float = getattr(result, metric)
            emit(metric, value, unit, name)
            if not math.isnan(value):
                figures[metric].append(value)
        emit("sim_wall_s", round(result.production.wall_s, 3), "s", name)
    for metric, unit, worst in RATIOS:
        emit(metric, worst(figures[metric]) if figures[metric] else None, unit, "overall")


if __name__ == "__main__":
    main()
