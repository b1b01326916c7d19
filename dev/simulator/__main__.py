"""``python -m dev.simulator --http-port P --smtp-port Q [--personalities FILE] [--seed N] [--niceness N]``.

Prints one JSON line once listening (``{"http_url", "smtp_host", "smtp_port", "personalities"}``) and runs
until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from dev.simulator.model import default_personalities, load_personalities
from dev.simulator.runner import run_simulator
from libs.common.priority import lower_cpu_priority


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m dev.simulator", description="Email provider simulator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port (0 = any free port)")
    parser.add_argument("--smtp-port", type=int, default=0, help="SMTP port (0 = any free port)")
    parser.add_argument("--personalities", type=Path, help="JSON file of personalities (default: built-ins)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable error/bounce draws")
    parser.add_argument("--log-cap", type=int, default=10_000, help="requests kept per personality")
    parser.add_argument("--niceness", type=int, default=0, choices=range(20), metavar="0-19",
                        help="run this much nicer, with its session's autogroup (a benchmark's stand-in for remote "
                             "servers whose CPU is not the mesh's; default 0)")
    return parser.parse_args(argv)


async def serve(arguments: argparse.Namespace) -> None:
    """Run until a termination signal."""
    personalities = (
        load_personalities(arguments.personalities) if arguments.personalities else default_personalities()
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with run_simulator(
        personalities=personalities,
        host=arguments.host,
        http_port=arguments.http_port,
        smtp_port=arguments.smtp_port,
        seed=arguments.seed,
        log_cap=arguments.log_cap,
    ) as simulator:
        print(json.dumps(simulator.describe()), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    arguments = parse_arguments(argv)
    lower_cpu_priority(arguments.niceness, own_session=True)
    try:
        asyncio.run(serve(arguments))
    except ValueError as exc:  # a bad personalities file
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
