"""Only verified senders, through the public edge of a running mesh (ingest, router, ledger, reports, campaigns,
gateway): an email from a domain the tenant has not verified is refused with UNVERIFIED_SENDER_DOMAIN and the
domain, over gRPC and REST alike; one from a verified domain, a subdomain of one, or the sandbox is accepted. The
domain is added and verified through the edge against NSD on loopback."""

from __future__ import annotations

import grpc
import httpx
import pytest
from esp.v1 import (
    campaigns_pb2,
    campaigns_pb2_grpc,
    common_pb2,
    domains_pb2,
    domains_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dev.dns_server import AuthoritativeDns
from tests.domains.conftest import Edge, published


@pytest.fixture(scope="module")
def verified(edge: Edge, dns_server: AuthoritativeDns) -> str:
    """sender.example, added and verified by the tenant through the edge."""
    with edge.channel() as channel:
        stub = domains_pb2_grpc.DomainServiceStub(channel)
        domain = stub.CreateDomain(domains_pb2.CreateDomainRequest(domain=domains_pb2.Domain(domain="sender.example")),
                                   metadata=edge.auth)
        dns_server.publish("sender.example", published(domain))
        checked = stub.VerifyDomain(domains_pb2.VerifyDomainRequest(name="domains/sender.example"), metadata=edge.auth)
    assert checked.state == domains_pb2.DOMAIN_STATE_VERIFIED
    return "sender.example"


def _send(edge: Edge, sender: str) -> messages_pb2.SendEmailResponse:
    request = messages_pb2.SendEmailRequest(
        message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL, to=[common_pb2.EmailAddress(email="rcpt@example.org")],
        subject="hello", text_body="hi", **{"from": common_pb2.EmailAddress(email=sender)})
    with edge.channel() as channel:
        response: messages_pb2.SendEmailResponse = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
            request, metadata=edge.auth, timeout=30)
    return response


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR))
    return info


def test_an_email_from_an_unverified_domain_is_refused_naming_the_domain(edge: Edge, verified: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _send(edge, "news@unverified.example")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    info = _error_info(refused.value)
    assert info.reason == "UNVERIFIED_SENDER_DOMAIN" and info.metadata["domain"] == "unverified.example"


def test_an_email_from_a_verified_domain_or_its_subdomain_is_accepted(edge: Edge, verified: str) -> None:
    assert _send(edge, f"hello@{verified}").message.name.startswith("messages/")
    assert _send(edge, f"hello@news.{verified}").message.name.startswith("messages/")


def test_a_name_merely_ending_like_a_verified_domain_is_not_covered(edge: Edge, verified: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _send(edge, f"hello@other{verified}")
    assert _error_info(refused.value).reason == "UNVERIFIED_SENDER_DOMAIN"


def test_an_email_from_the_sandbox_is_accepted(edge: Edge) -> None:
    assert _send(edge, "demo@example.com").message.name.startswith("messages/")


def test_a_rest_send_from_an_unverified_domain_is_a_400_with_the_reason(edge: Edge, verified: str) -> None:
    response = httpx.post(f"http://127.0.0.1:{edge.config.gateway_port}/v1/messages:send",
                          headers={"Authorization": f"Bearer {edge.api_key}"}, timeout=30,
                          json={"messageClass": "MESSAGE_CLASS_TRANSACTIONAL", "from": {"email": "a@elsewhere.example"},
                                "to": [{"email": "rcpt@example.org"}], "subject": "s", "textBody": "t"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert info["reason"] == "UNVERIFIED_SENDER_DOMAIN" and info["metadata"]["domain"] == "elsewhere.example"


def test_a_batch_refuses_only_the_email_from_an_unverified_domain(edge: Edge, verified: str) -> None:
    def request(sender: str) -> messages_pb2.SendEmailRequest:
        return messages_pb2.SendEmailRequest(
            message_class=common_pb2.MESSAGE_CLASS_BULK, to=[common_pb2.EmailAddress(email="r@example.org")],
            subject="s", text_body="t", **{"from": common_pb2.EmailAddress(email=sender)})

    with edge.channel() as channel:
        answer = messages_pb2_grpc.MessageServiceStub(channel).BatchSendEmails(
            messages_pb2.BatchSendEmailsRequest(requests=[request(f"a@{verified}"), request("b@nope.example")]),
            metadata=edge.auth, timeout=30)
    first, second = answer.results
    assert first.WhichOneof("result") == "message"
    assert second.WhichOneof("result") == "error"
    assert second.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert second.error.reason == "UNVERIFIED_SENDER_DOMAIN" and second.error.metadata["domain"] == "nope.example"


def _create_campaign(edge: Edge, sender: str) -> campaigns_pb2.Campaign:
    campaign = campaigns_pb2.Campaign(display_name="launch", subject="news", text_body="hello {{ name }}",
                                      **{"from": common_pb2.EmailAddress(email=sender)})
    with edge.channel() as channel:
        created: campaigns_pb2.Campaign = campaigns_pb2_grpc.CampaignServiceStub(channel).CreateCampaign(
            campaigns_pb2.CreateCampaignRequest(campaign=campaign), metadata=edge.auth, timeout=30)
    return created


def test_a_campaign_from_an_unverified_domain_is_refused_and_one_from_a_verified_domain_is_created(
        edge: Edge, verified: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _create_campaign(edge, "news@unverified.example")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    info = _error_info(refused.value)
    assert info.reason == "UNVERIFIED_SENDER_DOMAIN" and info.metadata["domain"] == "unverified.example"
    assert _create_campaign(edge, f"news@{verified}").name.startswith("campaigns/")


def test_domains_are_read_and_added_over_rest(edge: Edge, verified: str) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{edge.config.gateway_port}", timeout=30,
                      headers={"Authorization": f"Bearer {edge.api_key}"}) as http:
        got = http.get(f"/v1/domains/{verified}")
        added = http.post("/v1/domains", json={"domain": "rest.example", "ed25519": True})
        public_suffix = http.post("/v1/domains", json={"domain": "co.uk"})
    assert got.status_code == 200 and got.json()["state"] == "DOMAIN_STATE_VERIFIED"
    assert added.status_code == 200 and added.json()["name"] == "domains/rest.example"
    assert {r.get("selector") for r in added.json()["records"]} >= {"esp1", "esp1e"}
    assert public_suffix.status_code == 400
    info = next(d for d in public_suffix.json()["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert info["reason"] == "PUBLIC_SUFFIX"
