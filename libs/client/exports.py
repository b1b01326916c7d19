"""Stats and CSV downloads: ``esp stats show`` (``GetStats`` as a table), ``esp events export`` and ``esp stats
export`` (``ExportEvents``, ``ExportStats``).

Each chunk the mesh streams is written out as it arrives, so an export of any size never sits in memory. With
``-o FILE`` the bytes go to ``FILE.part``, renamed to ``FILE`` only once the stream ended cleanly: a download cut
off (the mesh failed half way, the connection dropped) leaves no file that looks complete. To standard output
there is no such guard; the exit status (1) says the output is incomplete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import grpc
from esp.v1 import common_pb2, events_pb2, events_pb2_grpc, reports_pb2, reports_pb2_grpc
from google.api.httpbody_pb2 import HttpBody

from libs.client.rpc import auth_metadata, connection, describe_error
from libs.client.webhooks import instant

__all__ = ["add_event_export", "add_stats_commands", "download"]

_BUCKETS = ("minute", "hour", "day")
_CLASSES = {"otp": common_pb2.MESSAGE_CLASS_OTP, "transactional": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
            "bulk": common_pb2.MESSAGE_CLASS_BULK}


def _copy(chunks: Iterable[HttpBody], out: BinaryIO) -> int:
    written = 0
    for chunk in chunks:
        out.write(chunk.data)
        written += len(chunk.data)
    out.flush()
    return written


def download(start: Callable[[grpc.Channel], Iterable[HttpBody]], output: str | None) -> int:
    """Run the export ``start`` opens on a channel, writing its bytes to ``output`` (a path; ``-`` or None:
    standard output). Exit status: 0, or 1 after printing the mesh's error."""
    endpoint, _ = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            if output in (None, "-"):
                _copy(start(channel), sys.stdout.buffer)
                return 0
            target = Path(str(output))
            partial = target.with_name(target.name + ".part")
            try:
                with partial.open("wb") as out:
                    written = _copy(start(channel), out)
                os.replace(partial, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
            print(f"{target}: {written} bytes", file=sys.stderr)
            return 0
        except grpc.RpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1


def _name(value: str | None, collection: str) -> str:
    if not value:
        return ""
    return value if value.startswith(f"{collection}/") else f"{collection}/{value}"


def cmd_export_events(args: argparse.Namespace) -> int:
    """Write the events of the range matching every filter given as CSV."""
    request = events_pb2.ExportEventsRequest(
        start_time=args.start, end_time=args.end, types=args.type, message=_name(args.message, "messages"),
        recipient=args.recipient or "", tag=args.tag or "", campaign=_name(args.campaign, "campaigns"))
    _, api_key = connection()

    def start(channel: grpc.Channel) -> Iterable[HttpBody]:
        stub = events_pb2_grpc.EventServiceStub(channel)
        chunks: Iterable[HttpBody] = stub.ExportEvents(request, metadata=auth_metadata(api_key))
        return chunks

    return download(start, args.output)


def _stats_query(args: argparse.Namespace) -> reports_pb2.GetStatsRequest | None:
    """The GetStats request of ``esp stats show|export``; None (after saying why) when the arguments clash."""
    dimensions = [d for d in args.dimension if d not in _BUCKETS]
    buckets = {d for d in args.dimension if d in _BUCKETS} | ({args.bucket} if args.bucket else set())
    if len(buckets) > 1:
        print(f"esp: one time bucket at most, not {', '.join(sorted(buckets))}", file=sys.stderr)
        return None
    return reports_pb2.GetStatsRequest(
        start_time=args.start, end_time=args.end, dimensions=dimensions, bucket=next(iter(buckets), ""),
        metrics=args.metric, message_class=_CLASSES.get(args.message_class or "", 0),
        campaign=_name(args.campaign, "campaigns"), provider=args.provider or "", tag=args.tag or "",
        mailbox_provider=args.mailbox_provider or "", tenant=_name(args.tenant, "tenants"))


def cmd_export_stats(args: argparse.Namespace) -> int:
    """Write the figures GetStats gives for the query as CSV."""
    query = _stats_query(args)
    if query is None:
        return 2
    _, api_key = connection()

    def start(channel: grpc.Channel) -> Iterable[HttpBody]:
        stub = reports_pb2_grpc.StatsServiceStub(channel)
        chunks: Iterable[HttpBody] = stub.ExportStats(reports_pb2.ExportStatsRequest(query=query),
                                                      metadata=auth_metadata(api_key))
        return chunks

    return download(start, args.output)


_SHOWN_METRICS = ("accepted", "sent", "delivered", "bounced", "complained", "failed", "delivery_rate",
                  "complaint_rate", "send_latency", "credits_charged")
"""What ``esp stats show`` prints when no --metric is given (the CSV export has every metric)."""
_LATENCY_METRICS = frozenset({"send_latency", "delivery_latency", "provider_call_latency"})


def _cells(row: reports_pb2.StatsRow, metric: str) -> list[str]:
    if metric in _LATENCY_METRICS:
        latency = getattr(row, metric)
        return [f"{latency.p50_ms:.0f}/{latency.p95_ms:.0f}/{latency.p99_ms:.0f}"]
    value = getattr(row, metric)
    if isinstance(value, float):
        return [f"{value:.2%}" if metric.endswith("_rate") else f"{value:.2f}"]
    return [str(value)]


def cmd_show_stats(args: argparse.Namespace) -> int:
    """Print the figures of the query as a table: a row per group, then the total."""
    query = _stats_query(args)
    if query is None:
        return 2
    if not query.metrics:
        query.metrics.extend(_SHOWN_METRICS)
    endpoint, api_key = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            response = reports_pb2_grpc.StatsServiceStub(channel).GetStats(query, metadata=auth_metadata(api_key))
        except grpc.RpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1
    header = [*response.dimensions, *(f"{m} p50/p95/p99 ms" if m in _LATENCY_METRICS else m
                                      for m in response.metrics)]
    table = [[*(row.dimensions.get(d, "") for d in response.dimensions),
              *(cell for m in response.metrics for cell in _cells(row, m))] for row in response.rows]
    if response.dimensions:
        table.append(["total", *([""] * (len(response.dimensions) - 1)),
                      *(cell for m in response.metrics for cell in _cells(response.total, m))])
    else:
        table.append([cell for m in response.metrics for cell in _cells(response.total, m)])
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(str(cell).rjust(width) if index >= len(response.dimensions) else str(cell).ljust(width)
                        for index, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip())
    return 0


def _range_and_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", type=instant, required=True, metavar="TIME",
                        help="from (inclusive): ISO 8601, or a duration ago (2h)")
    parser.add_argument("--end", type=instant, required=True, metavar="TIME",
                        help="to (exclusive): ISO 8601, or a duration ago")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE (via FILE.part, renamed when complete); default: standard output")


def add_event_export(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export`` to the ``esp events`` subcommands."""
    export = commands.add_parser(
        "export", help="every event of a range as CSV (streamed, any size)",
        description="Every message event of the range (at most the events' retention, 30 days) matching every filter "
                    "given, oldest first, as CSV with a header row. Cells a spreadsheet would take for a formula "
                    "(starting with = + - @) start with a ' added.")
    _range_and_output(export)
    export.add_argument("--type", action="append", default=[], metavar="TYPE",
                        help="only this event type, e.g. message.bounced (repeatable)")
    export.add_argument("--message", metavar="ID", help="only this message's (messages/{id} or the bare id)")
    export.add_argument("--recipient", metavar="ADDRESS", help="only this recipient's")
    export.add_argument("--tag", help="only messages with this tag")
    export.add_argument("--campaign", metavar="ID", help="only this campaign's (campaigns/{id} or the bare id)")
    export.set_defaults(run=cmd_export_events)


def add_stats_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stats`` and its subcommands to the ``esp`` parser's subcommands."""
    stats = sub.add_parser("stats", help="sending figures", description="The tenant's sending figures.")
    commands = stats.add_subparsers(dest="stats_command", required=True, metavar="COMMAND")
    show = commands.add_parser(
        "show", help="the figures of a range as a table, one row per group",
        description="The rows GetStats gives for the query, then the total. Latencies are p50/p95/p99 in ms.")
    show.add_argument("--start", type=instant, default="1d", metavar="TIME",
                      help="from (inclusive): ISO 8601, or a duration ago (default: 1d)")
    show.add_argument("--end", type=instant, default="0s", metavar="TIME",
                      help="to (exclusive): ISO 8601, or a duration ago (default: now)")
    _query_arguments(show, default_metrics="accepted, sent, delivered, bounced, complained, failed, rates, "
                                           "send latency, credits")
    show.set_defaults(run=cmd_show_stats)
    export = commands.add_parser(
        "export", help="the figures of a range as CSV, one row per group",
        description="The rows GetStats gives for the query, as CSV with a header row.")
    _range_and_output(export)
    _query_arguments(export, default_metrics="all")
    export.set_defaults(run=cmd_export_stats)


def _query_arguments(parser: argparse.ArgumentParser, *, default_metrics: str) -> None:
    parser.add_argument("--dimension", action="append", default=[], metavar="NAME",
                        help="group by: provider, message_class, tag, campaign, mailbox_provider (repeatable, in "
                             "order); minute, hour or day cut the range into buckets")
    parser.add_argument("--bucket", choices=_BUCKETS, help="a row per minute, hour or day")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help=f"only this metric, e.g. delivered, complaint_rate (repeatable; default: "
                             f"{default_metrics})")
    parser.add_argument("--class", dest="message_class", choices=sorted(_CLASSES), help="only this class")
    parser.add_argument("--campaign", metavar="ID", help="only this campaign's (campaigns/{id} or the bare id)")
    parser.add_argument("--provider", help="only messages sent through this provider")
    parser.add_argument("--tag", help="only messages with this tag")
    parser.add_argument("--mailbox-provider", help="only messages to this mailbox provider (gmail, yahoo ...)")
    parser.add_argument("--tenant", metavar="ID", help="platform admins: this tenant's figures")
