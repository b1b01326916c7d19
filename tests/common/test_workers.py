"""Worker processes under a service: ready before the service serves, stopped with it, fatal when they die, gone
when their parent is, and running with the parent's settings at their own CPU priority."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libs.common.settings import CommonSettings, settings_env
from libs.common.workers import WorkerSpec, WorkerSupervisor, worker_env

MODULE = "tests.common.worker_fixture"


def _spec(tmp_path: Path, name: str = "fixture", **env: str) -> WorkerSpec:
    settings = CommonSettings(namespace=f"ns-{name}", shutdown_grace_s=2)
    return WorkerSpec(name, MODULE, {**settings_env(settings), "TEST_WORKER_REPORT": str(tmp_path / f"{name}.json"),
                                     **env})


def _report(tmp_path: Path, name: str = "fixture") -> dict[str, object]:
    return json.loads((tmp_path / f"{name}.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running any more.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def test_start_returns_once_every_worker_is_ready_and_stop_drains_them(tmp_path: Path):
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path, "a"), _spec(tmp_path, "b")], grace_s=2)
    try:
        assert {_report(tmp_path, "a")["namespace"], _report(tmp_path, "b")["namespace"]} == {"ns-a", "ns-b"}
    finally:
        await supervisor.stop()
    assert [p.returncode for p in supervisor.workers.values()] == [0, 0]
    assert (tmp_path / "a.closed").exists() and (tmp_path / "b.closed").exists()  # closers ran: a drain, not a kill


async def test_a_worker_runs_its_own_niceness_on_top_of_its_parents(tmp_path: Path):
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path, TEST_WORKER_NICENESS="7")], grace_s=2)
    try:
        assert _report(tmp_path)["nice"] == min(19, os.nice(0) + 7)
    finally:
        await supervisor.stop()


async def test_a_nice_worker_leads_a_session_of_its_own_whose_priority_it_lowers(tmp_path: Path):
    # Under autogroup scheduling a nice value counts only within a session: in its parent's session the worker
    # would take its CPU from its siblings (libs.common.priority).
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path, TEST_WORKER_NICENESS="7")], grace_s=2)
    try:
        report = _report(tmp_path)
        assert report["sid"] == report["pid"] != os.getsid(0)
        if report["autogroup"] is not None:  # Linux with CONFIG_SCHED_AUTOGROUP (this machine and CI)
            assert str(report["autogroup"]).endswith(f" nice {report['nice']}")
    finally:
        await supervisor.stop()


async def test_a_worker_at_its_parents_priority_stays_in_its_parents_session(tmp_path: Path):
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path)], grace_s=2)
    try:
        assert _report(tmp_path)["sid"] == os.getsid(0)
    finally:
        await supervisor.stop()


async def test_a_worker_that_cannot_start_fails_the_start_and_leaves_nothing_running(tmp_path: Path):
    with pytest.raises(RuntimeError, match="the broken worker did not start"):
        await WorkerSupervisor.start("svc", [_spec(tmp_path, "ok"), _spec(tmp_path, "broken", TEST_WORKER_CRASH="1")],
                                     grace_s=2)
    assert not _alive(int(_report(tmp_path, "ok")["pid"]))  # type: ignore[call-overload]


async def test_a_worker_that_exits_on_its_own_brings_its_service_down(tmp_path: Path):
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path, TEST_WORKER_EXIT="1")], grace_s=2)
    try:
        with pytest.raises(RuntimeError, match=r"svc worker exited: fixture \(exit code 1\)"):
            await asyncio.wait_for(supervisor.watch(asyncio.Event()), 20)
    finally:
        await supervisor.stop()


async def test_watch_returns_quietly_when_the_service_stops(tmp_path: Path):
    supervisor = await WorkerSupervisor.start("svc", [_spec(tmp_path)], grace_s=2)
    try:
        stop = asyncio.Event()
        watching = asyncio.create_task(supervisor.watch(stop))
        for _ in range(20):  # let it settle into its wait: with the worker alive it must not return on its own
            await asyncio.sleep(0)
        assert not watching.done()

        stop.set()

        assert await asyncio.wait_for(watching, 5) is None  # no error: the service stopping is no worker's death
        [worker] = supervisor.workers.values()
        assert worker.returncode is None  # watching only watches: draining the worker is stop()'s work
    finally:
        await supervisor.stop()


PARENT = """
import asyncio, sys
from libs.common.workers import WorkerSpec, WorkerSupervisor, worker_env
async def main():
    env = dict(arg.split("=", 1) for arg in sys.argv[2:])
    await WorkerSupervisor.start("svc", [WorkerSpec("orphan", sys.argv[1], env)], grace_s=2)
    print("started", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_a_worker_whose_parent_died_stops_by_itself(tmp_path: Path):
    env = _spec(tmp_path, "orphan").env
    parent = subprocess.Popen([sys.executable, "-c", PARENT, MODULE, *[f"{k}={v}" for k, v in env.items()]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "started"
        worker = int(_report(tmp_path, "orphan")["pid"])  # type: ignore[call-overload]
        parent.send_signal(signal.SIGKILL)  # no chance to stop its worker
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_worker_gets_the_parents_settings_and_the_next_metrics_ports():
    parent = CommonSettings(namespace="ns", metrics_port=9100)
    assert worker_env(parent, 0)["ESP_METRICS_PORT"] == "9101"
    assert worker_env(parent, 2, ESP_SENDER_CLASSES="bulk") | {"ESP_METRICS_PORT": "x"} == (
        settings_env(parent) | {"ESP_SENDER_CLASSES": "bulk", "ESP_METRICS_PORT": "x"})
    assert worker_env(parent, 2)["ESP_METRICS_PORT"] == "9103"
    assert worker_env(CommonSettings(metrics_port=0), 1)["ESP_METRICS_PORT"] == "0"  # no metrics: none for it
