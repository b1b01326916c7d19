"""What a benchmark's helper processes (load generators, the backlog keeper) share."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_and_report(out: Any, what: str, main: Coroutine[Any, Any, Any]) -> None:
    """Body of a helper process: run ``main`` and send its result through the pipe ``out``, or, when it fails, an
    error naming ``what`` (so the benchmark fails with it instead of waiting for a result that never comes)."""
    try:
        out.send(asyncio.run(main))
    except BaseException as exc:
        out.send(RuntimeError(f"{what} failed: {exc!r}"))
        raise
