"""Campaigns end to end on this machine: recipients in, expansion, drain, pause, first email.

Starts the e2e benchmark's mesh (:func:`bench.e2e_bench.environment`: every service as a process, the campaigns
service with its expander worker, a private S3 and the provider simulator; one Mailgun-type bulk provider), then
prints the medians of ``--runs`` runs as JSON lines:

- ``campaign.recipients_per_s``: ``--recipients`` (1 M) recipients streamed in through AddCampaignRecipients (one
  client stream, frames of 500, each with its own variables) to a campaign started as soon as its first recipients
  are in, until every one is queued: rendered, its credits held, its SendTask on the SEND stream. The sender is
  stopped meanwhile, so the figure is the campaign side's (the stream is purged and the campaign cancelled
  afterwards).
- ``campaign.expand_rss_mb``: how much the resident memory of the mesh's processes (every service with its worker
  processes) grew, at its peak, while those recipients went in and expanded.
- ``campaign.first_email_ms``: StartCampaign's reply → the first provider request of a 100-recipient campaign
  (the simulator's arrival time), median of ``--first-runs``.
- ``campaign.sends_per_s``: a ``--drain`` (100,000) recipient campaign, recipients added beforehand, from
  StartCampaign to its last email at the provider (reports' sent count).
- ``campaign.pause_ms``: PauseCampaign's reply → the campaign's last provider request after it, p99 (nearest
  rank) over ``--pauses`` pauses of a campaign draining at full speed (resumed between pauses).
- ``campaign.cpu_us_per_email``: CPU microseconds per email of the drain, summed over every process but the
  simulator (the mesh's services and workers, Postgres, NATS, Redis).

Before the first run, with the mesh idle, it measures the floors (:mod:`bench.floor`) and prints
``campaign.recipients_per_s`` against the Postgres floor and the latencies against the gRPC floor.

Run: ``make bench BENCH=campaign``; options in ``BENCH_ARGS`` (``--runs 3 --recipients 1000000``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import nats
from esp.v1 import campaigns_pb2, campaigns_pb2_grpc, common_pb2

from bench import floor
from bench.e2e_bench import (
    NATS_URL,
    Environment,
    Simulator,
    cpu_seconds,
    environment,
    mesh_cpu_seconds,
    percentile,
    set_providers,
    start_sender,
)
from bench.processes import until_idle
from libs.common.jetstream import Topology

FRAME = 500
PAGE_SIZE = 4096


def _campaign(tag: str) -> campaigns_pb2.Campaign:
    c = campaigns_pb2.Campaign(display_name=tag, subject="Hello {{ first_name }}, your {{ month }} offers",
                               text_body="Hi {{ first_name }},\nyour code is {{ code }}.\n",
                               html_body="<p>Hi {{ first_name }},</p><p>your code is <b>{{ code }}</b>.</p>",
                               default_variables={"month": "December"}, tags=[tag])
    getattr(c, "from").CopyFrom(common_pb2.EmailAddress(email="news@example.com", name="News"))
    return c


async def _frames(name: str, count: int, domain: str) -> AsyncIterator[campaigns_pb2.AddCampaignRecipientsRequest]:
    for start in range(0, count, FRAME):
        yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=name, recipients=[
            campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email=f"u{i}@{domain}"),
                                            variables={"first_name": f"User{i}", "code": f"{i:08d}"})
            for i in range(start, min(start + FRAME, count))])


class Campaigns:
    """The campaign RPCs as the benchmark uses them."""

    def __init__(self, env: Environment, channel: grpc.aio.Channel) -> None:
        self.stub = campaigns_pb2_grpc.CampaignServiceStub(channel)
        self.auth = env.auth()

    async def create(self, tag: str, **fields: Any) -> campaigns_pb2.Campaign:
        c = _campaign(tag)
        for key, value in fields.items():
            setattr(c, key, value)
        return await self.stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=c), metadata=self.auth,
                                              timeout=10)

    async def add(self, name: str, count: int,
                  domain: str = "example.org") -> campaigns_pb2.AddCampaignRecipientsResponse:
        return await self.stub.AddCampaignRecipients(_frames(name, count, domain), metadata=self.auth, timeout=3600)

    async def get(self, name: str) -> campaigns_pb2.Campaign:
        return await self.stub.GetCampaign(campaigns_pb2.GetCampaignRequest(name=name), metadata=self.auth,
                                           timeout=30)

    async def start(self, name: str) -> campaigns_pb2.Campaign:
        return await self.stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=name), metadata=self.auth,
                                             timeout=10)

    async def pause(self, name: str) -> campaigns_pb2.Campaign:
        return await self.stub.PauseCampaign(campaigns_pb2.PauseCampaignRequest(name=name), metadata=self.auth,
                                             timeout=10)

    async def resume(self, name: str) -> campaigns_pb2.Campaign:
        return await self.stub.ResumeCampaign(campaigns_pb2.ResumeCampaignRequest(name=name), metadata=self.auth,
                                              timeout=10)

    async def cancel(self, name: str) -> campaigns_pb2.Campaign:
        return await self.stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=name), metadata=self.auth,
                                              timeout=10)


# -- memory ---------------------------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(raw[raw.rindex(")") + 2:].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def mesh_rss_mb(env: Environment) -> dict[str, float]:
    """Resident memory of each service with its worker processes, MB."""
    tree = _children()

    def total(pid: int) -> int:
        return _rss_kb(pid) + sum(total(child) for child in tree.get(pid, []))

    return {name: total(p.popen.pid) / 1024 for name, p in env.mesh.processes.items()}


# -- the measurements -----------------------------------------------------------------------------------------------
async def bulk_queue_depth(topology: Topology) -> int:
    nc = await nats.connect(NATS_URL)
    try:
        info = await nc.jetstream().stream_info(topology.send_stream("bulk"))
        return int(info.state.messages)
    finally:
        await nc.close()


async def purge_bulk_queue(topology: Topology) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().purge_stream(topology.send_stream("bulk"))
    finally:
        await nc.close()


async def recipients_per_s(env: Environment, api: Campaigns, recipients: int) -> tuple[float, float]:
    """(recipients per second from the first add to the last queued, peak RSS growth in MB)."""
    topology = Topology(env.config.namespace)
    env.mesh.processes["sender"].stop()
    del env.mesh.processes["sender"]
    await purge_bulk_queue(topology)
    baseline = await bulk_queue_depth(topology)
    rss_before = sum(mesh_rss_mb(env).values())
    peak = rss_before
    created = await api.create("expand")
    cpu_before = cpu_seconds(env)
    started = time.perf_counter()
    adding = asyncio.create_task(api.add(created.name, recipients))
    while (await api.get(created.name)).progress.recipients == 0:  # noqa: ASYNC110 — polling another process
        await asyncio.sleep(0.05)
    await api.start(created.name)
    while True:
        peak = max(peak, sum(mesh_rss_mb(env).values()))
        if adding.done():
            adding.result()
            if await bulk_queue_depth(topology) - baseline >= recipients:
                break
        await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    cpu_after = cpu_seconds(env)
    print("  CPU µs per recipient: " + ", ".join(
        f"{k} {(cpu_after[k] - cpu_before.get(k, 0.0)) / recipients * 1e6:,.0f}" for k in cpu_after), file=sys.stderr)
    by_process = mesh_rss_mb(env)
    print("  RSS now (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in by_process.items()), file=sys.stderr)
    await api.cancel(created.name)
    await purge_bulk_queue(topology)
    env.sender_metrics_port = start_sender(env.mesh)
    return recipients / elapsed, peak - rss_before


async def _arrivals(simulator: Simulator, tag: str) -> list[float]:
    records = await simulator.read()
    return sorted(r["arrived_at"] for r in records if r["delivered"] and any(tag in m.get("tags", [])
                                                                               for m in r["messages"]))


async def first_email_ms(api: Campaigns, simulator: Simulator, tag: str) -> float:
    created = await api.create(tag)
    await api.add(created.name, 100, domain=f"{tag}.example.org")
    await simulator.reset()
    await api.start(created.name)
    started = time.time()
    deadline = started + 30
    while time.time() < deadline:
        arrivals = await _arrivals(simulator, tag)
        if arrivals:
            return (arrivals[0] - started) * 1000
        await asyncio.sleep(0.05)
    raise RuntimeError("no provider request within 30 s of StartCampaign")


async def sends_per_s(env: Environment, api: Campaigns, drain: int, tag: str) -> tuple[float, float]:
    """(emails per second from start to the last one sent, CPU µs per email over every process but the
    simulator)."""
    created = await api.create(tag)
    await api.add(created.name, drain, domain=f"{tag}.example.org")
    before = cpu_seconds(env)
    started = time.perf_counter()
    await api.start(created.name)
    while (await api.get(created.name)).progress.sent < drain:  # noqa: ASYNC110 — polling another process
        await asyncio.sleep(0.25)
    elapsed = time.perf_counter() - started
    after = cpu_seconds(env)
    spent = sum(after[k] - before.get(k, 0.0) for k in after if k not in ("simulator", "bench-client"))
    return drain / elapsed, spent / drain * 1e6


async def pause_ms(api: Campaigns, simulator: Simulator, pauses: int, tag: str) -> list[float]:
    """PauseCampaign's reply → the campaign's last provider request after it, once per pause."""
    created = await api.create(tag)
    await api.add(created.name, 200_000, domain=f"{tag}.example.org")
    await simulator.reset()
    await api.start(created.name)
    figures: list[float] = []
    for _ in range(pauses):
        await asyncio.sleep(2.0)
        await api.pause(created.name)
        paused_at = time.time()
        await asyncio.sleep(3.0)
        arrivals = await _arrivals(simulator, tag)
        after = [a for a in arrivals if a >= paused_at]
        figures.append((max(after) - paused_at) * 1000 if after else 0.0)
        print(f"    pause: last call {figures[-1]:,.0f} ms after", file=sys.stderr, flush=True)
        await api.resume(created.name)
    await api.cancel(created.name)
    return figures


async def measure_all(env: Environment, args: argparse.Namespace) -> dict[str, list[float]]:
    await set_providers(env, {"bulk-provider": {"personality": "bulk", "price_per_email_micros": 10}})
    simulator = Simulator(env.simulator_urls)
    samples: dict[str, list[float]] = {}

    def keep(metric: str, value: float) -> None:
        samples.setdefault(metric, []).append(value)
        print(f"  {metric}: {value:,.1f}", file=sys.stderr, flush=True)

    try:
        async with grpc.aio.insecure_channel(env.endpoint) as channel:
            api = Campaigns(env, channel)
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                rate, rss = await recipients_per_s(env, api, args.recipients)
                keep("campaign.recipients_per_s", rate)
                keep("campaign.expand_rss_mb", rss)
                await until_idle(lambda: sum(mesh_cpu_seconds(env).values()), timeout_s=60, busy_share=0.1)
                for i in range(args.first_runs):
                    keep("campaign.first_email_ms", await first_email_ms(api, simulator, f"first{run}x{i}"))
                rate, cpu = await sends_per_s(env, api, args.drain, f"drain{run}")
                keep("campaign.sends_per_s", rate)
                keep("campaign.cpu_us_per_email", cpu)
                for value in await pause_ms(api, simulator, args.pauses, f"pause{run}"):
                    samples.setdefault("campaign.pause_all_ms", []).append(value)
                await until_idle(lambda: sum(mesh_cpu_seconds(env).values()), timeout_s=120, busy_share=0.1)
    finally:
        await simulator.aclose()
    pauses = samples.pop("campaign.pause_all_ms", [])
    if pauses:
        samples["campaign.pause_ms"] = [percentile(pauses, 0.99)]
    return samples


UNITS = {"campaign.recipients_per_s": "1/s", "campaign.sends_per_s": "1/s", "campaign.expand_rss_mb": "MB",
         "campaign.cpu_us_per_email": "us"}
TARGETS = {"campaign.recipients_per_s": 10_000, "campaign.expand_rss_mb": 256, "campaign.pause_ms": 1000,
           "campaign.first_email_ms": 2000, "campaign.sends_per_s": 2000}
HEADLINES: dict[str, floor.FloorName] = {
    "campaign.recipients_per_s": "pg", "campaign.sends_per_s": "pg", "campaign.first_email_ms": "grpc",
    "campaign.pause_ms": "grpc",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Start the mesh, measure the floors, then ``--runs`` times the campaigns, print the medians as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--recipients", type=int, default=1_000_000, help="recipients expanded per run")
    parser.add_argument("--drain", type=int, default=100_000, help="recipients of the drained campaign")
    parser.add_argument("--first-runs", type=int, default=5, help="first-email measurements per run")
    parser.add_argument("--pauses", type=int, default=10, help="pauses per run")
    args = parser.parse_args(argv)
    with environment() as env:
        waited = asyncio.run(until_idle(lambda: sum(mesh_cpu_seconds(env).values()), timeout_s=30, busy_share=0.1))
        print(f"mesh idle after {waited:.1f} s", file=sys.stderr, flush=True)
        yardstick = floor.measure(env.config.postgres_dsn)
        samples = asyncio.run(measure_all(env, args))
    floor.print_figures(floor.median_figures(samples, UNITS, TARGETS), yardstick, HEADLINES)


if __name__ == "__main__":
    main()
