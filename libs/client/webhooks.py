"""``esp webhook ...``: create, show, list, change and delete webhook endpoints, rotate their signing secret, send
them a test event or replay past events, and read or follow their delivery log.

An endpoint is named ``webhookEndpoints/{id}``; every command that takes one also takes the bare id. Errors from the
mesh are printed as ``esp send`` prints them (code, message, bad fields, reason with its metadata) and exit with
status 1; arguments the CLI itself cannot use exit with status 2 (argparse's usage error).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
from esp.v1 import webhooks_pb2, webhooks_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from libs.client.rpc import Metadata, auth_metadata, connection, describe_error

__all__ = ["add_commands", "attempt_line", "duration", "instant"]

FOLLOW_INTERVAL_S = 1.0
"""How often ``log --follow`` reads the delivery log."""
FOLLOW_OUTAGE_S = 30.0
"""How long ``log --follow`` rides out an unreachable mesh before giving up."""
PAGE = 200
"""Attempts read per call (the service's largest page)."""
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([dhms]))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_PREFIX = "webhookEndpoints/"


# -- argument types --------------------------------------------------------------------------------------------------
def duration(text: str) -> timedelta:
    """``24h``, ``90m``, ``1h30m``, ``7d``, ``0s``."""
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a duration such as 24h, 90m, 1h30m or 0s, not {text!r}")
    return timedelta(seconds=sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(text)))


def instant(text: str) -> Timestamp:
    """ISO 8601 (without an offset, in this machine's time zone), or a duration ago (``2h`` = two hours ago)."""
    if _DURATION.fullmatch(text):
        when = datetime.now(UTC) - duration(text)
    else:
        try:
            when = datetime.fromisoformat(text).astimezone(UTC)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not an ISO 8601 time or a duration ago: {text!r} (e.g. 2026-05-01T09:00:00+02:00, or 2h)") from None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _batch(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"events per call, 1 to 100, not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {text!r}")
    return int(text)


def _request_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty request id would not make a retry safe")
    return text


def _endpoint_name(text: str) -> str:
    return text if text.startswith(_PREFIX) else f"{_PREFIX}{text}"


def _message_name(text: str) -> str:
    return text if text.startswith("messages/") else f"messages/{text}"


# -- output ----------------------------------------------------------------------------------------------------------
def _time(stamp: Timestamp) -> str:
    return str(stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")).replace("+00:00", "Z")


def _state(e: webhooks_pb2.WebhookEndpoint) -> str:
    return "enabled" if e.enabled else "disabled"


def _endpoint_block(e: webhooks_pb2.WebhookEndpoint) -> str:
    rows = [("url", e.url), ("description", e.description or "-"),
            ("event types", ", ".join(e.event_types) or "all"), ("tags", ", ".join(e.tags) or "any"),
            ("batch", str(max(1, e.max_batch_size)))]
    if e.disabled_reason:
        rows.append(("disabled", e.disabled_reason))
    rows.append(("last success", _time(e.last_success_time) if e.HasField("last_success_time") else "-"))
    if e.HasField("failing_since"):
        rows.append(("failing since", _time(e.failing_since)))
    rows.append(("pending", str(e.pending_deliveries)))
    rows.append(("created", _time(e.create_time)))
    return "\n".join([f"{e.name} {_state(e)}", *(f"  {label:<15}{value}" for label, value in rows)])


def _print_with_secret(e: webhooks_pb2.WebhookEndpoint) -> None:
    print(_endpoint_block(e))
    if e.signing_secret:
        print(f"  {'signing secret':<15}{e.signing_secret}")
        print("Store the signing secret now: it won't be shown again (`esp webhook rotate` makes a new one).")
    else:
        print("  signing secret not shown: it was returned once, when this request id first created the endpoint")


def attempt_line(a: webhooks_pb2.WebhookAttempt) -> str:
    """One attempt of the delivery log: time, webhook-id, attempt, HTTP status or error, latency, event types."""
    outcome = str(a.status_code) if a.status_code else f"error: {a.error or 'no response'}"
    line = f"{_time(a.attempt_time)}  {a.webhook_id}  #{a.attempt}  {outcome}  {a.latency_ms}ms  " + (
        ",".join(a.event_types) or "-")
    if a.HasField("next_attempt_time"):
        line += f"  (retry at {_time(a.next_attempt_time)})"
    return line


def _refused(exc: grpc.RpcError, request_id: str = "") -> int:
    print(describe_error(exc), file=sys.stderr)
    if request_id and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"esp: the outcome is unknown; retry with --request-id {request_id} to create it at most once",
              file=sys.stderr)
    return 1


def _call(action: Callable[[webhooks_pb2_grpc.WebhookServiceStub, Metadata], int], request_id: str = "") -> int:
    """Run ``action`` with a stub and the caller's metadata; an RPC error is printed and exits with status 1."""
    endpoint, api_key = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            return action(webhooks_pb2_grpc.WebhookServiceStub(channel), auth_metadata(api_key))
        except grpc.RpcError as exc:
            return _refused(exc, request_id)


# -- commands --------------------------------------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    """Create an endpoint; print it with its signing secret, this once."""
    request_id = args.request_id or uuid.uuid4().hex
    endpoint = webhooks_pb2.WebhookEndpoint(url=args.url, description=args.description or "",
                                            event_types=args.event_type, tags=args.tag,
                                            max_batch_size=args.batch or 0)
    if args.disabled:
        endpoint.enabled = False

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        _print_with_secret(stub.CreateWebhookEndpoint(webhooks_pb2.CreateWebhookEndpointRequest(
            webhook_endpoint=endpoint, request_id=request_id), metadata=metadata, timeout=30))
        return 0

    return _call(run, request_id)


def cmd_get(args: argparse.Namespace) -> int:
    """Print one endpoint (never its secret)."""
    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        print(_endpoint_block(stub.GetWebhookEndpoint(webhooks_pb2.GetWebhookEndpointRequest(
            name=_endpoint_name(args.endpoint)), metadata=metadata, timeout=30)))
        return 0

    return _call(run)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the tenant's endpoints: name, enabled or disabled, URL, event types."""
    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        token = ""
        while True:
            page = stub.ListWebhookEndpoints(webhooks_pb2.ListWebhookEndpointsRequest(page_size=PAGE,
                                                                                      page_token=token),
                                             metadata=metadata, timeout=30)
            for e in page.webhook_endpoints:
                print(f"{e.name}  {_state(e):<8}  {e.url}  {','.join(e.event_types) or 'all'}")
            token = page.next_page_token
            if not token:
                return 0

    return _call(run)


def cmd_update(args: argparse.Namespace) -> int:
    """Change the fields given (the others stay as they are); print the endpoint."""
    parser: argparse.ArgumentParser = args.parser
    endpoint = webhooks_pb2.WebhookEndpoint(name=_endpoint_name(args.endpoint))
    paths: list[str] = []
    if args.url is not None:
        endpoint.url = args.url
        paths.append("url")
    if args.description is not None:
        endpoint.description = args.description
        paths.append("description")
    if args.event_type or args.all_event_types:
        endpoint.event_types.extend(args.event_type)
        paths.append("event_types")
    if args.tag or args.any_tag:
        endpoint.tags.extend(args.tag)
        paths.append("tags")
    if args.enabled is not None:
        endpoint.enabled = args.enabled
        paths.append("enabled")
    if args.batch is not None:
        endpoint.max_batch_size = args.batch
        paths.append("max_batch_size")
    if not paths:
        parser.error("update needs at least one change (--url, --description, --event-type, --all-event-types, "
                     "--tag, --any-tag, --enable, --disable, --batch)")

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        print(_endpoint_block(stub.UpdateWebhookEndpoint(webhooks_pb2.UpdateWebhookEndpointRequest(
            webhook_endpoint=endpoint, update_mask=FieldMask(paths=paths)), metadata=metadata, timeout=30)))
        return 0

    return _call(run)


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete an endpoint (its pending deliveries are dropped)."""
    name = _endpoint_name(args.endpoint)

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        stub.DeleteWebhookEndpoint(webhooks_pb2.DeleteWebhookEndpointRequest(name=name), metadata=metadata,
                                   timeout=30)
        print(f"{name} deleted")
        return 0

    return _call(run)


def cmd_rotate(args: argparse.Namespace) -> int:
    """A new signing secret, printed this once; the previous ones keep signing for the overlap."""
    request = webhooks_pb2.RotateWebhookSecretRequest(name=_endpoint_name(args.endpoint))
    if args.overlap is not None:
        request.overlap.CopyFrom(Duration(seconds=int(args.overlap.total_seconds())))

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        rotated = stub.RotateWebhookSecret(request, metadata=metadata, timeout=30)
        _print_with_secret(rotated)
        overlap = args.overlap if args.overlap is not None else timedelta(hours=24)
        if overlap:
            until = (datetime.now(UTC) + overlap).isoformat(timespec="seconds").replace("+00:00", "Z")
            print(f"The previous secrets keep signing until about {until}.")
        else:
            print("The previous secrets no longer sign.")
        return 0

    return _call(run)


def cmd_test(args: argparse.Namespace) -> int:
    """Queue a ``test`` event to the endpoint; print its webhook-id."""
    name = _endpoint_name(args.endpoint)

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        sent = stub.SendTestWebhookEvent(webhooks_pb2.SendTestWebhookEventRequest(name=name), metadata=metadata,
                                         timeout=30)
        print(f"queued a test event to {name}: webhook-id {sent.webhook_id}")
        return 0

    return _call(run)


def cmd_replay(args: argparse.Namespace) -> int:
    """Deliver again one message's events, or the events of a time range; print how many were queued."""
    parser: argparse.ArgumentParser = args.parser
    request = webhooks_pb2.ReplayWebhookEventsRequest(name=_endpoint_name(args.endpoint))
    if args.message:
        if args.until is not None:
            parser.error("replay --until goes with --since, not --message")
        request.message = _message_name(args.message)
    else:
        if args.until is None:
            parser.error("replay --since needs --until")
        request.start_time.CopyFrom(args.since)
        request.end_time.CopyFrom(args.until)

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        replayed = stub.ReplayWebhookEvents(request, metadata=metadata, timeout=120)
        count = replayed.queued_events
        print(f"queued {count} event{'' if count == 1 else 's'} to {request.name}")
        return 0

    return _call(run)


_Key = tuple[str, int, int, int]


def _key(a: webhooks_pb2.WebhookAttempt) -> _Key:
    return a.webhook_id, a.attempt, a.attempt_time.seconds, a.attempt_time.nanos


def _newest(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata, name: str, limit: int,
            seen: set[_Key]) -> list[webhooks_pb2.WebhookAttempt]:
    """Up to ``limit`` of the newest attempts not in ``seen``, oldest first: pages are read until one holds an
    attempt already seen (every unseen attempt of that page is kept: concurrent deliveries may log out of order)."""
    found: list[webhooks_pb2.WebhookAttempt] = []
    token = ""
    while len(found) < limit:
        page = stub.ListWebhookAttempts(webhooks_pb2.ListWebhookAttemptsRequest(
            parent=name, page_size=PAGE, page_token=token), metadata=metadata, timeout=30)
        unseen = [a for a in page.attempts if _key(a) not in seen]
        found += unseen
        token = page.next_page_token
        if not token or len(unseen) < len(page.attempts):
            break
    return found[:limit][::-1]


def _follow(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata, name: str, seen: set[_Key],
            interval_s: float) -> None:
    """Print every new attempt as it appears, until interrupted."""
    unreachable_since: float | None = None
    while True:
        time.sleep(interval_s)
        try:
            fresh = _newest(stub, metadata, name, 10 * PAGE, seen)
        except grpc.RpcError as exc:
            # A mesh restarting under a long follow is no reason to stop: ride it out for a while.
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or \
                    now - unreachable_since > FOLLOW_OUTAGE_S:
                raise
            continue
        unreachable_since = None
        for attempt in fresh:
            seen.add(_key(attempt))
            print(attempt_line(attempt), flush=True)


def cmd_log(args: argparse.Namespace) -> int:
    """Print the endpoint's latest attempts, oldest first; with --follow, then every new one as it happens."""
    name = _endpoint_name(args.endpoint)

    def run(stub: webhooks_pb2_grpc.WebhookServiceStub, metadata: Metadata) -> int:
        seen: set[_Key] = set()
        # Following: everything already logged counts as seen, not only the attempts shown.
        logged = _newest(stub, metadata, name, 10 * PAGE if args.follow else args.limit, seen)
        for attempt in logged[-args.limit:]:
            print(attempt_line(attempt), flush=True)
        if not args.follow:
            return 0
        seen.update(_key(a) for a in logged)
        try:
            _follow(stub, metadata, name, seen, args.interval)
        except KeyboardInterrupt:
            print("esp: stopped following", file=sys.stderr)
            return 130
        return 0

    return _call(run)


# -- the parser ------------------------------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``webhook`` and its subcommands to the ``esp`` parser's subcommands."""
    webhook = sub.add_parser(
        "webhook", help="webhook endpoints: create, change, test, replay, and their delivery log",
        description="Webhook endpoints receive the tenant's events, signed per Standard Webhooks. ENDPOINT is "
                    "webhookEndpoints/{id} or the bare id. The mesh's refusals exit with status 1, unusable "
                    "arguments with status 2.")
    commands = webhook.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="create an endpoint; prints it and its signing secret, this once")
    create.add_argument("url", metavar="URL", help="where events are POSTed (https)")
    create.add_argument("--event-type", action="append", default=[], metavar="TYPE",
                        help="deliver only this event type, e.g. message.delivered (repeatable; default: all)")
    create.add_argument("--tag", action="append", default=[],
                        help="only message events of messages with this tag (repeatable; default: any)")
    create.add_argument("--description")
    create.add_argument("--batch", type=_batch, metavar="N", help="up to N events per call (1-100; default 1)")
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    create.add_argument("--request-id", type=_request_id, default=None,
                        help="idempotency key: repeating the command with it creates at most one endpoint")
    create.set_defaults(run=cmd_create)

    listing = commands.add_parser("list", help="list the endpoints")
    listing.set_defaults(run=cmd_list)

    get = commands.add_parser("get", help="print an endpoint (never its secret)")
    get.add_argument("endpoint", metavar="ENDPOINT")
    get.set_defaults(run=cmd_get)

    update = commands.add_parser("update", help="change an endpoint; only the options given change")
    update.add_argument("endpoint", metavar="ENDPOINT")
    update.add_argument("--url")
    update.add_argument("--description")
    update.add_argument("--event-type", action="append", default=[], metavar="TYPE",
                        help="the event types delivered, replacing the current ones (repeatable)")
    update.add_argument("--all-event-types", action="store_true", help="deliver every event type")
    update.add_argument("--tag", action="append", default=[],
                        help="the tags filtered on, replacing the current ones (repeatable)")
    update.add_argument("--any-tag", action="store_true", help="message events of every message")
    toggle = update.add_mutually_exclusive_group()
    toggle.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None,
                        help="enable it (clears the reason the platform disabled it)")
    toggle.add_argument("--disable", dest="enabled", action="store_const", const=False)
    update.add_argument("--batch", type=_batch, metavar="N", help="up to N events per call (1-100)")
    update.set_defaults(run=cmd_update, parser=update)

    delete = commands.add_parser("delete", help="delete an endpoint and drop its pending deliveries")
    delete.add_argument("endpoint", metavar="ENDPOINT")
    delete.set_defaults(run=cmd_delete)

    rotate = commands.add_parser("rotate", help="a new signing secret, printed this once")
    rotate.add_argument("endpoint", metavar="ENDPOINT")
    rotate.add_argument("--overlap", type=duration, metavar="DURATION",
                        help="how long the previous secrets keep signing, e.g. 24h (default), 7d at most, 0s")
    rotate.set_defaults(run=cmd_rotate)

    test = commands.add_parser("test", help="queue a test event (its attempt shows in the log)")
    test.add_argument("endpoint", metavar="ENDPOINT")
    test.set_defaults(run=cmd_test)

    replay = commands.add_parser("replay", help="deliver again a message's events, or a time range's")
    replay.add_argument("endpoint", metavar="ENDPOINT")
    what = replay.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", metavar="ID", help="the message (messages/{id} or the bare id)")
    what.add_argument("--since", type=instant, metavar="TIME", help="ISO 8601, or a duration ago (2h)")
    replay.add_argument("--until", type=instant, metavar="TIME", help="end of the range (with --since)")
    replay.set_defaults(run=cmd_replay, parser=replay)

    log = commands.add_parser(
        "log", help="print the delivery log, oldest first",
        description="One line per HTTP attempt: time, webhook-id, #attempt, HTTP status (or error: why), latency, "
                    "event types, and when the next try is due. With --follow, new attempts are printed as they "
                    "happen until Ctrl-C (exit status 130).")
    log.add_argument("endpoint", metavar="ENDPOINT")
    log.add_argument("--limit", type=_positive, default=20, help="the latest this many attempts (default 20)")
    log.add_argument("--follow", "-f", action="store_true", help="then print new attempts as they appear")
    log.add_argument("--interval", type=float, default=FOLLOW_INTERVAL_S, help=argparse.SUPPRESS)
    log.set_defaults(run=cmd_log)
