"""Background processes lower their CPU priority where it counts: with autogroup scheduling, their session's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
REPORT = """
import json, os, sys
from libs.common.priority import lower_cpu_priority
nice = lower_cpu_priority(int(sys.argv[1]), own_session=sys.argv[2] == "own")
group = open("/proc/self/autogroup").read().strip() if os.path.exists("/proc/self/autogroup") else None
print(json.dumps({"nice": nice, "autogroup": group, "leader": os.getsid(0) == os.getpid()}))
"""


def _run(extra: int, *, new_session: bool, own_session: bool = False,
         group_leader: bool = False) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", REPORT, str(extra), "own" if own_session else "shared"],
                         capture_output=True, text=True, check=True, start_new_session=new_session,
                         process_group=0 if group_leader else None, timeout=30)
    return json.loads(out.stdout)


def test_a_service_leading_its_session_runs_nicer_and_lowers_its_sessions_priority():
    report = _run(6, new_session=True)
    assert report["leader"] is True and report["nice"] == 6
    if AUTOGROUP.exists():  # Linux with CONFIG_SCHED_AUTOGROUP (this machine and CI)
        assert str(report["autogroup"]).endswith(" nice 6")


def test_a_service_started_from_a_shell_leaves_the_shells_session_alone():
    report = _run(6, new_session=False)
    assert report["leader"] is False and report["nice"] == 6
    if AUTOGROUP.exists():
        assert report["autogroup"] == AUTOGROUP.read_text().strip()


def test_no_extra_niceness_changes_nothing():
    report = _run(0, new_session=True)
    assert report["nice"] == 0
    if AUTOGROUP.exists():
        assert str(report["autogroup"]).endswith(" nice 0")


def test_a_worker_starts_a_session_of_its_own_and_lowers_its_priority():
    report = _run(6, new_session=False, own_session=True)
    assert report["leader"] is True and report["nice"] == 6
    if AUTOGROUP.exists():
        assert str(report["autogroup"]).endswith(" nice 6")


def test_a_worker_that_leads_a_process_group_stays_in_its_session_and_still_runs_nicer():
    # A shell's job control makes each command a process group leader, and such a process cannot call setsid().
    report = _run(6, new_session=False, own_session=True, group_leader=True)
    assert report["leader"] is False and report["nice"] == 6
    if AUTOGROUP.exists():
        assert report["autogroup"] == AUTOGROUP.read_text().strip()
