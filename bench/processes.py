"""Processes a benchmark starts or watches: the body of its helper processes (load generators, the backlog keeper),
the CPU time of a process, and waiting until processes are idle."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
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
