"""Ingest throughput, latency and attachment streaming, against ingest and the ledger running as processes.

Prints one JSON line per metric:

- ``ingest.accept_per_s``, ``ingest.accept_p50_ms``, ``ingest.accept_p99_ms``: many concurrent ``SendEmail``
  calls (each with its own request_id) through one ingest process, for ``--duration`` seconds;
- ``ingest.batch_accept_per_s``: the same emails sent with ``BatchSendEmails`` (``--batch-size`` a call);
- ``attachment.upload_mb_per_s``: one 150 MiB ``UploadAttachment`` (MB = 10^6 bytes), first frame to reply;
- ``attachment.upload_rss_growth_mb``: how much the ingest process' peak RSS grew during that upload (MiB).

Uses the Postgres, Redis and NATS servers named by ``ESP_BENCH_POSTGRES_DSN`` / ``ESP_BENCH_REDIS_URL`` /
``ESP_BENCH_NATS_URL`` (local defaults), a throw-away database and namespace, and a private moto S3 server.
Nothing consumes the queued emails: the benchmark measures accepting them.

Run: ``make bench BENCH=ingest`` or ``python -m bench.ingest_bench [--duration 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import nats
import redis
from esp.v1 import attachments_pb2, attachments_pb2_grpc, common_pb2, messages_pb2, messages_pb2_grpc

from dev import mesh as m
from dev import pgtools, seed
from libs.common.db import migrate_services

ADMIN_DSN = os.environ.get("ESP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ESP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("ESP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
MIB = 1024 * 1024
UPLOAD_BYTES = 150 * MIB


@dataclass(frozen=True)
class Target:
    """The running mesh under test."""

    endpoint: str
    key: str
    ingest_pid: int
    metrics_url: str

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


async def concurrent_sends(target: Target, duration_s: float, callers: int) -> tuple[float, list[float]]:
    """Emails accepted per second with ``callers`` concurrent SendEmail loops; and every call's latency (s)."""
    run = secrets.token_hex(4)
    latencies: list[float] = []
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(target.endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        await stub.SendEmail(email(next(counter), run), metadata=target.auth, timeout=30)  # warm up
        deadline = time.perf_counter() + duration_s

        async def caller() -> int:
            done = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await stub.SendEmail(email(next(counter), run), metadata=target.auth, timeout=30)
                latencies.append(time.perf_counter() - started)
                done += 1
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, latencies


async def batched_sends(target: Target, duration_s: float, batch_size: int, callers: int) -> float:
    """Emails accepted per second through BatchSendEmails."""
    run = secrets.token_hex(4)
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(target.endpoint, options=[
            ("grpc.max_receive_message_length", 64 * MIB)]) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        deadline = time.perf_counter() + duration_s

        async def caller() -> int:
            done = 0
            while time.perf_counter() < deadline:
                request = messages_pb2.BatchSendEmailsRequest(
                    requests=[email(next(counter), run) for _ in range(batch_size)])
                reply = await stub.BatchSendEmails(request, metadata=target.auth, timeout=60)
                failed = [r.error for r in reply.results if r.HasField("error")]
                if failed:
                    raise RuntimeError(f"{len(failed)} emails of a batch were refused, e.g. {failed[0]}")
                done += batch_size
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(caller() for _ in range(callers)))
        return sum(counts) / (time.perf_counter() - started)


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


async def upload(target: Target) -> tuple[float, float]:
    """(MB/s, peak RSS growth in MiB) of one 150 MiB upload."""
    digest = hashlib.sha256()
    for piece in generated(UPLOAD_BYTES):
        digest.update(piece)

    async def frames(size: int, sha256: str) -> AsyncIterator[attachments_pb2.UploadAttachmentRequest]:
        yield attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="bench.bin", content_type="application/octet-stream", size_bytes=size, sha256=sha256))
        for piece in generated(size):
            yield attachments_pb2.UploadAttachmentRequest(chunk=piece)

    async with grpc.aio.insecure_channel(target.endpoint) as channel:
        stub = attachments_pb2_grpc.AttachmentServiceStub(channel)
        warm = hashlib.sha256(b"".join(generated(16 * MIB))).hexdigest()
        await stub.UploadAttachment(frames(16 * MIB, warm), metadata=target.auth, timeout=120)
        _reset_peak(target.ingest_pid)
        baseline = _status(target.ingest_pid, "VmRSS")
        started = time.perf_counter()
        stored = await stub.UploadAttachment(frames(UPLOAD_BYTES, digest.hexdigest()), metadata=target.auth,
                                             timeout=600)
        elapsed = time.perf_counter() - started
        growth = _status(target.ingest_pid, "VmHWM") - baseline
    if stored.size_bytes != UPLOAD_BYTES or stored.sha256 != digest.hexdigest():
        raise RuntimeError(f"the upload came back wrong: {stored}")
    return UPLOAD_BYTES / elapsed / 1e6, growth / MIB


@contextlib.contextmanager
def running_mesh(log_dir: Path) -> Iterator[Target]:
    """A database, moto, and the ledger and ingest processes; all removed afterwards."""
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
        yield Target(endpoint, key, mesh.processes["ingest"].popen.pid, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        if mesh is not None:
            mesh.stop()
        if s3 is not None:
            s3.stop()
        asyncio.run(_forget(namespace))
        pgtools.drop_database(ADMIN_DSN, name)


def _unlimited(channel: grpc.Channel, admin_token: str) -> None:
    """Lift the bench tenant's rate limits far above what one process can take."""
    from esp.v1 import tenants_pb2, tenants_pb2_grpc

    stub = tenants_pb2_grpc.TenantServiceStub(channel)
    auth = (("authorization", f"Bearer {admin_token}"),)
    tenant = stub.GetTenant(tenants_pb2.GetTenantRequest(name="tenants/bench"), metadata=auth)
    tenant.otp_rate_per_second = tenant.transactional_rate_per_second = tenant.bulk_rate_per_second = 1e6
    stub.UpdateTenant(tenants_pb2.UpdateTenantRequest(tenant=tenant), metadata=auth)


async def _forget(namespace: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for stream in (f"{namespace}_SEND", f"{namespace}_EVENTS"):
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        with contextlib.suppress(Exception):
            await js.delete_key_value(f"{namespace}_providers")
    finally:
        await nc.close()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{namespace}*", count=1000):
        client.delete(key)
    client.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_sizes(target: Target) -> dict[str, tuple[float, float]]:
    """(requests, batches) so far per batcher of the ingest process, from its Prometheus metrics."""
    totals: dict[str, list[float]] = {}
    for line in httpx.get(target.metrics_url, timeout=5).text.splitlines():
        for suffix, index in (("_sum", 0), ("_count", 1)):
            if line.startswith(f"esp_ingest_batch_size{suffix}{{"):
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
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--batch-callers", type=int, default=4)
    parser.add_argument("--skip-upload", action="store_true")
    args = parser.parse_args(argv)
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="esp-bench-ingest-") as logs, running_mesh(Path(logs)) as target:
        cpu, batching = cpu_seconds(target.ingest_pid), batch_sizes(target)
        rate, latencies = asyncio.run(concurrent_sends(target, args.duration, args.callers))
        cpu_per_email = (cpu_seconds(target.ingest_pid) - cpu) / (rate * args.duration)
        print(f"SendEmail x{args.callers}: {rate:,.0f}/s, ingest CPU {cpu_per_email * 1e6:,.0f} µs/email, "
              f"{describe_batching(batching, batch_sizes(target))}", file=sys.stderr)
        results += [
            {"metric": "ingest.accept_per_s", "value": round(rate), "unit": "1/s"},
            {"metric": "ingest.accept_p50_ms", "value": round(statistics.median(latencies) * 1000, 2), "unit": "ms"},
            {"metric": "ingest.accept_p99_ms", "value": round(_percentile(latencies, 0.99) * 1000, 2), "unit": "ms"},
        ]
        cpu, batching = cpu_seconds(target.ingest_pid), batch_sizes(target)
        batch_rate = asyncio.run(batched_sends(target, args.duration, args.batch_size, args.batch_callers))
        cpu_per_email = (cpu_seconds(target.ingest_pid) - cpu) / (batch_rate * args.duration)
        print(f"BatchSendEmails of {args.batch_size} x{args.batch_callers}: {batch_rate:,.0f}/s, ingest CPU "
              f"{cpu_per_email * 1e6:,.0f} µs/email, {describe_batching(batching, batch_sizes(target))}",
              file=sys.stderr)
        results.append({"metric": "ingest.batch_accept_per_s", "value": round(batch_rate), "unit": "1/s"})
        if not args.skip_upload:
            mb_per_s, growth = asyncio.run(upload(target))
            results += [
                {"metric": "attachment.upload_mb_per_s", "value": round(mb_per_s, 1), "unit": "MB/s"},
                {"metric": "attachment.upload_rss_growth_mb", "value": round(growth, 1), "unit": "MiB"},
            ]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
