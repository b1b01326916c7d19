"""``make run``'s supervision, without the mesh: real child processes, a clock the test moves, and what a developer
reads on stdout when a service exits and comes back."""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dev.mesh import Process, spawn
from dev.supervisor import RestartPolicy, Supervisor

EXITS = "import sys; sys.exit(3)"
RUNS = "import time; time.sleep(600)"


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class World:
    """A supervisor on a test clock, the lines it said, and every process it started."""

    def __init__(self, log_dir: Path) -> None:
        self.clock = Clock()
        self.said: list[str] = []
        self.log_dir = log_dir
        self.spawned: list[Process] = []
        self.supervisor = Supervisor(say=self.said.append, clock=self.clock, log_dir=Path(".dev/logs"))

    def starter(self, name: str, code: str) -> Callable[[], Process]:
        def start() -> Process:
            process = spawn(name, [sys.executable, "-c", code], self.log_dir)
            self.spawned.append(process)
            return process

        return start

    def pid(self, name: str) -> int:
        return self.supervisor.children()[name].popen.pid

    def exited(self, name: str) -> None:
        """Wait for the service's current process to exit (as the supervisor's next look would find it)."""
        self.supervisor.children()[name].popen.wait(timeout=30)

    def kill(self, name: str) -> None:
        os.kill(self.pid(name), signal.SIGKILL)
        self.exited(name)

    def restart(self, name: str) -> float:
        """Let the service's exit be noticed and the restart come due; the delay it waited."""
        delay = self.supervisor.check()
        self.clock.advance(delay)
        assert self.supervisor.check() == math.inf
        return delay


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.supervisor.stop()
    for process in made.spawned:
        process.kill()


def test_the_restart_delay_doubles_from_one_second_up_to_thirty():
    policy = RestartPolicy()

    assert [policy.delay_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_service_that_exits_is_started_again_a_second_later_and_says_so(world: World):
    world.supervisor.add("crasher", world.starter("crasher", EXITS))
    first = world.pid("crasher")
    world.exited("crasher")

    assert world.supervisor.check() == 1.0
    world.clock.advance(0.5)
    assert world.supervisor.check() == 0.5
    assert world.pid("crasher") == first  # not yet
    world.clock.advance(0.5)
    world.supervisor.check()

    second = world.pid("crasher")
    assert second != first
    assert world.said == [
        f"started crasher (pid {first})",
        "crasher exited with code 3; restarting in 1 s; see .dev/logs/crasher.log",
        f"restarted crasher (pid {second})",
    ]


def test_a_killed_service_is_reported_with_its_signal(world: World):
    world.supervisor.add("sender", world.starter("sender", RUNS))

    world.kill("sender")
    world.supervisor.check()

    assert world.said[-1] == "sender exited with code -9; restarting in 1 s; see .dev/logs/sender.log"


def test_a_service_that_keeps_exiting_waits_twice_as_long_each_time_up_to_thirty_seconds(world: World):
    world.supervisor.add("crasher", world.starter("crasher", EXITS))

    delays = []
    for _ in range(7):
        world.exited("crasher")
        delays.append(world.restart("crasher"))

    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert len(world.spawned) == 8


def test_a_service_that_ran_a_while_before_exiting_is_restarted_after_a_second_again(world: World):
    world.supervisor.add("sender", world.starter("sender", RUNS))
    for _ in range(3):  # three quick deaths: the next wait would be 8 s
        world.kill("sender")
        world.restart("sender")

    world.clock.advance(RestartPolicy().healthy_after_s)
    world.kill("sender")

    assert world.restart("sender") == 1.0


def test_a_service_already_running_is_adopted_and_restarted_with_its_own_starter(world: World):
    start = world.starter("gateway", RUNS)
    running = start()

    world.supervisor.add("gateway", start, running)
    world.kill("gateway")
    world.restart("gateway")

    assert world.said[0] == "gateway exited with code -9; restarting in 1 s; see .dev/logs/gateway.log"
    assert world.pid("gateway") != running.popen.pid and world.supervisor.children()["gateway"].popen.poll() is None


def test_a_start_that_fails_is_tried_again_with_back_off(world: World):
    def broken() -> Process:
        raise FileNotFoundError("no such file: services/gone")

    world.supervisor.add("gone", broken)
    delays = [world.supervisor.check()]
    for _ in range(3):
        world.clock.advance(delays[-1])
        delays.append(world.supervisor.check())  # the restart is due, fails, and the next one is set

    assert delays == [1, 2, 4, 8]
    assert world.said[0] == "gone could not be started (no such file: services/gone); restarting in 1 s; see " \
        ".dev/logs/gone.log"
    assert world.supervisor.children() == {}


def test_stop_ends_every_service_and_cancels_pending_restarts(world: World):
    world.supervisor.add("a", world.starter("a", RUNS))
    world.supervisor.add("b", world.starter("b", RUNS))
    world.kill("b")
    world.supervisor.check()  # b's restart is due in a second

    world.supervisor.stop()
    world.clock.advance(60)

    assert world.supervisor.check() == math.inf
    assert len(world.spawned) == 2
    assert all(process.popen.poll() is not None for process in world.spawned)
