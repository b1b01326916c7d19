"""``esp domain ...``: add a sending domain and print the DNS records to publish, verify it (each record's result),
list the account's domains, rotate a domain's DKIM keys and remove a domain.

A domain is named ``domains/{domain}``; every command takes the bare domain too. Errors from the mesh are printed as
``esp send`` prints them (code, message, bad fields, reason with its metadata) and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc
from esp.v1 import domains_pb2, domains_pb2_grpc

from libs.client.rpc import Metadata, auth_metadata, connection, describe_error

__all__ = ["add_commands", "domain_block"]

PAGE = 200
_PREFIX = "domains/"


def _name(text: str) -> str:
    return text if text.startswith(_PREFIX) else f"{_PREFIX}{text}"


def _enum(value: int, enum: object, prefix: str) -> str:
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower()


def _state(d: domains_pb2.Domain) -> str:
    return _enum(d.state, domains_pb2.DomainState, "DOMAIN_STATE_")


def _record_line(r: domains_pb2.DomainRecord) -> str:
    purpose = _enum(r.purpose, domains_pb2.DomainRecordPurpose, "DOMAIN_RECORD_PURPOSE_")
    if r.selector:
        purpose += f" {r.selector} ({_enum(r.key_status, domains_pb2.DkimKeyStatus, 'DKIM_KEY_STATUS_')})"
    found = ("not checked" if r.state == domains_pb2.DOMAIN_RECORD_STATE_UNSPECIFIED
             else _enum(r.state, domains_pb2.DomainRecordState, "DOMAIN_RECORD_STATE_"))
    need = "required" if r.required else "recommended"
    lines = [f"  {purpose:<28} {found:<12} {need}", f"    {r.name}. {r.type} \"{r.value}\""]
    lines += [f"    seen: \"{seen}\"" for seen in r.seen_values]
    return "\n".join(lines)


def domain_block(d: domains_pb2.Domain) -> str:
    """A domain with its state, each record to publish and what the last check found, and provider readiness."""
    lines = [f"{d.name} {_state(d)}", *(_record_line(r) for r in d.records)]
    lines += [f"  provider {p.provider.removeprefix('providers/')}: {p.state}{' - ' + p.detail if p.detail else ''}"
              for p in d.provider_readiness]
    return "\n".join(lines)


def _call(action: Callable[[domains_pb2_grpc.DomainServiceStub, Metadata], int]) -> int:
    """Run ``action`` with a stub and the caller's metadata; an RPC error is printed and exits with status 1."""
    endpoint, api_key = connection()
    with grpc.insecure_channel(endpoint) as channel:
        try:
            return action(domains_pb2_grpc.DomainServiceStub(channel), auth_metadata(api_key))
        except grpc.RpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1


def cmd_add(args: argparse.Namespace) -> int:
    """Add a domain; print the records to publish."""
    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        domain = stub.CreateDomain(domains_pb2.CreateDomainRequest(
            domain=domains_pb2.Domain(domain=args.domain, ed25519=args.ed25519)), metadata=metadata, timeout=30)
        print(domain_block(domain))
        print("Publish these TXT records, then run `esp domain verify " + domain.domain + "`.")
        return 0

    return _call(run)


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the records now; print each result. Exit status 3 when the domain is not verified."""
    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        domain = stub.VerifyDomain(domains_pb2.VerifyDomainRequest(name=_name(args.domain)), metadata=metadata,
                                   timeout=60)
        print(domain_block(domain))
        return 0 if domain.state == domains_pb2.DOMAIN_STATE_VERIFIED else 3

    return _call(run)


def cmd_get(args: argparse.Namespace) -> int:
    """Print one domain with its records."""
    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        print(domain_block(stub.GetDomain(domains_pb2.GetDomainRequest(name=_name(args.domain)), metadata=metadata,
                                          timeout=30)))
        return 0

    return _call(run)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the account's domains, one a line: name and state."""
    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        token = ""
        while True:
            page = stub.ListDomains(domains_pb2.ListDomainsRequest(page_size=PAGE, page_token=token),
                                    metadata=metadata, timeout=30)
            for d in page.domains:
                print(f"{d.name}  {_state(d)}")
            token = page.next_page_token
            if not token:
                return 0

    return _call(run)


def cmd_rotate(args: argparse.Namespace) -> int:
    """Start a DKIM key rotation; print the new key's record to publish."""
    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        print(domain_block(stub.RotateDomainKey(domains_pb2.RotateDomainKeyRequest(name=_name(args.domain)),
                                                metadata=metadata, timeout=30)))
        print("Publish the new key's record (published_ahead), then verify: it signs once DNS serves it.")
        return 0

    return _call(run)


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove a domain (its keys are destroyed; mail from it is refused from then on)."""
    name = _name(args.domain)

    def run(stub: domains_pb2_grpc.DomainServiceStub, metadata: Metadata) -> int:
        stub.DeleteDomain(domains_pb2.DeleteDomainRequest(name=name), metadata=metadata, timeout=30)
        print(f"{name} removed")
        return 0

    return _call(run)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``esp domain ...`` on the top-level parser's sub-commands."""
    domain = sub.add_parser("domain", help="sending domains: add, verify, list, show, rotate keys, remove")
    commands = domain.add_subparsers(dest="domain_command", required=True)
    add = commands.add_parser("add", help="add a domain; prints the DNS records to publish")
    add.add_argument("domain")
    add.add_argument("--ed25519", action="store_true", help="also sign with an Ed25519 key (besides RSA-2048)")
    add.set_defaults(run=cmd_add)
    verify = commands.add_parser("verify", help="look the records up now (exit status 3 when not verified)")
    verify.add_argument("domain")
    verify.set_defaults(run=cmd_verify)
    show = commands.add_parser("show", help="print a domain with its records")
    show.add_argument("domain")
    show.set_defaults(run=cmd_get)
    listing = commands.add_parser("list", help="list the account's domains")
    listing.set_defaults(run=cmd_list)
    rotate = commands.add_parser("rotate", help="start a DKIM key rotation")
    rotate.add_argument("domain")
    rotate.set_defaults(run=cmd_rotate)
    remove = commands.add_parser("remove", help="remove a domain")
    remove.add_argument("domain")
    remove.set_defaults(run=cmd_remove)
