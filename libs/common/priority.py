"""Lower CPU priority for background processes (bulk sending, settlement, analytics), so that on a busy machine the
send path of OTP mail gets the CPU first.

A nice value alone is not enough on Linux with autogroup scheduling (``kernel.sched_autogroup_enabled``, on by
default on most distributions and on our benchmark machine): the scheduler first shares the CPU fairly between
*sessions* (each session is an autogroup) and applies nice values only among the processes of one session. So

- a service started in a session of its own (as ``dev.mesh`` and ``dev.run`` start every service) that runs 10
  nicer still takes a full session's share against every other service; and
- a worker process that shares its parent's session takes its CPU out of that session's share, that is, from its
  siblings: the bulk sender worker from the OTP worker, settlement from the ledger's reserves.

Measured on the e2e benchmark's OTP probes while a bulk backlog drains (BENCHMARKS.md). A background process
therefore also lowers its session's (autogroup's) priority, and a worker first starts a session of its own so it
lowers only itself. Inside cgroups (Kubernetes, systemd services) autogroups do not apply and the nice value works
within the container, where each service's CPU requests share the node.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = [
    "AUTOGROUP",
    "lower_cpu_priority",
]

log = logging.getLogger(__name__)
AUTOGROUP = Path("/proc/self/autogroup")


def lower_cpu_priority(extra: int, *, own_session: bool) -> int:
    """Run ``extra`` (0-19) nicer than now; returns the resulting nice value.

    With ``own_session`` (worker processes) the process first leaves its parent's session. A process that leads its
    session also sets the session's autogroup nice value; one that does not (a service started from a shell)
    leaves its session alone: that would slow the shell and everything else started from it."""
    if extra <= 0:
        return os.nice(0)
    if own_session and os.getsid(0) != os.getpid():
        try:
            os.setsid()
        except PermissionError:  # a process group leader (started by a shell's job control) cannot: stay
            log.warning("could not start a session of its own; its nice value counts only within its session")
    niceness = os.nice(min(19, extra))
    if os.getsid(0) == os.getpid() and AUTOGROUP.exists():
        try:
            AUTOGROUP.write_text(str(niceness))
        except OSError as exc:  # raising an autogroup's nice value needs no privilege since Linux 4.7
            log.warning("could not lower this session's CPU priority: %s", exc)
    return niceness
