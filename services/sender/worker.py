"""``python -m services.sender.worker``: the pools of one sender worker process (started by the sender service,
one per message class; see ``services.sender.server``).

It has no gRPC server of its own — the supervising sender answers the probes — and stops on SIGTERM, or when
its supervisor disappears (it must never keep sending as an orphan nobody can stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from libs.common.grpc_server import event_loop_factory, run_closers, settle_garbage_collector
from libs.common.logging import configure_logging
from libs.common.metrics import start_metrics_server
from libs.common.settings import SettingsError, load_settings
from libs.common.telemetry import configure_tracing
from services.sender.config import SenderSettings
from services.sender.server import READY_FD_VARIABLE, build_pools

log = logging.getLogger(__name__)

ORPHAN_CHECK_S = 1.0


async def serve(settings: SenderSettings) -> None:
    """Run the pools until SIGTERM/SIGINT or the supervisor's exit, then drain within the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parts = await build_pools(settings)
    settle_garbage_collector()
    start_metrics_server(settings.metrics_port)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(task(stop)) for task in parts.tasks]
    tasks.append(asyncio.create_task(_stop_when_orphaned(os.getppid(), stop)))
    _announce_ready()
    log.info("sender worker serving", extra={"classes": settings.sender_classes})
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    for task in failed:
        log.error("sender worker loop failed; stopping", exc_info=task.exception())
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_s)
    for task in pending:
        task.cancel()
    await run_closers(parts.closers)
    if failed:
        raise SystemExit(1)


def _announce_ready() -> None:
    fd = os.environ.get(READY_FD_VARIABLE)
    if fd:
        with os.fdopen(int(fd), "wb") as pipe:
            pipe.write(b"ready\n")


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.error("the supervising sender is gone; stopping")
            stop.set()
            return
        try:
            await asyncio.wait_for(stop.wait(), ORPHAN_CHECK_S)
        except TimeoutError:
            pass


def main() -> None:
    """Settings, logging, tracing, then the pools."""
    try:
        settings = load_settings(SenderSettings)
    except SettingsError as exc:
        print(f"esp-sender-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    name = "sender-" + "-".join(settings.sender_classes)
    niceness = settings.niceness + (settings.bulk_worker_niceness if settings.sender_classes == ("bulk",) else 0)
    if niceness > 0:
        os.nice(min(19, niceness))
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name, settings.otel_exporter_otlp_endpoint)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
