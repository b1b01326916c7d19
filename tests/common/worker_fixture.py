"""``python -m tests.common.worker_fixture``: a worker for the supervision tests. It reports what it runs as into
``TEST_WORKER_REPORT`` (pid, session, niceness and its session's, namespace), then works until stopped — or exits
at once with ``TEST_WORKER_EXIT`` set, or never gets ready with ``TEST_WORKER_CRASH`` set."""

from __future__ import annotations

import json
import os
from pathlib import Path

from libs.common.settings import CommonSettings
from libs.common.workers import StopEvent, WorkerParts, run_worker


async def build(settings: CommonSettings) -> WorkerParts:
    if os.environ.get("TEST_WORKER_CRASH"):
        raise RuntimeError("this worker cannot start")
    report = Path(os.environ["TEST_WORKER_REPORT"])
    autogroup = Path("/proc/self/autogroup")
    group = autogroup.read_text().strip() if autogroup.exists() else None  # noqa: ASYNC240 - as below
    facts = {"pid": os.getpid(), "sid": os.getsid(0), "nice": os.nice(0), "namespace": settings.namespace,
             "autogroup": group}
    report.write_text(json.dumps(facts))  # noqa: ASYNC240 - once, before the loop serves anything

    async def work(stop: StopEvent) -> None:
        if os.environ.get("TEST_WORKER_EXIT"):
            raise RuntimeError("this worker gives up")
        await stop.wait()

    async def close() -> None:
        report.with_suffix(".closed").write_text("closed")

    return WorkerParts(tasks=[work], closers=[close])


if __name__ == "__main__":
    run_worker(CommonSettings, build, name=lambda _s: "test-worker",
               niceness=lambda _s: int(os.environ.get("TEST_WORKER_NICENESS", "0")))
