"""``esp domain add|verify|list|show|rotate|remove`` against a running mesh's edge (its router asking NSD on
loopback): the CLI's ``main`` runs in this process with its arguments, as a shell would run it."""

from __future__ import annotations

import grpc
import pytest
from esp.v1 import domains_pb2, domains_pb2_grpc

from dev.dns_server import AuthoritativeDns
from tests.client.cli import Esp, cli_runner
from tests.domains.conftest import Edge, published


@pytest.fixture
def api_key(edge: Edge) -> str:
    """A fresh tenant's API key."""
    return edge.key_of_new_tenant()


@pytest.fixture
def esp(edge: Edge, api_key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Esp:
    """``esp ...`` as that tenant."""
    return cli_runner(f"127.0.0.1:{edge.config.ports['ingest']}", api_key, monkeypatch, capsys)


def _domain(edge: Edge, api_key: str, name: str) -> domains_pb2.Domain:
    with edge.channel() as channel:
        domain: domains_pb2.Domain = domains_pb2_grpc.DomainServiceStub(channel).GetDomain(
            domains_pb2.GetDomainRequest(name=f"domains/{name}"),
            metadata=(("authorization", f"Bearer {api_key}"),), timeout=10)
    return domain


def test_a_domain_is_added_verified_listed_and_removed_from_the_command_line(
        esp: Esp, edge: Edge, api_key: str, dns_server: AuthoritativeDns) -> None:
    added = esp("domain", "add", "cli.example")
    assert added.code == 0, added.err
    assert "_esp-verification.cli.example. TXT \"esp-verification=" in added.out
    assert "esp1._domainkey.cli.example. TXT \"v=DKIM1; k=rsa; p=" in added.out
    assert "domains/cli.example pending" in added.out

    unpublished = esp("domain", "verify", "cli.example")
    assert unpublished.code == 3 and "missing" in unpublished.out

    dns_server.publish("cli.example", published(_domain(edge, api_key, "cli.example")))
    verified = esp("domain", "verify", "cli.example")
    assert verified.code == 0, verified.out + verified.err
    assert "domains/cli.example verified" in verified.out and "missing" not in verified.out

    assert esp("domain", "list").out.splitlines() == ["domains/cli.example  verified"]
    rotated = esp("domain", "rotate", "cli.example")
    assert rotated.code == 0 and "dkim esp2 (published_ahead)" in rotated.out

    removed = esp("domain", "remove", "domains/cli.example")
    assert removed.code == 0 and "domains/cli.example removed" in removed.out
    assert esp("domain", "list").out == ""


def test_a_refused_add_prints_the_reason_and_exits_1(esp: Esp) -> None:
    refused = esp("domain", "add", "co.uk")
    assert refused.code == 1
    assert "INVALID_ARGUMENT" in refused.err and "PUBLIC_SUFFIX" in refused.err


def test_an_unknown_domain_is_not_found(esp: Esp) -> None:
    missing = esp("domain", "show", "nobody.example")
    assert missing.code == 1 and grpc.StatusCode.NOT_FOUND.name in missing.err
