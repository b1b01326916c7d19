"""A chaos run: one mesh, one phase per fault (or pair of faults), each phase checked by the history checker.

A phase drives the mixed load for ``duration_s``, injects its faults a third of the way in, ends them, measures
how long until a fresh email goes through again, lets the load finish and the mesh drain, and then checks the
phase's history. Phases run one after another on the same mesh, so a fault that leaves damage behind shows up in
the phases after it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from dev.chaos.cluster import ChaosCluster, new_work_dir
from dev.chaos.faults import FAULTS
from dev.chaos.history import FINAL_STATES, PhaseVerdict, check, read_history
from dev.chaos.load import LoadGenerator, probe_recovery

log = logging.getLogger("chaos")


@dataclass(frozen=True)
class RunSettings:
    rate: float = 25.0
    """Emails per second the load offers."""
    duration_s: float = 15.0
    drain_timeout_s: float = 150.0
    campaign_recipients: int = 100
    seed: int = 1


@dataclass
class RunResult:
    verdicts: list[PhaseVerdict] = field(default_factory=list)
    work_dir: Path | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(not v.violations for v in self.verdicts)


async def run_matrix(matrix: Sequence[Sequence[str]], settings: RunSettings, *, keep: bool = False,
                     baseline: bool = True, on_verdict: Any = None) -> RunResult:
    """Start a cluster, run every phase of ``matrix`` (after a phase without faults, with ``baseline``), stop the
    cluster."""
    unknown = [name for phase in matrix for name in phase if name not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults: {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    work_dir = new_work_dir()
    result = RunResult(work_dir=work_dir)
    start = time.monotonic()
    cluster = ChaosCluster(work_dir)
    await asyncio.to_thread(cluster.start)
    cluster.start_supervisor()
    try:
        async with LoadGenerator(cluster.endpoint, cluster.gateway_url, cluster.api_key, settings.rate,
                                 seed=settings.seed) as load:
            phases: list[Sequence[str]] = [(), *matrix] if baseline else list(matrix)
            for index, faults in enumerate(phases):
                name = f"p{index:02d}-{'+'.join(faults) or 'baseline'}"
                verdict = await run_phase(cluster, load, name, faults, settings)
                result.verdicts.append(verdict)
                if on_verdict is not None:
                    on_verdict(verdict)
    finally:
        await cluster.stop_supervisor()
        await asyncio.to_thread(cluster.stop)
        result.elapsed_s = time.monotonic() - start
        if not keep and result.ok:
            shutil.rmtree(work_dir, ignore_errors=True)
    return result


async def run_phase(cluster: ChaosCluster, load: LoadGenerator, phase: str, fault_names: Sequence[str],
                    settings: RunSettings) -> PhaseVerdict:
    faults = [FAULTS[name] for name in fault_names]
    since = datetime.now(UTC) - timedelta(seconds=2)
    sim_seq = await _last_simulator_seq(cluster)
    await load.upload_attachment(phase)
    first, first_campaign = len(load.records), len(load.campaigns)
    # Spread over the load's duration, so its expansion and sending run through the faults.
    await load.start_campaign(phase, settings.campaign_recipients,
                              send_rate=settings.campaign_recipients / settings.duration_s)
    driving = asyncio.create_task(load.run(phase, settings.duration_s))
    in_flight = 0
    recover_s = 0.0
    healed_at: float | None = None
    if faults:
        await asyncio.sleep(settings.duration_s / 3)
        in_flight = await asyncio.to_thread(_in_flight, cluster.database_dsn, phase, load, first)
        injected = time.monotonic()
        for fault in faults:
            await fault.inject(cluster)
        # Time to recover: from the fault until a fresh email is accepted and a provider has taken it.
        probe = asyncio.create_task(probe_recovery(cluster.endpoint, cluster.api_key, start=injected))
        await asyncio.gather(*(fault.heal(cluster) for fault in faults))
        healed_at = time.time()
        recover_s = await probe
    await driving
    await load.settle()
    clients = load.records[first:]
    await _drain(cluster, phase, clients, settings.drain_timeout_s)
    requests = await cluster.simulator_requests(sim_seq)
    history = await asyncio.to_thread(read_history, cluster.database_dsn, phase, fault_names,
                                      any(f.crash_window for f in faults), clients, requests, since,
                                      load.campaigns[first_campaign:])
    history.healed_at = healed_at
    history.cheapest_healthy = not any(f.kind == "provider" for f in faults)
    verdict = check(history)
    verdict.in_flight, verdict.recover_s = in_flight, recover_s
    return verdict


async def _last_simulator_seq(cluster: ChaosCluster) -> int:
    records = await cluster.simulator_requests(0)
    return int(records[-1]["seq"]) if records else 0


def _in_flight(dsn: str, phase: str, load: LoadGenerator, first: int) -> int:
    """Emails of the phase stored so far and not yet final: those reports knows in a state before final, and
    those the clients were told were accepted that reports has not seen yet."""
    accepted = sum(r.outcome == "accepted" for r in load.records[first:])
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE NOT state = ANY(%s)), "
            "       count(*) FILTER (WHERE metadata->>'chaos_key' <> %s) "
            "FROM reports.messages WHERE metadata->>'chaos_phase' = %s",
            (list(FINAL_STATES), f"{phase}-campaign", phase)).fetchone()
    not_final, seen = (int(row[0]), int(row[1])) if row else (0, 0)
    return not_final + max(0, accepted - seen)


async def _drain(cluster: ChaosCluster, phase: str, clients: Sequence[Any], timeout_s: float) -> None:
    """Until every email of the phase the mesh stored is final (or ``timeout_s``; the checker reports what is not)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pending = await asyncio.to_thread(_pending, cluster.database_dsn, phase)
        except psycopg.Error:
            pending = -1
        if pending == 0:
            return
        await asyncio.sleep(0.5)


def _pending(dsn: str, phase: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM ingest.messages m WHERE m.created_at > now() - interval '1 hour' "
            "        AND NOT EXISTS (SELECT 1 FROM reports.messages r WHERE r.message_id = m.id::text "
            "                        AND r.state = ANY(%s))) "
            "     + (SELECT count(*) FROM reports.messages WHERE metadata ? 'chaos_phase' AND NOT state = ANY(%s)) "
            "     + (SELECT count(*) FROM campaigns.campaigns WHERE state IN ('running', 'scheduled', 'paused')) "
            # A hold whose request never committed (its call cut off after the reserve: a deadline, a crash) has no
            # email to wait for; it gives its credits back when it expires.
            "     + (SELECT count(*) FROM ledger.holds h WHERE h.state = 'held' AND (EXISTS ("
            "        SELECT 1 FROM ingest.messages m WHERE m.id::text = h.hold_id) OR EXISTS ("
            "        SELECT 1 FROM reports.messages r WHERE r.message_id = h.hold_id)))",
            (list(FINAL_STATES), list(FINAL_STATES))).fetchone()
    return int(row[0]) if row else -1


COLUMNS = ("phase", "emails", "accepted", "in_flight", "lost", "double_charges", "duplicates", "recover_s",
           "delivered_ratio", "dearer_after_recovery", "violations")


def table(verdicts: Sequence[PhaseVerdict]) -> str:
    """The per-phase table the run prints."""
    rows = [dict(v.as_row(), violations=len(v.violations)) for v in verdicts]
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: Path, result: RunResult, settings: RunSettings) -> None:
    path.write_text(json.dumps({
        "settings": settings.__dict__, "elapsed_s": round(result.elapsed_s, 1), "ok": result.ok,
        "phases": [v.as_row() for v in result.verdicts]}, indent=2) + "\n")
