"""Processes a benchmark starts or watches: the body of its helper processes (load generators, the backlog keeper)
and the CPU time of a process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
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
