"""``esp``: send an email and follow its status from the command line.

Connection settings come from ``.dev/demo.env`` when run inside the repository (written by ``make run``), and from
the ``ESP_ENDPOINT`` / ``ESP_API_KEY`` environment variables otherwise (the environment wins over the file).
"""

from __future__ import annotations

import argparse
import hashlib
import mimetypes
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from esp.v1 import attachments_pb2, attachments_pb2_grpc, common_pb2, messages_pb2, messages_pb2_grpc
from grpc_status import rpc_status

from libs.common.message_classes import MessageClass

__all__ = [
    "connection",
    "main",
]

FINAL_STATES = {messages_pb2.MESSAGE_STATE_SENT, messages_pb2.MESSAGE_STATE_DELIVERED,
                messages_pb2.MESSAGE_STATE_BOUNCED, messages_pb2.MESSAGE_STATE_FAILED,
                messages_pb2.MESSAGE_STATE_COMPLAINED}
CHUNK = 1024 * 1024


def _demo_env() -> dict[str, str]:
    for folder in (Path.cwd(), *Path.cwd().parents):
        candidate = folder / ".dev" / "demo.env"
        if candidate.is_file():
            pairs = (line.split("=", 1) for line in candidate.read_text().splitlines() if "=" in line)
            return {k.strip(): v.strip() for k, v in pairs}
    return {}


def connection() -> tuple[str, str]:
    """(endpoint, api key): the environment first, then .dev/demo.env."""
    file_values = _demo_env()
    endpoint = os.environ.get("ESP_ENDPOINT") or file_values.get("ESP_ENDPOINT", "")
    api_key = os.environ.get("ESP_API_KEY") or file_values.get("ESP_API_KEY", "")
    if not endpoint or not api_key:
        sys.exit("esp: set ESP_ENDPOINT and ESP_API_KEY (or run `make run` in the repository first)")
    return endpoint, api_key


def _describe(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)
    lines = [f"{exc.code().name}: {exc.details()}"]
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                extra = ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
                lines.append(f"  reason: {info.reason}" + (f" ({extra})" if extra else ""))
    return "\n".join(lines)


def _upload(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)

    def frames() -> Iterator[attachments_pb2.UploadAttachmentRequest]:
        yield attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename=path.name, content_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            size_bytes=path.stat().st_size, sha256=digest.hexdigest()))
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                yield attachments_pb2.UploadAttachmentRequest(chunk=block)

    stub = attachments_pb2_grpc.AttachmentServiceStub(channel)
    return str(stub.UploadAttachment(frames(), metadata=metadata, timeout=600).id)


def cmd_send(args: argparse.Namespace) -> int:
    endpoint, api_key = connection()
    metadata = (("authorization", f"Bearer {api_key}"),)
    with grpc.insecure_channel(endpoint) as channel:
        try:
            attachment_ids = [_upload(channel, metadata, Path(p)) for p in args.attach]
            request = messages_pb2.SendEmailRequest(
                request_id=args.request_id or "", message_class=MessageClass(args.message_class).proto,
                to=[common_pb2.EmailAddress(email=a) for a in args.to], subject=args.subject,
                text_body=args.text or "", html_body=args.html or "", attachment_ids=attachment_ids,
                tags=args.tag, **{"from": common_pb2.EmailAddress(email=args.sender)})
            reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            print(_describe(exc), file=sys.stderr)
            return 1
    print(reply.message.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    endpoint, api_key = connection()
    metadata = (("authorization", f"Bearer {api_key}"),)
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
                    print(_describe(exc), file=sys.stderr)
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
    args = parser.parse_args(argv)
    if args.command == "send" and not (args.text or args.html):
        parser.error("send needs --text or --html")
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
