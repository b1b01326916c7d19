"""``esp events list``: the tenant's message events, oldest first, as webhooks deliver them (``EventService``);
``esp events export``: a range of them as CSV (``exports.py``).

Errors from the mesh are printed as ``esp send`` prints them and exit with status 1; arguments the CLI itself cannot
use exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC

import grpc
from esp.v1 import events_pb2, events_pb2_grpc

from libs.client.exports import add_event_export
from libs.client.rpc import auth_metadata, connection, describe_error
from libs.client.webhooks import instant

__all__ = ["add_commands", "event_line"]

PAGE = 200
"""Events asked for per call."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {text!r}")
    return int(text)


def event_line(e: events_pb2.Event) -> str:
    """One event: time, type, message (or campaign), recipient, then what else it says."""
    when = str(e.event_time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")).replace("+00:00", "Z")
    subject = e.message or e.campaign or "-"
    details = [f"provider={e.provider}" if e.provider else "", f"reason={e.reason}" if e.reason else "",
               f"bounce={e.bounce_type}" if e.bounce_type else "", f"url={e.url}" if e.url else "",
               f"attempt={e.attempt}" if e.attempt else "", f"tags={','.join(e.tags)}" if e.tags else ""]
    return "  ".join(part for part in (when, f"{e.type:<20}", subject, e.recipient or "-", *details) if part)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the events matching every filter given, oldest first."""
    request = events_pb2.ListEventsRequest(
        types=args.type, recipient=args.recipient or "", tag=args.tag or "",
        message=(args.message if args.message.startswith("messages/") else f"messages/{args.message}")
        if args.message else "",
        campaign=(args.campaign if args.campaign.startswith("campaigns/") else f"campaigns/{args.campaign}")
        if args.campaign else "")
    if args.since is not None:
        request.start_time.CopyFrom(args.since)
    if args.until is not None:
        request.end_time.CopyFrom(args.until)
    endpoint, api_key = connection()
    shown = 0
    with grpc.insecure_channel(endpoint) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            while shown < args.limit:
                request.page_size = min(PAGE, args.limit - shown)
                page = stub.ListEvents(request, metadata=auth_metadata(api_key), timeout=30)
                for event in page.events[:args.limit - shown]:
                    print(event_line(event))
                    shown += 1
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
        except grpc.RpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``events`` and its subcommands to the ``esp`` parser's subcommands."""
    events = sub.add_parser(
        "events", help="list the message events (what webhooks deliver)",
        description="The tenant's message events (message.accepted, message.sent, message.delivered, ...), oldest "
                    "first. Every filter given must match.")
    commands = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="list events, oldest first: time, type, message, recipient, details")
    listing.add_argument("--type", action="append", default=[], metavar="TYPE",
                         help="only this event type, e.g. message.delivered (repeatable)")
    listing.add_argument("--message", metavar="ID", help="only this message's (messages/{id} or the bare id)")
    listing.add_argument("--recipient", metavar="ADDRESS", help="only this recipient's")
    listing.add_argument("--tag", help="only messages with this tag")
    listing.add_argument("--campaign", metavar="ID", help="only this campaign's (campaigns/{id} or the bare id)")
    listing.add_argument("--since", type=instant, metavar="TIME", help="at or after: ISO 8601, or a duration ago (2h)")
    listing.add_argument("--until", type=instant, metavar="TIME", help="before: ISO 8601, or a duration ago")
    listing.add_argument("--limit", type=_positive, default=100, help="at most this many (default 100)")
    listing.set_defaults(run=cmd_list)
    add_event_export(commands)
