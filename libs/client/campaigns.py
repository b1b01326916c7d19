"""``esp campaign ...``: create a campaign, add its recipients, start, pause, resume or cancel it, follow its
progress and list campaigns.

A campaign is named ``campaigns/{id}``; every command that takes one also takes the bare id. Errors from the mesh are
printed as ``esp send`` prints them (code, message, bad fields, reason with its metadata) and exit with status 1;
arguments the CLI itself cannot use exit with status 2 (argparse's usage error).
"""

from __future__ import annotations

import argparse
import email.utils
import re
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from esp.v1 import campaigns_pb2, campaigns_pb2_grpc, common_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from libs.client.progress import open_view, state_name
from libs.client.recipient_files import (
    FileFormat,
    RecipientFileError,
    RecipientReader,
    RowProblem,
    file_format,
)
from libs.client.rpc import Metadata, auth_metadata, connection, describe_error, upload_attachment
from libs.common.message_classes import MessageClass

__all__ = ["add_commands"]

WATCH_INTERVAL_S = 1.0
"""How often ``status --watch`` reads the campaign."""
WATCH_OUTAGE_S = 30.0
"""How long ``status --watch`` rides out an unreachable mesh before giving up."""
ERRORS_SHOWN = 20
"""Refused rows listed after an upload (the rest are counted)."""
UPLOAD_TIMEOUT_S = 3600.0
"""Deadline of a recipients upload: a list of millions takes minutes."""
ENDED = frozenset({campaigns_pb2.CAMPAIGN_STATE_COMPLETED, campaigns_pb2.CAMPAIGN_STATE_CANCELLED})
STATES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
# Codes after which a mutating call may or may not have happened: worth retrying with the same request id.
_UNKNOWN_OUTCOME = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_TRANSITIONS: dict[str, tuple[str, Any]] = {
    "start": ("StartCampaign", campaigns_pb2.StartCampaignRequest),
    "pause": ("PauseCampaign", campaigns_pb2.PauseCampaignRequest),
    "resume": ("ResumeCampaign", campaigns_pb2.ResumeCampaignRequest),
    "cancel": ("CancelCampaign", campaigns_pb2.CancelCampaignRequest),
}


# -- argument types --------------------------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def _mailbox(text: str) -> common_pb2.EmailAddress:
    """``a@example.com`` or ``Name <a@example.com>``."""
    name, address = email.utils.parseaddr(text)
    if not address or "@" not in address:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}")
    return common_pb2.EmailAddress(email=address, name=name)


def _instant(text: str) -> Timestamp:
    """ISO 8601; without an offset, in this machine's time zone."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-05-01T09:00:00+02:00)") from None
    stamp = Timestamp()
    stamp.FromDatetime(when.astimezone(UTC))
    return stamp


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"emails per second, 0 or more, not {text!r}")
    return value


_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})(?:@(\S+))?")


def _window(text: str) -> campaigns_pb2.SendWindow:
    """``HH:MM-HH:MM[@Zone]``: the end may be 24:00, and before the start for a window across midnight."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected HH:MM-HH:MM[@Zone], e.g. 09:00-18:00@Europe/Paris, not {text!r}")
    sh, sm, eh, em = (int(g) for g in match.groups()[:4])
    start, end = sh * 60 + sm, eh * 60 + em
    if sm > 59 or em > 59 or not 0 <= start < 1440 or not 0 < end <= 1440 or start == end:
        raise argparse.ArgumentTypeError(f"not a daily window: {text!r} (times 00:00-24:00, start and end differ)")
    return campaigns_pb2.SendWindow(start_minute=start, end_minute=end, time_zone=match.group(5) or "")


def _campaign_name(text: str) -> str:
    return text if text.startswith("campaigns/") else f"campaigns/{text}"


# -- shared ----------------------------------------------------------------------------------------------------------
def _stub(channel: grpc.Channel) -> campaigns_pb2_grpc.CampaignServiceStub:
    return campaigns_pb2_grpc.CampaignServiceStub(channel)


def _refused(exc: grpc.RpcError, request_id: str = "") -> int:
    print(describe_error(exc), file=sys.stderr)
    if request_id and exc.code() in _UNKNOWN_OUTCOME:
        print(f"esp: the outcome is unknown; retry with --request-id {request_id} to apply it at most once",
              file=sys.stderr)
    return 1


def _state_line(c: campaigns_pb2.Campaign) -> str:
    line = f"{c.name} {state_name(c.state)}"
    if c.state == campaigns_pb2.CAMPAIGN_STATE_PAUSED and c.pause_reason:
        line += f" ({_reason(c.pause_reason)})"
    return line


def _reason(reason: int) -> str:
    return str(campaigns_pb2.PauseReason.Name(reason)).removeprefix("PAUSE_REASON_").lower().replace("_", " ")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _status_block(c: campaigns_pb2.Campaign) -> str:
    p = c.progress
    rows = [("display name", c.display_name or "-")]
    if c.state == campaigns_pb2.CAMPAIGN_STATE_PAUSED:
        rows.append(("pause reason", _reason(c.pause_reason)))
    if c.state == campaigns_pb2.CAMPAIGN_STATE_SCHEDULED and c.HasField("send_time"):
        rows.append(("sends at", c.send_time.ToDatetime(tzinfo=UTC).isoformat()))
    rows.append(("recipients", f"{p.recipients}" + (f"  (duplicates {p.duplicates}, invalid {p.invalid})"
                                                    if p.duplicates or p.invalid else "")))
    rows += [(label, str(getattr(p, label))) for label in ("pending", "queued", "sent", "delivered", "bounced",
                                                           "complained", "failed", "suppressed", "cancelled")]
    rows.append(("rate", f"{p.send_rate:.1f} emails/s"))
    if p.HasField("estimated_end_time"):
        eta = p.estimated_end_time.ToDatetime(tzinfo=UTC)
        rows.append(("eta", f"{eta.isoformat(timespec='seconds')} (in "
                            f"{_duration((eta - datetime.now(UTC)).total_seconds())})"))
    else:
        rows.append(("eta", "-"))
    return "\n".join([_state_line(c), *(f"  {label:<14}{value}" for label, value in rows)])


# -- commands --------------------------------------------------------------------------------------------------------
def _read_text(parser: argparse.ArgumentParser, path: Path | None, what: str) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read the {what} from {path}: {exc}")


def cmd_create(args: argparse.Namespace) -> int:
    """Create a draft campaign; print its name."""
    parser: argparse.ArgumentParser = args.parser
    if not (args.text_file or args.html_file):
        parser.error("create needs --text-file or --html-file")
    subject = args.subject if args.subject is not None else _read_text(parser, args.subject_file, "subject")
    c = campaigns_pb2.Campaign(
        display_name=args.name or "", reply_to=args.reply_to, subject=subject.rstrip("\r\n"),
        text_body=_read_text(parser, args.text_file, "text body"),
        html_body=_read_text(parser, args.html_file, "HTML body"), tags=args.tag,
        attachment_ids=args.attachment_id, metadata=dict(args.metadata), default_variables=dict(args.var),
        missing_variable_policy=campaigns_pb2.MissingVariablePolicy.Value(
            f"MISSING_VARIABLE_POLICY_{args.missing_variable.upper()}"),
        message_class=MessageClass(args.message_class).proto, send_rate=args.rate or 0.0)
    getattr(c, "from").CopyFrom(args.sender)
    if args.send_at is not None:
        c.send_time.CopyFrom(args.send_at)
    if args.window is not None:
        c.send_window.CopyFrom(args.window)
    request_id = args.request_id or uuid.uuid4().hex
    endpoint, api_key = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            created = _stub(channel).CreateCampaign(
                campaigns_pb2.CreateCampaignRequest(request_id=request_id, campaign=c),
                metadata=auth_metadata(api_key), timeout=30)
        except grpc.RpcError as exc:
            return _refused(exc, request_id)
    print(created.name)
    return 0


def _print_upload(reply: campaigns_pb2.AddCampaignRecipientsResponse, problems: list[RowProblem],
                  refused_here: int) -> None:
    rejected = reply.rejected_count + refused_here
    print(f"added {reply.added_count}, duplicates {reply.duplicate_count}, suppressed {reply.suppressed_count}, "
          f"rejected {rejected}")
    shown = sorted(problems, key=lambda p: p.row)[:ERRORS_SHOWN]
    for p in shown:
        print(f"  row {p.row}" + (f" <{p.address}>" if p.address else "") + f": {p.reason}")
    if rejected > len(shown):
        print(f"  ... and {rejected - len(shown)} more rejected rows")


def _add_streamed(channel: grpc.Channel, metadata: Metadata, name: str, path: Path, fmt: FileFormat) -> int:
    reader = RecipientReader(path, fmt, name)
    try:
        reader.check()
    except RecipientFileError as exc:
        print(f"esp: {exc}", file=sys.stderr)
        return 1
    failures: list[Exception] = []

    def frames() -> Iterator[campaigns_pb2.AddCampaignRecipientsRequest]:
        # gRPC reads this in its own thread and turns an exception into a bare CANCELLED: keep it to tell.
        try:
            yield from reader.frames()
        except Exception as exc:
            failures.append(exc)
            raise

    try:
        reply = _stub(channel).AddCampaignRecipients(frames(), metadata=metadata, timeout=UPLOAD_TIMEOUT_S)
    except grpc.RpcError as exc:
        if failures:
            print(f"esp: reading {path} failed after {reader.sent} recipients were sent: {failures[0]}\n"
                  "esp: some may have been added; running the command again adds the rest (the ones already "
                  "added count as duplicates)", file=sys.stderr)
            return 1
        return _refused(exc)
    # The mesh numbers a streamed recipient by its place in the stream; the customer needs the file's row.
    problems = list(reader.problems)
    problems += [RowProblem(reader.numbers.row_of(e.row), e.reason, e.address) for e in reply.errors]
    _print_upload(reply, problems, reader.refused)
    return 0


def _add_imported(channel: grpc.Channel, metadata: Metadata, name: str, path: Path, fmt: FileFormat) -> int:
    if not path.is_file():
        print(f"esp: {path}: no such file", file=sys.stderr)
        return 1
    content_type = "text/csv" if fmt is FileFormat.CSV else "application/jsonl"
    proto_format = (campaigns_pb2.RECIPIENT_FORMAT_CSV if fmt is FileFormat.CSV
                    else campaigns_pb2.RECIPIENT_FORMAT_JSONL)
    try:
        attachment_id = upload_attachment(channel, metadata, path, content_type)
        reply = _stub(channel).ImportCampaignRecipients(
            campaigns_pb2.ImportCampaignRecipientsRequest(campaign=name, attachment_id=attachment_id,
                                                          format=proto_format),
            metadata=metadata, timeout=UPLOAD_TIMEOUT_S)
    except grpc.RpcError as exc:
        return _refused(exc)
    _print_upload(reply, [RowProblem(e.row, e.reason, e.address) for e in reply.errors], 0)
    return 0


def cmd_add_recipients(args: argparse.Namespace) -> int:
    """Stream (or import) a CSV or JSON Lines file into a draft campaign; print the counts and the first errors."""
    try:
        fmt = file_format(args.file, args.format)
    except RecipientFileError as exc:
        print(f"esp: {exc}", file=sys.stderr)
        return 1
    endpoint, api_key = connection()
    add = _add_imported if args.import_file else _add_streamed
    with grpc.insecure_channel(endpoint) as channel:
        return add(channel, auth_metadata(api_key), _campaign_name(args.campaign), args.file, fmt)


def cmd_transition(args: argparse.Namespace) -> int:
    """Start, pause, resume or cancel a campaign; print its new state."""
    method, request_type = _TRANSITIONS[args.action]
    request_id = args.request_id or uuid.uuid4().hex
    endpoint, api_key = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            campaign: campaigns_pb2.Campaign = getattr(_stub(channel), method)(
                request_type(name=_campaign_name(args.campaign), request_id=request_id),
                metadata=auth_metadata(api_key), timeout=30)
        except grpc.RpcError as exc:
            return _refused(exc, request_id)
    print(_state_line(campaign))
    return 0


def _watch(stub: campaigns_pb2_grpc.CampaignServiceStub, metadata: Metadata, name: str) -> campaigns_pb2.Campaign:
    """Show the campaign's progress every second until it ends; its last reading."""
    view = open_view(sys.stdout)
    unreachable_since: float | None = None
    try:
        while True:
            try:
                campaign = stub.GetCampaign(campaigns_pb2.GetCampaignRequest(name=name), metadata=metadata,
                                            timeout=10)
            except grpc.RpcError as exc:
                # A mesh restarting under a long watch is not the campaign's end: ride it out for a while.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or \
                        now - unreachable_since > WATCH_OUTAGE_S:
                    raise
                time.sleep(WATCH_INTERVAL_S)
                continue
            unreachable_since = None
            view.update(campaign)
            if campaign.state in ENDED:
                return campaign
            time.sleep(WATCH_INTERVAL_S)
    finally:
        view.close()


def cmd_status(args: argparse.Namespace) -> int:
    """Print a campaign's state and counts; with --watch, a live progress bar until it completes or is cancelled."""
    endpoint, api_key = connection()
    name = _campaign_name(args.campaign)
    metadata = auth_metadata(api_key)
    with grpc.insecure_channel(endpoint) as channel:
        stub = _stub(channel)
        try:
            if args.watch:
                campaign = _watch(stub, metadata, name)
            else:
                campaign = stub.GetCampaign(campaigns_pb2.GetCampaignRequest(name=name), metadata=metadata,
                                            timeout=30)
        except grpc.RpcError as exc:
            return _refused(exc)
        except KeyboardInterrupt:
            print("esp: stopped watching; the campaign goes on", file=sys.stderr)
            return 130
    print(_status_block(campaign))
    if args.watch and campaign.state == campaigns_pb2.CAMPAIGN_STATE_CANCELLED:
        return 2
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the tenant's campaigns, newest first: name, state, sent of recipients, display name."""
    endpoint, api_key = connection()
    state = campaigns_pb2.CampaignState.Value(f"CAMPAIGN_STATE_{args.state.upper()}") if args.state else 0
    found: list[campaigns_pb2.Campaign] = []
    token = ""
    with grpc.insecure_channel(endpoint) as channel:
        stub = _stub(channel)
        try:
            while len(found) < args.limit:
                page = stub.ListCampaigns(
                    campaigns_pb2.ListCampaignsRequest(page_size=min(args.limit - len(found), 200), page_token=token,
                                                       state=state), metadata=auth_metadata(api_key), timeout=30)
                found += page.campaigns
                token = page.next_page_token
                if not token:
                    break
        except grpc.RpcError as exc:
            return _refused(exc)
    for c in found[:args.limit]:
        counts = f"{c.progress.sent}/{c.progress.recipients}"
        print(f"{c.name}  {state_name(c.state):<9}  {counts:>13}  {c.display_name}".rstrip())
    return 0


# -- the parser ------------------------------------------------------------------------------------------------------
def _request_id_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--request-id", type=_request_id, default=None,
                        help="idempotency key (default: a fresh one, printed if the outcome is unknown); repeat a "
                             "command with the same id and it is applied at most once")


def _request_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty request id would not make a retry safe")
    return text


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``campaign`` and its subcommands to the ``esp`` parser's subcommands."""
    campaign = sub.add_parser(
        "campaign", help="create, fill, start, pause, resume, cancel and follow campaigns",
        description="Campaigns: one set of templates sent to a recipient list. CAMPAIGN is campaigns/{id} or the "
                    "bare id. The mesh's refusals exit with status 1, unusable arguments with status 2.")
    commands = campaign.add_subparsers(dest="campaign_command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="create a draft campaign; prints its name")
    create.add_argument("--name", help="display name")
    create.add_argument("--from", dest="sender", type=_mailbox, required=True, metavar="ADDRESS",
                        help="sender: a@example.com or 'Name <a@example.com>'")
    create.add_argument("--reply-to", type=_mailbox, action="append", default=[], metavar="ADDRESS",
                        help="reply-to address (repeatable)")
    subject = create.add_mutually_exclusive_group(required=True)
    subject.add_argument("--subject", help="subject template, e.g. 'Hello {{ first_name }}'")
    subject.add_argument("--subject-file", type=Path, metavar="FILE", help="subject template read from FILE")
    create.add_argument("--text-file", type=Path, metavar="FILE", help="plain-text body template")
    create.add_argument("--html-file", type=Path, metavar="FILE", help="HTML body template")
    create.add_argument("--var", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="default value of a template variable (repeatable)")
    create.add_argument("--tag", action="append", default=[], help="tag (repeatable)")
    create.add_argument("--metadata", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="echoed on every message and event (repeatable)")
    create.add_argument("--class", dest="message_class", choices=("bulk", "transactional"), default="bulk")
    create.add_argument("--send-at", type=_instant, metavar="TIME",
                        help="ISO 8601 start time (no offset: this machine's time zone); default: when started")
    create.add_argument("--rate", type=_rate, metavar="PER_SECOND", help="at most this many emails per second")
    create.add_argument("--window", type=_window, metavar="HH:MM-HH:MM[@ZONE]",
                        help="daily send window, e.g. 09:00-18:00@Europe/Paris (default zone UTC)")
    create.add_argument("--missing-variable", choices=("fail", "empty"), default="fail",
                        help="a variable no recipient or default sets: fail that recipient, or render it empty")
    create.add_argument("--attachment-id", action="append", default=[], metavar="ID",
                        help="an uploaded attachment (repeatable)")
    _request_id_option(create)
    create.set_defaults(run=cmd_create, parser=create)

    add = commands.add_parser(
        "add-recipients", help="add recipients from a CSV or JSON Lines file to a draft campaign",
        description="CSV: a header row; the 'email' column is the address, 'name' the display name, every other "
                    "column a variable. JSON Lines: {\"email\": ..., \"name\": ..., \"variables\": {...}}, or the "
                    "variables as flat keys. Prints the counts added, duplicate, suppressed and rejected, and the "
                    "first rejected rows with their row numbers (a CSV's header is row 1). Rejected rows do not "
                    "change the exit status.")
    add.add_argument("campaign", metavar="CAMPAIGN")
    add.add_argument("file", type=Path, metavar="FILE")
    add.add_argument("--format", choices=[f.value for f in FileFormat],
                     help="the file's format (default: told by its extension, .csv or .jsonl)")
    add.add_argument("--import", dest="import_file", action="store_true",
                     help="upload the file and let the mesh read it, instead of streaming its rows (flat JSON "
                          "Lines keys are then refused)")
    add.set_defaults(run=cmd_add_recipients)

    for action, text in (("start", "start a draft (scheduled when --send-at is ahead)"),
                         ("pause", "pause a scheduled or running campaign"),
                         ("resume", "resume a paused campaign"),
                         ("cancel", "cancel a campaign: what was not handed to a provider is dropped")):
        command = commands.add_parser(action, help=f"{text}; prints its new state")
        command.add_argument("campaign", metavar="CAMPAIGN")
        _request_id_option(command)
        command.set_defaults(run=cmd_transition, action=action)

    status = commands.add_parser(
        "status", help="print a campaign's state, counts, rate and ETA",
        description="With --watch, shows a progress bar refreshed every second until the campaign is completed "
                    "(exit status 0) or cancelled (exit status 2); Ctrl-C stops watching (exit status 130).")
    status.add_argument("campaign", metavar="CAMPAIGN")
    status.add_argument("--watch", action="store_true", help="follow it until it is completed or cancelled")
    status.set_defaults(run=cmd_status)

    listing = commands.add_parser("list", help="list campaigns, newest first")
    listing.add_argument("--state", choices=STATES, help="only campaigns in this state")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.set_defaults(run=cmd_list)
