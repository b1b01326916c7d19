"""``esp``: send an email and follow its status, run campaigns (``esp campaign ...``), add and verify sending
domains (``esp domain ...``), manage webhook endpoints and read their delivery log (``esp webhook ...``), list
events (``esp events list``) and export events and figures as CSV (``esp events export``, ``esp stats export``),
from the command line.

Connection settings come from ``.dev/demo.env`` when run inside the repository (written by ``make run``), and from
the ``ESP_ENDPOINT`` / ``ESP_API_KEY`` environment variables otherwise (the environment wins over the file).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from esp.v1 import common_pb2, messages_pb2, messages_pb2_grpc

from libs.client.campaigns import add_commands as add_campaign_commands
from libs.client.domains import add_commands as add_domain_commands
from libs.client.events import add_commands as add_event_commands
from libs.client.exports import add_stats_commands
from libs.client.rpc import auth_metadata, connection, describe_error, upload_attachment
from libs.client.webhooks import add_commands as add_webhook_commands
from libs.common.message_classes import MessageClass

__all__ = [
    "connection",
    "main",
]

FINAL_STATES = {messages_pb2.MESSAGE_STATE_SENT, messages_pb2.MESSAGE_STATE_DELIVERED,
                messages_pb2.MESSAGE_STATE_BOUNCED, messages_pb2.MESSAGE_STATE_FAILED,
                messages_pb2.MESSAGE_STATE_COMPLAINED, messages_pb2.MESSAGE_STATE_CANCELLED}


def cmd_send(args: argparse.Namespace) -> int:
    endpoint, api_key = connection()
    metadata = auth_metadata(api_key)
    with grpc.insecure_channel(endpoint) as channel:
        try:
            attachment_ids = [upload_attachment(channel, metadata, Path(p)) for p in args.attach]
            request = messages_pb2.SendEmailRequest(
                request_id=args.request_id or "", message_class=MessageClass(args.message_class).proto,
                to=[common_pb2.EmailAddress(email=a) for a in args.to], subject=args.subject,
                text_body=args.text or "", html_body=args.html or "", attachment_ids=attachment_ids,
                tags=args.tag, **{"from": common_pb2.EmailAddress(email=args.sender)})
            reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1
    print(reply.message.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    endpoint, api_key = connection()
    metadata = auth_metadata(api_key)
    name = args.id if args.id.startswith("messages/") else f"messages/{args.id}"
    deadline = time.monotonic() + args.timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        while True:
            try:
                message = stub.GetMessage(messages_pb2.GetMessageRequest(name=name), metadata=metadata, timeout=10)
            except grpc.RpcError as exc:
                if not (args.wait and exc.code() == grpc.StatusCode.NOT_FOUND
                        and time.monotonic() < deadline):
                    print(describe_error(exc), file=sys.stderr)
                    return 1
                time.sleep(0.2)
                continue
            if not args.wait or message.state in FINAL_STATES or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        events = stub.ListMessageEvents(messages_pb2.ListMessageEventsRequest(parent=name, page_size=100),
                                        metadata=metadata, timeout=10).events
    state = messages_pb2.MessageState.Name(message.state).removeprefix("MESSAGE_STATE_").lower()
    print(f"{message.id} {state}" + (f" via {message.provider}" if message.provider else ""))
    for event in events:
        kind = messages_pb2.MessageEventType.Name(event.type).removeprefix("MESSAGE_EVENT_TYPE_").lower()
        when = event.event_time.ToDatetime().isoformat(timespec="milliseconds")
        details = " ".join(x for x in (event.provider, event.reason) if x)
        print(f"  {when}  {kind:<12} {details}")
    return 0 if not args.wait or message.state in FINAL_STATES else 2


def main(argv: list[str] | None = None) -> None:
    """Run the ``esp`` command line with ``argv`` (default: the process's arguments); exits with its status."""
    parser = argparse.ArgumentParser(prog="esp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="send an email; prints its message id")
    send.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    send.add_argument("--from", dest="sender", required=True)
    send.add_argument("--subject", required=True)
    send.add_argument("--text")
    send.add_argument("--html")
    send.add_argument("--class", dest="message_class", choices=sorted(c.value for c in MessageClass),
                      default="transactional")
    send.add_argument("--attach", action="append", default=[], metavar="FILE", help="attachment (repeatable)")
    send.add_argument("--tag", action="append", default=[])
    send.add_argument("--request-id", help="idempotency key: retrying with it never sends twice")
    send.set_defaults(run=cmd_send)
    status = sub.add_parser("status", help="print a message's status and events")
    status.add_argument("id")
    status.add_argument("--wait", action="store_true", help="wait until the message is sent or failed")
    status.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at most (with --wait)")
    status.set_defaults(run=cmd_status)
    add_campaign_commands(sub)
    add_domain_commands(sub)
    add_webhook_commands(sub)
    add_event_commands(sub)
    add_stats_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "send" and not (args.text or args.html):
        parser.error("send needs --text or --html")
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
