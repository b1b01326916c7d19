"""Processes a benchmark starts or watches: the body of its helper processes (load generators, the backlog keeper),
the CPU time of a process or of every process at once, and waiting until processes are idle."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def run_and_report(out: Any, what: str, main: Coroutine[Any, Any, Any]) -> None:
    """Body of a helper process: run ``main`` and send its result through the pipe ``out``, or, when it fails, an
    error naming ``what`` (so the benchmark fails with it instead of waiting for a result that never comes)."""
    try:
        out.send(asyncio.run(main))
    except BaseException as exc:
        out.send(RuntimeError(f"{what} failed: {exc!r}"))
        raise


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all its threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SHARED_SERVERS = ("postgres", "nats-server", "redis-server")
"""Servers that are not children of the benchmark; their CPU is counted by process name (other users of the same
servers on a shared machine land in these figures too)."""


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far of every live process, read from /proc at one moment."""

    processes: Mapping[int, tuple[str, int, float]]
    """pid → (command name, parent pid, CPU seconds)."""

    def tree(self, pid: int) -> float:
        """The process's CPU seconds with all its descendants' (a service and its worker processes)."""
        children: dict[int, list[int]] = {}
        for child, (_name, parent, _cpu) in self.processes.items():
            children.setdefault(parent, []).append(child)

        def total(of: int) -> float:
            return self.processes.get(of, ("", 0, 0.0))[2] + sum(total(child) for child in children.get(of, []))

        return total(pid)

    def named(self, name: str) -> float:
        """CPU seconds of every process with this command name (the shared servers)."""
        return sum(seconds for command, _parent, seconds in self.processes.values() if command == name)


def cpu_snapshot() -> CpuSnapshot:
    """Every live process's CPU seconds so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[str, int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return CpuSnapshot(table)


async def until_idle(cpu: Callable[[], float], timeout_s: float, busy_share: float = 0.05,
                     interval_s: float = 0.5) -> float:
    """Wait until what ``cpu`` counts (CPU seconds so far of the processes watched) grows by under ``busy_share`` of
    a core over ``interval_s``, or ``timeout_s`` passed; the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        before = cpu()
        await asyncio.sleep(interval_s)
        if cpu() - before < busy_share * interval_s:
            break
    return time.perf_counter() - started
