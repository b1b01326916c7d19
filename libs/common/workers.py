"""Worker processes: part of a service's work run in child processes of its own, under the service's process.

A service splits work off into a worker when it must not share an event loop or a CPU priority with the rest:
the sender runs each message class's pool in its own worker (a bulk backlog never holds the OTP pool's loop),
and the ledger settles outcome events in a worker of lower CPU priority (settling a campaign never delays an
OTP's credit hold). The parent starts its workers with :class:`WorkerSupervisor` and keeps answering the health
probes; a worker runs its body with :func:`run_worker`.

The contract between the two:

- the parent waits until each worker reports ready (one line on an inherited pipe), so a service is SERVING only
  once its workers consume;
- a worker that exits on its own takes the parent down with it (:meth:`WorkerSupervisor.watch` raises), so the
  orchestrator restarts the whole replica rather than leave part of its work undone;
- SIGTERM to the parent is passed on; each worker drains within the grace period, or is killed after it;
- a worker whose parent disappears stops by itself: nobody could stop it otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from libs.common.grpc_server import ServiceFailed, event_loop_factory, run_closers, settle_garbage_collector
from libs.common.logging import configure_logging
from libs.common.metrics import start_metrics_server
from libs.common.priority import lower_cpu_priority
from libs.common.settings import CommonSettings, SettingsError, load_settings, settings_env
from libs.common.stopping import pause_unless_stopped
from libs.common.telemetry import configure_tracing

__all__ = [
    "READY_FD_VARIABLE",
    "StopEvent",
    "WorkerParts",
    "WorkerSpec",
    "WorkerSupervisor",
    "run_worker",
    "serve_worker",
    "start_or_inline",
    "start_worker",
    "worker_env",
]

log = logging.getLogger(__name__)

READY_FD_VARIABLE = "ESP_WORKER_READY_FD"
"""A worker writes one line to this inherited file descriptor once it is ready."""
WORKER_START_TIMEOUT_S = 60.0
ORPHAN_CHECK_S = 1.0

S = TypeVar("S", bound=CommonSettings)
StopEvent = asyncio.Event


@dataclass
class WorkerParts:
    """What one worker process runs: loops until stop, and what to close afterwards."""

    tasks: list[Callable[[StopEvent], Coroutine[Any, Any, None]]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker to start: ``python -m module`` with the parent's environment plus ``env``."""

    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)


def worker_env(settings: CommonSettings, index: int, **overrides: str) -> dict[str, str]:
    """A worker's environment: its parent's settings (however the parent got them), ``overrides`` on top, and a
    metrics port of its own — the ``index``-th after the parent's (from 0) — when the parent serves metrics."""
    env = {**settings_env(settings), **overrides}
    env["ESP_METRICS_PORT"] = str(settings.metrics_port + 1 + index if settings.metrics_port else 0)
    return env


class WorkerSupervisor:
    """A service's worker processes, started together and stopped together."""

    def __init__(self, service: str, workers: dict[str, asyncio.subprocess.Process], grace_s: float) -> None:
        self.service = service
        self.workers = workers
        self.grace_s = grace_s

    @classmethod
    async def start(cls, service: str, specs: Sequence[WorkerSpec], *, grace_s: float,
                    start_timeout_s: float = WORKER_START_TIMEOUT_S) -> WorkerSupervisor:
        """Start every worker and wait until each is ready (or fail, stopping those already started)."""
        supervisor = cls(service, {}, grace_s)
        try:
            for spec in specs:
                supervisor.workers[spec.name] = await start_worker(spec, start_timeout_s)
        except BaseException:
            await supervisor.stop()
            raise
        return supervisor

    async def watch(self, stop: StopEvent) -> None:
        """Return when asked to stop; raise when a worker exits on its own."""
        exits = {asyncio.create_task(p.wait()): name for name, p in self.workers.items()}
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping not in done:
            stopping.cancel()
            dead = [f"{exits[t]} (exit code {t.result()})" for t in done if t in exits]
            raise RuntimeError(f"{self.service} worker exited: {', '.join(dead)}")
        for task in exits:
            task.cancel()

    async def stop(self) -> None:
        """SIGTERM every worker and wait for its drain (killed after the grace period)."""
        for process in self.workers.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.workers.items():
            try:
                await asyncio.wait_for(process.wait(), self.grace_s + 5)
            except TimeoutError:
                log.warning("worker did not stop in time; killing it", extra={"worker": name})
                process.kill()
                await process.wait()


async def start_or_inline(service: str, spec: WorkerSpec, build: Callable[[], Awaitable[WorkerParts]], *,
                          in_process: bool, grace_s: float) -> WorkerParts:
    """A service's background worker as the service runs it: the process ``spec`` names, supervised (its parts are
    the watch, fatal when the worker dies, and its stop), or, with ``in_process``, ``build``'s parts run in the
    service's own process (tests, small set-ups)."""
    if in_process:
        return await build()
    supervisor = await WorkerSupervisor.start(service, [spec], grace_s=grace_s)
    return WorkerParts(tasks=[supervisor.watch], closers=[supervisor.stop])


async def start_worker(spec: WorkerSpec, timeout_s: float = WORKER_START_TIMEOUT_S) -> asyncio.subprocess.Process:
    """Start one worker and wait for its ready line; raise (and reap it) if it does not come."""
    read_fd, write_fd = os.pipe()
    env = {**os.environ, **spec.env, READY_FD_VARIABLE: str(write_fd)}
    try:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", spec.module, env=env,
                                                       pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb"))
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except TimeoutError:
        line = b""
    finally:
        transport.close()
    if line.strip() != b"ready":
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise RuntimeError(f"the {spec.name} worker did not start (exit code {process.returncode})")
    return process


async def serve_worker(name: str, build: Callable[[], Awaitable[WorkerParts]], settings: CommonSettings) -> None:
    """Run a worker's loops until SIGTERM/SIGINT or the parent's exit, then drain within the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    parts = await build()
    settle_garbage_collector()
    start_metrics_server(settings.metrics_port)
    tasks = [asyncio.create_task(task(stop)) for task in parts.tasks]
    tasks.append(asyncio.create_task(_stop_when_orphaned(parent, stop)))
    _announce_ready()
    log.info("worker serving", extra={"worker": name})
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    for task in failed:
        log.error("worker loop failed; stopping", exc_info=task.exception(), extra={"worker": name})
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_s)
    for task in pending:
        task.cancel()
    await run_closers(parts.closers)
    if failed:
        raise ServiceFailed(f"{name}: a worker loop failed") from failed[0].exception()


def run_worker(settings_cls: type[S], build: Callable[[S], Awaitable[WorkerParts]], *,
               name: Callable[[S], str], niceness: Callable[[S], int]) -> None:
    """The whole ``__main__`` of a worker: settings, CPU priority, logging, tracing, then its loops."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"esp-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    worker = name(settings)
    # The parent's own niceness (settings.niceness) is inherited; only the worker's extra is added here, in a
    # session of the worker's own (see libs.common.priority: a nice worker in its parent's session slows its
    # siblings).
    lower_cpu_priority(niceness(settings), own_session=True)
    configure_logging(worker, settings.log_level, settings.log_format)
    configure_tracing(worker, settings.otel_exporter_otlp_endpoint)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            runner.run(serve_worker(worker, lambda: build(settings), settings))
        except ServiceFailed as exc:
            log.error("%s; exiting", exc)
            raise SystemExit(1) from exc


def _announce_ready() -> None:
    fd = os.environ.get(READY_FD_VARIABLE)
    if fd:
        with os.fdopen(int(fd), "wb") as pipe:
            pipe.write(b"ready\n")


async def _stop_when_orphaned(parent_pid: int, stop: StopEvent) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.error("the supervising process is gone; stopping")
            stop.set()
            return
        await pause_unless_stopped(stop, ORPHAN_CHECK_S)
