"""Keeping ``make run``'s services running, as Kubernetes keeps a pod's containers: a service that exits is started
again after a back-off (1 s, 2 s, 4 s ... at most 30 s, back to 1 s once it has run for a minute), and everything
stops on SIGTERM or SIGINT.

``run()`` is the skeleton ``dev.run`` fills in with the mesh; ``python -m dev.supervisor NAME=COMMAND ...`` runs
the same skeleton over any commands (the tests use it with small stand-ins for services).

Signals: the handler only records which signal came (a plain assignment, which cannot deadlock wherever the signal
lands, unlike setting a ``threading.Event`` whose lock the interrupted code may hold), and Python's wakeup fd makes
the loop's ``select`` return at once. SIGTERM and SIGINT are both installed explicitly, since a ``make run`` started
in the background inherits SIGINT ignored.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol


def say(text: str) -> None:
    """One line of ``make run``'s own output (services log to ``.dev/logs``)."""
    print(f"esp-dev: {text}", flush=True)


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
"""What ``signal.signal`` returns: the handler it replaced."""


class Child(Protocol):
    """A started process as ``dev.mesh.Process`` holds one."""

    popen: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Ask it to stop (SIGTERM), kill it if it does not, and reap it."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a service that exited is started again: Kubernetes' CrashLoopBackOff, on a developer's time scale."""

    first_delay_s: float = 1.0
    """Wait before the first restart of a service that had been running well."""
    max_delay_s: float = 30.0
    """The longest wait: the delay doubles with each quick exit in a row up to this."""
    healthy_after_s: float = 60.0
    """A service that ran this long before exiting is restarted after ``first_delay_s`` again."""

    def delay_s(self, quick_exits: int) -> float:
        """The wait before a restart after ``quick_exits`` exits in a row (counting this one) of short runs."""
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** max(0, quick_exits - 1)))


@dataclass
class _Service:
    name: str
    start: Callable[[], Child]
    child: Child | None
    started_at: float
    quick_exits: int = 0
    restart_at: float | None = None


class Supervisor:
    """Services by name, each with the function that starts it; ``check()`` restarts those that exited, when due."""

    def __init__(self, policy: RestartPolicy | None = None, *, say: Callable[[str], None] = say,
                 clock: Callable[[], float] = time.monotonic, log_dir: Path | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._say = say
        self._clock = clock
        self._log_dir = log_dir
        self._services: dict[str, _Service] = {}

    def add(self, name: str, start: Callable[[], Child], child: Child | None = None) -> None:
        """Supervise ``name``: ``child`` if it is already running, else started now with ``start``, which also
        starts it again after it exits (it must return once the process is started, without waiting for it to
        serve, so that one slow service never holds up the others' restarts)."""
        service = self._services[name] = _Service(name, start, child, self._clock())
        if child is None:
            self._start(service, "started")

    def children(self) -> dict[str, Child]:
        """The running (or exited, not yet restarted) process of each service."""
        return {name: s.child for name, s in self._services.items() if s.child is not None}

    def check(self) -> float:
        """Note the services that exited (and when each will be restarted), restart those that are due; return
        the seconds until the next restart is due (``inf`` when none is pending)."""
        now = self._clock()
        for service in self._services.values():
            child = service.child
            if service.restart_at is None and child is not None and child.popen.poll() is not None:
                self._schedule(service, now, f"exited with code {child.popen.returncode}")
            if service.restart_at is not None and service.restart_at <= now:
                self._start(service, "restarted")
        pending = [s.restart_at for s in self._services.values() if s.restart_at is not None]
        return max(0.0, min(pending) - now) if pending else math.inf

    def stop(self) -> None:
        """Stop every service, the last added first, and restart none of them any more."""
        for service in reversed(list(self._services.values())):
            service.restart_at = None
            if service.child is not None:
                service.child.stop()
        self._services.clear()

    def _schedule(self, service: _Service, now: float, what: str) -> None:
        ran_s = now - service.started_at
        service.quick_exits = 1 if ran_s >= self.policy.healthy_after_s else service.quick_exits + 1
        delay = self.policy.delay_s(service.quick_exits)
        service.restart_at = now + delay
        where = f"; see {self._log_dir / f'{service.name}.log'}" if self._log_dir is not None else ""
        self._say(f"{service.name} {what}; restarting in {delay:g} s{where}")

    def _start(self, service: _Service, done: str) -> None:
        service.restart_at = None
        service.started_at = self._clock()
        try:
            service.child = service.start()
        except Exception as exc:  # e.g. the executable is gone: try again later, like any other failed start
            service.child = None
            self._schedule(service, service.started_at, f"could not be started ({exc})")
            return
        self._say(f"{done} {service.name} (pid {service.child.popen.pid})")


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived while ``run()``'s set-up was under way."""


class StopSignals:
    """SIGTERM and SIGINT ask to stop, as a recorded signal and a wake-up of ``wait()``. On exit the previous
    handlers are restored, or with ``ignore_after`` both signals are ignored from then on: once everything has
    stopped, a late one (a second Ctrl-C, a burst of SIGTERMs) must not end the process with the signal's status
    just before it exits with its own (Python's finalisation would put their default action back)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, ignore_after: bool = False) -> None:
        self.received: int | None = None
        """The first stop signal that arrived, if any."""
        self._ignore_after = ignore_after
        self._read = self._write = -1
        self._previous_wakeup_fd = -1
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> StopSignals:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # The C-level handler writes the signal's number to this pipe the moment it arrives, even between the
        # check of ``received`` and the ``select`` in ``wait()``, so that ``select`` can never sleep through it.
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for number in self.HANDLED:
            self._previous[number] = signal.signal(number, self._handle)  # replaces an inherited SIG_IGN too
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_IGN if self._ignore_after else handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read)
        os.close(self._write)

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        # Nothing but an assignment: this runs wherever the main thread was, which may be holding any lock.
        if self.received is None:
            self.received = number

    def check(self) -> None:
        """Raise ``StopRequested`` if a stop signal has arrived (between the steps of a set-up)."""
        if self.received is not None:
            raise StopRequested(signal.Signals(self.received).name)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, less if a stop signal arrives; whether one has."""
        if self.received is None:
            select.select([self._read], [], [], timeout_s)
            try:
                while os.read(self._read, 512):
                    pass
            except BlockingIOError:
                pass
        return self.received is not None


POLL_S = 0.5
"""How often the loop looks for services that exited (a restart due sooner wakes it sooner)."""


def run_until_stopped(supervisor: Supervisor, stop: StopSignals) -> None:
    """Keep the services running until a stop signal arrives."""
    while not stop.wait(min(POLL_S, supervisor.check())):
        pass


def run(setup: Callable[[Supervisor, StopSignals], None], *, supervisor: Supervisor | None = None,
        teardown: Callable[[], None] = lambda: None) -> int:
    """``make run``'s skeleton: ``setup`` starts things and hands the services to the supervisor (calling
    ``stop.check()`` between its steps, so a signal during set-up ends it after the current step), then services
    are kept running until SIGTERM or SIGINT; then every service stops, then ``teardown`` runs. Returns the exit
    status: 0 when stopped by a signal, 1 when set-up failed. For a process's main only: it leaves SIGTERM and
    SIGINT ignored, for the moments before the process exits."""
    supervisor = supervisor or Supervisor()
    status = 0
    with StopSignals(ignore_after=True) as stop:
        try:
            setup(supervisor, stop)
            stop.check()
            run_until_stopped(supervisor, stop)
        except StopRequested:
            pass
        except Exception as exc:
            say(f"failed: {exc}")
            status = 1
        finally:
            # Still inside StopSignals: more signals while stopping are only recorded, never cut the stop short.
            say("stopping")
            supervisor.stop()
            teardown()
            say("stopped")
    return status


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dev.supervisor", description=(
        "Run commands as make run runs the mesh's services: each restarted with back-off when it exits, all "
        "stopped on SIGTERM or SIGINT."))
    parser.add_argument("services", nargs="+", metavar="NAME=COMMAND", help="a name and a shell-quoted command")
    parser.add_argument("--log-dir", type=Path, default=Path(".dev/logs"), help="where NAME.log goes")
    parser.add_argument("--healthy-after", type=float, default=RestartPolicy.healthy_after_s, metavar="SECONDS",
                        help="a run this long resets the back-off")
    args = parser.parse_args(argv)
    for entry in args.services:
        if "=" not in entry or not entry.split("=", 1)[1].strip():
            parser.error(f"{entry!r} is not NAME=COMMAND")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dev.supervisor NAME=COMMAND ...``: the commands, supervised as ``make run``'s services are."""
    from dev.mesh import spawn  # only here: the supervision above needs nothing of the mesh

    args = _parse(sys.argv[1:] if argv is None else argv)

    def setup(supervisor: Supervisor, stop: StopSignals) -> None:
        for entry in args.services:
            stop.check()
            name, command = entry.split("=", 1)
            supervisor.add(name, partial(spawn, name, shlex.split(command), args.log_dir))

    return run(setup, supervisor=Supervisor(RestartPolicy(healthy_after_s=args.healthy_after), log_dir=args.log_dir))


if __name__ == "__main__":
    sys.exit(main())
