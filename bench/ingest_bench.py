"""Ingest throughput, latency and attachment streaming, against ingest and the ledger running as processes.

Prints one JSON line per metric:

- ``ingest.accept_per_s``, ``ingest.accept_p50_ms``, ``ingest.accept_p99_ms``: ``--callers`` concurrent
  ``SendEmail`` calls through one ingest process for ``--duration`` seconds, made by h2load (nghttp2's HTTP/2
  load generator, written in C) speaking gRPC over HTTP/2. A Python gRPC client costs about 300 µs of CPU per call,
  as much as the server's own gRPC layer, on the same two cores as the mesh; h2load costs a tenth of that. h2load
  sends one request body over and over, so these emails carry no request_id: each call is a new email. Every
  call counts only once Postgres holds its message (h2load cannot read gRPC's status trailer);
- ``ingest.batch_accept_per_s``: emails sent with ``BatchSendEmails`` (``--batch-size`` a call) by a Python load
  generator in its own process (``--load-processes``), each email with its own request_id;
- ``attachment.upload_mb_per_s``: a 150 MiB ``UploadAttachment`` (MB = 10^6 bytes), first frame to reply, the
  median of three;
- ``attachment.upload_rss_growth_mb``: how much the ingest process' peak RSS grew during an upload (MiB, the
  largest of the three).

Before them, once ingest is idle, it measures the floors (:mod:`bench.floor`; the Postgres one in the benchmark's
database) and prints its headline figures against them as ``<metric>_vs_floor``: the unary figures and the upload
against the gRPC floor, ``ingest.batch_accept_per_s`` (Postgres rows, gRPC amortised over 250 emails a call)
against the Postgres floor.

Uses the Postgres, Redis and NATS servers named by ``ESP_BENCH_POSTGRES_DSN`` / ``ESP_BENCH_REDIS_URL`` /
``ESP_BENCH_NATS_URL`` (local defaults), a throw-away database and namespace, and a private S3 server (rclone).
Nothing consumes the queued emails: the benchmark measures accepting them.

Run: ``make bench BENCH=ingest`` (which installs h2load, Debian's ``nghttp2-client``, when it is missing) or
``python -m bench.ingest_bench [--duration 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
from esp.v1 import attachments_pb2, attachments_pb2_grpc, common_pb2, messages_pb2, messages_pb2_grpc

from bench import floor
from bench.h2load import run_h2load
from bench.processes import cpu_seconds, run_and_report, until_idle
from dev import mesh as m
from dev import pgtools, seed
from libs.common.db import migrate_services

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ESP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("ESP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
MIB = 1024 * 1024
UPLOAD_BYTES = 150 * MIB


HEADLINES: dict[str, floor.FloorName] = {
    "ingest.accept_per_s": "grpc",
    "ingest.accept_p50_ms": "grpc",
    "ingest.accept_p99_ms": "grpc",
    "ingest.batch_accept_per_s": "pg",
    "attachment.upload_mb_per_s": "grpc",
}
"""The figures printed against a floor too, and which (:mod:`bench.floor`)."""


@dataclass(frozen=True)
class Target:
    """The running mesh under test."""

    endpoint: str
    key: str
    ingest_pid: int
    metrics_url: str
    dsn: str

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


def email(i: int, run: str) -> messages_pb2.SendEmailRequest:
    return messages_pb2.SendEmailRequest(
        request_id=f"{run}-{i}", message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        to=[common_pb2.EmailAddress(email=f"user{i % 5000}@example.net", name="Bench User")],
        subject="Your order has shipped", text_body="Order 1234 is on its way.", html_body="<p>Order 1234</p>",
        tags=["bench"], metadata={"order": str(i)},
        **{"from": common_pb2.EmailAddress(email="shop@example.com", name="Shop")})


_SHARED = messages_pb2.SendEmailRequest(
    message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, subject="Your order has shipped",
    text_body="Order 1234 is on its way.", html_body="<p>Order 1234</p>", tags=["bench"],
    **{"from": common_pb2.EmailAddress(email="shop@example.com", name="Shop")}).SerializeToString()


def email_bytes(i: int, run: str) -> bytes:
    """``email(i, run)`` serialised, cheaply: the fields all emails share are serialised once and this email's own
    fields appended (a parser merges concatenated messages), so the load generator spends its CPU on calls."""
    serialized: bytes = _SHARED + messages_pb2.SendEmailRequest(
        request_id=f"{run}-{i}", to=[common_pb2.EmailAddress(email=f"user{i % 5000}@example.net", name="Bench User")],
        metadata={"order": str(i)}).SerializeToString()
    return serialized


@dataclass(frozen=True)
class LoadJob:
    """What one load-generating process does: ``callers`` concurrent loops for ``duration_s``, each sending one
    BatchSendEmails of ``batch_size`` emails at a time."""

    endpoint: str
    auth: tuple[tuple[str, str], ...]
    duration_s: float
    callers: int
    batch_size: int
    run: str


@dataclass(frozen=True)
class LoadResult:
    emails: int
    elapsed_s: float
    cpu_s: float
    latencies_s: list[float]


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _generate(job: LoadJob, ready: Any, go: Any) -> LoadResult:
    latencies: list[float] = []
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(job.endpoint, options=[
            ("grpc.max_receive_message_length", 64 * MIB)]) as channel:
        # The warm-up call sends raw bytes (email_bytes) and does not parse the reply (a failed call raises)
        send = channel.unary_unary("/esp.v1.MessageService/SendEmail")
        send_batch = messages_pb2_grpc.MessageServiceStub(channel).BatchSendEmails
        await send(email_bytes(next(counter), job.run), metadata=job.auth, timeout=30)  # warm up
        ready.set()
        await asyncio.to_thread(go.wait)
        deadline = time.perf_counter() + job.duration_s

        async def batches() -> int:
            done = 0
            while time.perf_counter() < deadline:
                request = messages_pb2.BatchSendEmailsRequest(
                    requests=[email(next(counter), job.run) for _ in range(job.batch_size)])
                started = time.perf_counter()
                reply = await send_batch(request, metadata=job.auth, timeout=60)
                latencies.append(time.perf_counter() - started)
                failed = [r.error for r in reply.results if r.HasField("error")]
                if failed:
                    raise RuntimeError(f"{len(failed)} emails of a batch were refused, e.g. {failed[0]}")
                done += job.batch_size
            return done

        cpu, started = _process_cpu_s(), time.perf_counter()
        counts = await asyncio.gather(*(batches() for _ in range(job.callers)))
        elapsed = time.perf_counter() - started
        return LoadResult(sum(counts), elapsed, _process_cpu_s() - cpu, latencies)


def _load_process(job: LoadJob, ready: Any, go: Any, out: Any) -> None:
    """Body of a load-generating process (its own interpreter, event loop and channel)."""
    run_and_report(out, "load generator", _generate(job, ready, go))


def generate_load(target: Target, duration_s: float, callers: int, *, batch_size: int,
                  processes: int = 1) -> tuple[float, float, list[float]]:
    """Run ``callers`` concurrent senders split over ``processes`` separate processes (none shares ingest's cores
    more than it must, and none is held back by this process' event loop); all start together. Returns emails
    accepted per second, the load generators' CPU seconds per email, and every call's latency (s)."""
    context = multiprocessing.get_context("spawn")  # grpc's threads do not survive fork
    run = secrets.token_hex(4)
    go = context.Event()
    workers = []
    for index in range(processes):
        ready = context.Event()
        receive, send = context.Pipe(duplex=False)
        share = callers // processes + (1 if index < callers % processes else 0)
        job = LoadJob(target.endpoint, target.auth, duration_s, share, batch_size, f"{run}{index}")
        process = context.Process(target=_load_process, args=(job, ready, go, send), daemon=True)
        process.start()
        workers.append((process, ready, receive))
    try:
        for process, ready, _ in workers:
            while not ready.wait(1):
                if not process.is_alive():
                    raise RuntimeError(f"a load generator exited with code {process.exitcode} before starting")
        go.set()
        results = []
        for _, _, receive in workers:
            result = receive.recv()
            if isinstance(result, Exception):
                raise result
            results.append(result)
    finally:
        for process, _, _ in workers:
            process.join(5)
            if process.is_alive():
                process.kill()
    rate = sum(r.emails / r.elapsed_s for r in results)
    emails = sum(r.emails for r in results)
    return rate, sum(r.cpu_s for r in results) / max(1, emails), [x for r in results for x in r.latencies_s]


def messages_stored(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM ingest.messages").fetchone()
    return int(row[0]) if row else 0


def send_email_outcomes(target: Target) -> dict[str, float]:
    """SendEmail calls ingest has answered so far, per gRPC status code, from its Prometheus metrics."""
    outcomes: dict[str, float] = {}
    for line in httpx.get(target.metrics_url, timeout=5).text.splitlines():
        if line.startswith("esp_grpc_requests_total{") and 'method="/esp.v1.MessageService/SendEmail"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            outcomes[code] = outcomes.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return outcomes


def h2load_unary(target: Target, duration_s: float, callers: int,
                 connections: int = 4) -> tuple[float, float, list[float]]:
    """``callers`` concurrent SendEmail calls over ``connections`` HTTP/2 connections for ``duration_s``, by
    h2load. Returns emails accepted per second, h2load's CPU seconds per call, and every call's latency (s)."""
    body = messages_pb2.SendEmailRequest.FromString(email_bytes(0, "h2load"))
    body.ClearField("request_id")
    payload = body.SerializeToString()
    with grpc.insecure_channel(target.endpoint) as channel:  # one call first: a refusal shows as an error here
        channel.unary_unary("/esp.v1.MessageService/SendEmail")(payload, metadata=target.auth, timeout=30)
    stored_before, outcomes_before = messages_stored(target.dsn), send_email_outcomes(target)
    run = run_h2load(target.endpoint, "/esp.v1.MessageService/SendEmail", payload, duration_s=duration_s,
                     callers=callers, connections=connections, headers=(f"authorization: Bearer {target.key}",))
    refused = {code: n - outcomes_before.get(code, 0.0) for code, n in send_email_outcomes(target).items()
               if code != "OK" and n > outcomes_before.get(code, 0.0)}
    # Calls still in flight when h2load stops are cancelled (ingest counts them CANCELLED) and not logged; ingest
    # stores them all the same. More cancelled calls than could be in flight would be a fault.
    if refused.get("CANCELLED", 0.0) <= callers:
        refused.pop("CANCELLED", None)
    stored = messages_stored(target.dsn) - stored_before
    if run.http_errors or refused or stored < run.calls:
        raise RuntimeError(f"of {run.calls} SendEmail calls {run.http_errors} got an HTTP error, ingest refused "
                           f"{refused} and {stored} emails were stored")
    # h2load's --duration counts from its first connection; in-flight calls then finish, so rate over the whole run
    return run.calls / run.elapsed_s, run.load_cpu_s / max(1, run.calls), run.latencies_s


def generated(size: int) -> Iterator[bytes]:
    block = hashlib.shake_256(b"bench attachment").digest(MIB)
    for offset in range(0, size, MIB):
        yield ((offset // MIB).to_bytes(8, "big") + block[8:])[:min(MIB, size - offset)]


def _reset_peak(pid: int) -> None:
    """The process' peak RSS (VmHWM) := its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


async def upload(target: Target, runs: int = 3) -> tuple[float, float]:
    """(median MB/s, largest peak RSS growth in MiB) of ``runs`` 150 MiB uploads, one after another."""
    digest = hashlib.sha256()
    for piece in generated(UPLOAD_BYTES):
        digest.update(piece)

    async def frames(size: int, sha256: str) -> AsyncIterator[attachments_pb2.UploadAttachmentRequest]:
        yield attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="bench.bin", content_type="application/octet-stream", size_bytes=size, sha256=sha256))
        for piece in generated(size):
            yield attachments_pb2.UploadAttachmentRequest(chunk=piece)

    # The accept measurements leave ingest publishing its outbox for a while; uploading meanwhile would measure that
    settled_after = await until_idle(lambda: cpu_seconds(target.ingest_pid), timeout_s=60)
    print(f"ingest idle after {settled_after:.1f} s; uploading", file=sys.stderr)
    rates: list[float] = []
    growths: list[float] = []
    async with grpc.aio.insecure_channel(target.endpoint) as channel:
        stub = attachments_pb2_grpc.AttachmentServiceStub(channel)
        warm = hashlib.sha256(b"".join(generated(16 * MIB))).hexdigest()
        await stub.UploadAttachment(frames(16 * MIB, warm), metadata=target.auth, timeout=120)
        for _ in range(runs):
            _reset_peak(target.ingest_pid)
            baseline = _status(target.ingest_pid, "VmRSS")
            cpu = cpu_seconds(target.ingest_pid)
            started = time.perf_counter()
            stored = await stub.UploadAttachment(frames(UPLOAD_BYTES, digest.hexdigest()), metadata=target.auth,
                                                 timeout=600)
            elapsed = time.perf_counter() - started
            growths.append((_status(target.ingest_pid, "VmHWM") - baseline) / MIB)
            if stored.size_bytes != UPLOAD_BYTES or stored.sha256 != digest.hexdigest():
                raise RuntimeError(f"the upload came back wrong: {stored}")
            rates.append(UPLOAD_BYTES / elapsed / 1e6)
            # CPU per upload is the steadier figure on a shared machine; the rate moves with the load
            print(f"UploadAttachment 150 MiB: {rates[-1]:.1f} MB/s in {elapsed:.2f} s, ingest CPU "
                  f"{cpu_seconds(target.ingest_pid) - cpu:.2f} s, RSS growth {growths[-1]:.1f} MiB, "
                  f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return statistics.median(rates), max(growths)


@contextlib.contextmanager
def running_mesh(log_dir: Path) -> Iterator[Target]:
    """A database, an S3 server (rclone), and the ledger and ingest processes; all removed afterwards."""
    namespace = f"bench{secrets.token_hex(3)}"
    name = pgtools.unique_database_name("esp_bench_ingest")
    dsn = pgtools.create_database(ADMIN_DSN, name)
    s3 = None
    mesh = None
    try:
        asyncio.run(migrate_services(dsn, ["ingest", "ledger"]))
        s3_port = m.free_port()
        s3 = m.start_s3(s3_port, log_dir)
        config = m.MeshConfig(
            postgres_dsn=dsn, redis_url=REDIS_URL, nats_url=NATS_URL, s3_endpoint=f"http://127.0.0.1:{s3_port}",
            namespace=namespace, admin_token=secrets.token_hex(16), ports={n: m.free_port() for n in m.GRPC_PORTS},
            log_dir=log_dir, services=("ledger", "ingest"),
            extra_env={"ESP_S3_BUCKET": f"{namespace}-attachments", "ESP_LOG_LEVEL": "WARNING",
                       "ESP_SHUTDOWN_GRACE_S": "3"})
        metrics_port = m.free_port()
        mesh = m.Mesh(config)
        for service in config.services:  # ingest's metrics show how well requests batch
            config.extra_env["ESP_METRICS_PORT"] = str(metrics_port) if service == "ingest" else "0"
            mesh.start_service(service)
        endpoint = f"127.0.0.1:{config.ports['ingest']}"
        with grpc.insecure_channel(endpoint) as channel:
            seed.ensure_tenant(channel, config.admin_token, "bench")
            key = seed.create_api_key(channel, config.admin_token, "bench")
            seed.top_up(channel, config.admin_token, "bench", 10**12, "bench-credits")
            _unlimited(channel, config.admin_token)
        yield Target(endpoint, key, mesh.processes["ingest"].popen.pid, f"http://127.0.0.1:{metrics_port}/metrics",
                     dsn)
    finally:
        if mesh is not None:
            mesh.stop()
        if s3 is not None:
            s3.stop()
        asyncio.run(m.forget_namespace(namespace, NATS_URL, REDIS_URL))
        pgtools.drop_database(ADMIN_DSN, name)


def _unlimited(channel: grpc.Channel, admin_token: str) -> None:
    """Lift the bench tenant's rate limits far above what one process can take."""
    from esp.v1 import tenants_pb2, tenants_pb2_grpc

    stub = tenants_pb2_grpc.TenantServiceStub(channel)
    auth = (("authorization", f"Bearer {admin_token}"),)
    tenant = stub.GetTenant(tenants_pb2.GetTenantRequest(name="tenants/bench"), metadata=auth)
    tenant.otp_rate_per_second = tenant.transactional_rate_per_second = tenant.bulk_rate_per_second = 1e6
    stub.UpdateTenant(tenants_pb2.UpdateTenantRequest(tenant=tenant), metadata=auth)



def batch_sizes(target: Target) -> dict[str, tuple[float, float]]:
    """(requests, batches) so far per batcher of the ingest process, from its Prometheus metrics."""
    totals: dict[str, list[float]] = {}
    for line in httpx.get(target.metrics_url, timeout=5).text.splitlines():
        for suffix, index in (("_sum", 0), ("_count", 1)):
            if line.startswith(f"esp_batch_size{suffix}{{"):
                name = line.split('batcher="', 1)[1].split('"', 1)[0]
                totals.setdefault(name, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {name: (v[0], v[1]) for name, v in totals.items()}


def describe_batching(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    parts = []
    for name, (requests, batches) in sorted(after.items()):
        r0, b0 = before.get(name, (0.0, 0.0))
        if batches > b0:
            parts.append(f"{name} {(requests - r0) / (batches - b0):.1f}")
    return "mean batch: " + ", ".join(parts)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput measurement")
    parser.add_argument("--callers", type=int, default=256, help="concurrent SendEmail calls")
    parser.add_argument("--connections", type=int, default=4, help="HTTP/2 connections h2load spreads them over")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--batch-callers", type=int, default=4)
    parser.add_argument("--load-processes", type=int, default=1,
                        help="processes the callers are spread over (each with its own event loop)")
    parser.add_argument("--skip-upload", action="store_true")
    args = parser.parse_args(argv)
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="esp-bench-ingest-") as logs, running_mesh(Path(logs)) as target:
        asyncio.run(until_idle(lambda: cpu_seconds(target.ingest_pid), timeout_s=30))
        yardstick = floor.measure(target.dsn)
        cpu, batching = cpu_seconds(target.ingest_pid), batch_sizes(target)
        rate, load_cpu, latencies = h2load_unary(target, args.duration, args.callers, args.connections)
        cpu_per_email = (cpu_seconds(target.ingest_pid) - cpu) / (rate * args.duration)
        print(f"SendEmail x{args.callers}: {rate:,.0f}/s, ingest CPU {cpu_per_email * 1e6:,.0f} µs/email, load "
              f"generator CPU {load_cpu * 1e6:,.0f} µs/email, {describe_batching(batching, batch_sizes(target))}",
              file=sys.stderr)
        results += [
            {"metric": "ingest.accept_per_s", "value": round(rate), "unit": "1/s"},
            {"metric": "ingest.accept_p50_ms", "value": round(statistics.median(latencies) * 1000, 2), "unit": "ms"},
            {"metric": "ingest.accept_p99_ms", "value": round(_percentile(latencies, 0.99) * 1000, 2), "unit": "ms"},
        ]
        cpu, batching = cpu_seconds(target.ingest_pid), batch_sizes(target)
        batch_rate, load_cpu, _ = generate_load(target, args.duration, args.batch_callers,
                                                batch_size=args.batch_size, processes=args.load_processes)
        cpu_per_email = (cpu_seconds(target.ingest_pid) - cpu) / (batch_rate * args.duration)
        print(f"BatchSendEmails of {args.batch_size} x{args.batch_callers}: {batch_rate:,.0f}/s, ingest CPU "
              f"{cpu_per_email * 1e6:,.0f} µs/email, load generator CPU {load_cpu * 1e6:,.0f} µs/email, "
              f"{describe_batching(batching, batch_sizes(target))}", file=sys.stderr)
        results.append({"metric": "ingest.batch_accept_per_s", "value": round(batch_rate), "unit": "1/s"})
        if not args.skip_upload:
            mb_per_s, growth = asyncio.run(upload(target))
            results += [
                {"metric": "attachment.upload_mb_per_s", "value": round(mb_per_s, 1), "unit": "MB/s"},
                {"metric": "attachment.upload_rss_growth_mb", "value": round(growth, 1), "unit": "MiB"},
            ]
    floor.print_figures(results, yardstick, HEADLINES)


if __name__ == "__main__":
    main()
