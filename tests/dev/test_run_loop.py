"""``make run``'s loop as a process (``python -m dev.supervisor``, the skeleton ``dev.run`` fills with the mesh,
here over stand-in services): SIGTERM at any moment and SIGINT even when inherited ignored stop it and every
process it started, and a service killed under it comes back."""

from __future__ import annotations

import os
import queue
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dev.mesh import ROOT

SERVICES = ("a", "b")
STARTED = re.compile(r"esp-dev: (?:re)?started (\w+) \(pid (\d+)\)")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _processes_with(token: str) -> list[int]:
    """Live processes whose command line carries ``token`` (each run's stand-in services carry their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in command and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _ignore_sigint() -> None:
    # What a shell does to a background job: SIGINT ignored, and inherited so across exec.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loop:
    """``python -m dev.supervisor`` over two stand-in services, started with SIGINT ignored; its stdout, line by
    line."""

    def __init__(self, log_dir: Path) -> None:
        self.token = f"esp-test-{secrets.token_hex(6)}"
        # The token is an argument of each stand-in, so that its processes can be found even if the loop never
        # got to print their pids.
        service = f"{sys.executable} -c 'import time; time.sleep(600)' {self.token}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dev.supervisor", "--log-dir", str(log_dir),
             *(f"{name}={service}" for name in SERVICES)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_ignore_sigint)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], object], timeout_s: float = 30) -> str:
        """The next line ``predicate`` accepts (every line read is kept in ``lines``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout_s}s; output so far: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the loop's output ended; output: {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return line

    def started(self) -> dict[str, int]:
        """Wait until every stand-in has started; their pids."""
        pids: dict[str, int] = {}
        while len(pids) < len(SERVICES):
            match = STARTED.match(self.wait_for(STARTED.match))
            assert match is not None
            pids[match[1]] = int(match[2])
        return pids

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def ended(self, timeout_s: float = 30) -> int:
        """Wait for the loop to exit; its status. (Fails, and kills it, if it hangs.)"""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the loop did not stop within {timeout_s}s; output: {self.lines}") from None

    def rest_of_output(self) -> list[str]:
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return self.lines

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in _processes_with(self.token):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Callable[[], Loop]]:
    made: list[Loop] = []

    def start() -> Loop:
        made.append(Loop(tmp_path / str(len(made))))
        return made[-1]

    yield start
    for loop in made:
        loop.kill()


def test_sigterm_stops_it_and_every_service_it_started(loops: Callable[[], Loop]) -> None:
    loop = loops()
    pids = loop.started()

    loop.signal(signal.SIGTERM)

    assert loop.ended() == 0
    assert loop.rest_of_output()[-2:] == ["esp-dev: stopping", "esp-dev: stopped"]
    assert not any(_alive(pid) for pid in pids.values())


def test_sigint_stops_it_even_when_it_was_started_with_sigint_ignored(loops: Callable[[], Loop]) -> None:
    loop = loops()
    pids = loop.started()

    loop.signal(signal.SIGINT)

    assert loop.ended() == 0
    assert loop.rest_of_output()[-1] == "esp-dev: stopped"
    assert not any(_alive(pid) for pid in pids.values())


def test_bursts_of_sigterm_at_random_moments_always_stop_it_and_leave_no_service_behind(
        loops: Callable[[], Loop]) -> None:
    seed = secrets.randbits(32)
    chance = random.Random(seed)
    for run in range(12):
        loop = loops()
        if run % 2:  # half the runs: once it is in its loop; the others: anywhere from start-up on
            loop.started()
        time.sleep(chance.uniform(0, 0.4))
        for _ in range(chance.randint(1, 30)):  # the first one lands anywhere, the rest while it is stopping
            if loop.process.poll() is not None:
                break
            loop.signal(signal.SIGTERM)
            time.sleep(chance.uniform(0, 0.005))

        status = loop.ended()

        # Before Python has run any of the loop's code, SIGTERM's default action ends it (-15): nothing was
        # started then. From the handlers' installation on, it stops cleanly.
        assert status == 0 or (status == -signal.SIGTERM and not any("started" in line for line in loop.lines)), (
            f"run {run} (seed {seed}): status {status}, output {loop.rest_of_output()}")
        assert _processes_with(loop.token) == [], f"run {run} (seed {seed}): services left running"


def test_a_service_killed_under_it_is_started_again_and_announced(loops: Callable[[], Loop]) -> None:
    loop = loops()
    killed = loop.started()["b"]

    os.kill(killed, signal.SIGKILL)

    loop.wait_for(lambda line: line.startswith("esp-dev: b exited with code -9; restarting in 1 s"))
    match = STARTED.match(loop.wait_for(lambda line: line.startswith("esp-dev: restarted b ")))
    assert match is not None
    assert int(match[2]) != killed and _alive(int(match[2]))
    loop.signal(signal.SIGTERM)
    assert loop.ended() == 0
    assert not _alive(int(match[2]))
