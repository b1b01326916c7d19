"""AIP conformance at the edge of a real mesh (issue 21): what a client sends that no resource could be (a NUL or
another control character in an id, a tag or a page token; a negative page size; bytes that do not decode) is
INVALID_ARGUMENT naming the field, never INTERNAL or UNKNOWN; an update changes only the fields its mask names; a
create retried with its request_id answers as the first did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    campaigns_pb2,
    campaigns_pb2_grpc,
    credits_pb2,
    credits_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.conftest import RunningMesh

pytestmark = pytest.mark.e2e

NUL = "a\x00b"

Call = Callable[[grpc.Channel, RunningMesh], Any]


def _violations(error: grpc.RpcError) -> list[str]:
    """The fields a status' BadRequest names."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


def _tenant(c: grpc.Channel) -> tenants_pb2_grpc.TenantServiceStub:
    return tenants_pb2_grpc.TenantServiceStub(c)


# (what the call does, the field its BadRequest must name, the call with the caller's key or the admin token)
EDGE_CALLS: list[tuple[str, str, Call]] = [
    ("GetMessage", "name", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).GetMessage(
        messages_pb2.GetMessageRequest(name=f"messages/{NUL}"), metadata=m.auth(), timeout=10)),
    ("ListMessageEvents", "parent", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).ListMessageEvents(
        messages_pb2.ListMessageEventsRequest(parent=f"messages/{NUL}"), metadata=m.auth(), timeout=10)),
    ("ListMessages tag", "tag", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).ListMessages(
        messages_pb2.ListMessagesRequest(tag=NUL), metadata=m.auth(), timeout=10)),
    ("ListMessages page_token", "page_token", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).ListMessages(
        messages_pb2.ListMessagesRequest(page_token=NUL), metadata=m.auth(), timeout=10)),
    ("CancelMessage", "name", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).CancelMessage(
        messages_pb2.CancelMessageRequest(name=f"messages/{NUL}"), metadata=m.auth(), timeout=10)),
    ("GetSuppression", "name", lambda c, m: reports_pb2_grpc.SuppressionServiceStub(c).GetSuppression(
        reports_pb2.GetSuppressionRequest(name=f"suppressions/{NUL}@example.com"), metadata=m.auth(), timeout=10)),
    ("DeleteSuppression", "name", lambda c, m: reports_pb2_grpc.SuppressionServiceStub(c).DeleteSuppression(
        reports_pb2.DeleteSuppressionRequest(name=f"suppressions/{NUL}@example.com"), metadata=m.auth(),
        timeout=10)),
    ("ListSuppressions topic", "topic", lambda c, m: reports_pb2_grpc.SuppressionServiceStub(c).ListSuppressions(
        reports_pb2.ListSuppressionsRequest(topic=NUL), metadata=m.auth(), timeout=10)),
    ("ListEvents tag", "tag", lambda c, m: events_pb2_grpc.EventServiceStub(c).ListEvents(
        events_pb2.ListEventsRequest(tag=NUL), metadata=m.auth(), timeout=10)),
    ("ListEvents message", "message", lambda c, m: events_pb2_grpc.EventServiceStub(c).ListEvents(
        events_pb2.ListEventsRequest(message=f"messages/{NUL}"), metadata=m.auth(), timeout=10)),
    ("GetStats tag", "tag", lambda c, m: reports_pb2_grpc.StatsServiceStub(c).GetStats(
        reports_pb2.GetStatsRequest(tag=NUL), metadata=m.auth(), timeout=10)),
    ("GetAttachment", "name", lambda c, m: attachments_pb2_grpc.AttachmentServiceStub(c).GetAttachment(
        attachments_pb2.GetAttachmentRequest(name=f"attachments/{NUL}"), metadata=m.auth(), timeout=10)),
    ("DeleteAttachment", "name", lambda c, m: attachments_pb2_grpc.AttachmentServiceStub(c).DeleteAttachment(
        attachments_pb2.DeleteAttachmentRequest(name=f"attachments/{NUL}"), metadata=m.auth(), timeout=10)),
    ("RevokeApiKey", "name", lambda c, m: _tenant(c).RevokeApiKey(
        tenants_pb2.RevokeApiKeyRequest(name=f"tenants/acme/apiKeys/{NUL}"), metadata=m.admin(), timeout=10)),
    ("ListApiKeys page_token", "page_token", lambda c, m: _tenant(c).ListApiKeys(
        tenants_pb2.ListApiKeysRequest(parent="tenants/acme", page_token=NUL), metadata=m.admin(), timeout=10)),
    ("ListTenants page_token", "page_token", lambda c, m: _tenant(c).ListTenants(
        tenants_pb2.ListTenantsRequest(page_token=NUL), metadata=m.admin(), timeout=10)),
    ("GetTenant", "name", lambda c, m: _tenant(c).GetTenant(
        tenants_pb2.GetTenantRequest(name=f"tenants/{NUL}"), metadata=m.admin(), timeout=10)),
    ("GetBalance", "tenant", lambda c, m: credits_pb2_grpc.CreditServiceStub(c).GetBalance(
        credits_pb2.GetBalanceRequest(tenant=f"tenants/{NUL}"), metadata=m.admin(), timeout=10)),
    ("GetProvider", "name", lambda c, m: providers_pb2_grpc.ProviderServiceStub(c).GetProvider(
        providers_pb2.GetProviderRequest(name=f"providers/{NUL}"), metadata=m.admin(), timeout=10)),
    ("ListProviders page_token", "page_token", lambda c, m: providers_pb2_grpc.ProviderServiceStub(c).ListProviders(
        providers_pb2.ListProvidersRequest(page_token=NUL), metadata=m.admin(), timeout=10)),
    ("GetWebhookEndpoint", "name", lambda c, m: webhooks_pb2_grpc.WebhookServiceStub(c).GetWebhookEndpoint(
        webhooks_pb2.GetWebhookEndpointRequest(name=f"webhookEndpoints/{NUL}"), metadata=m.auth(), timeout=10)),
    ("ListWebhookEndpoints page_token", "page_token",
     lambda c, m: webhooks_pb2_grpc.WebhookServiceStub(c).ListWebhookEndpoints(
         webhooks_pb2.ListWebhookEndpointsRequest(page_token=NUL), metadata=m.auth(), timeout=10)),
    ("GetCampaign", "name", lambda c, m: campaigns_pb2_grpc.CampaignServiceStub(c).GetCampaign(
        campaigns_pb2.GetCampaignRequest(name=f"campaigns/{NUL}"), metadata=m.auth(), timeout=10)),
    ("ListCampaigns page_token", "page_token", lambda c, m: campaigns_pb2_grpc.CampaignServiceStub(c).ListCampaigns(
        campaigns_pb2.ListCampaignsRequest(page_token=NUL), metadata=m.auth(), timeout=10)),
]


@pytest.fixture(scope="module")
def channel(running_mesh: RunningMesh) -> Iterator[grpc.Channel]:
    with running_mesh.channel() as ch:
        yield ch


@pytest.mark.parametrize(("call", "field"), [(c, f) for _, f, c in EDGE_CALLS], ids=[n for n, _, _ in EDGE_CALLS])
def test_a_nul_byte_in_an_id_tag_or_page_token_is_invalid_argument_naming_the_field(
        running_mesh: RunningMesh, channel: grpc.Channel, call: Call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, running_mesh)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in _violations(caught.value)


def test_an_overlong_resource_id_is_invalid_argument_naming_the_field(running_mesh: RunningMesh,
                                                                      channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        messages_pb2_grpc.MessageServiceStub(channel).GetMessage(
            messages_pb2.GetMessageRequest(name="messages/" + "x" * 10_000), metadata=running_mesh.auth(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value) == ["name"]


def test_a_nul_byte_in_a_rest_path_is_a_400_not_a_500(running_mesh: RunningMesh) -> None:
    response = httpx.get(f"http://127.0.0.1:{running_mesh.config.gateway_port}/v1/messages/a%00b",
                         headers={"Authorization": f"Bearer {running_mesh.api_key}"}, timeout=10)
    assert response.status_code == 400, response.text


LIST_CALLS: list[tuple[str, Call]] = [
    ("ListApiKeys", lambda c, m: _tenant(c).ListApiKeys(
        tenants_pb2.ListApiKeysRequest(parent="tenants/acme", page_size=-1), metadata=m.admin(), timeout=10)),
    ("ListTenants", lambda c, m: _tenant(c).ListTenants(
        tenants_pb2.ListTenantsRequest(page_size=-1), metadata=m.admin(), timeout=10)),
    ("ListProviders", lambda c, m: providers_pb2_grpc.ProviderServiceStub(c).ListProviders(
        providers_pb2.ListProvidersRequest(page_size=-1), metadata=m.admin(), timeout=10)),
    ("ListMessages", lambda c, m: messages_pb2_grpc.MessageServiceStub(c).ListMessages(
        messages_pb2.ListMessagesRequest(page_size=-1), metadata=m.auth(), timeout=10)),
    ("ListTransactions", lambda c, m: credits_pb2_grpc.CreditServiceStub(c).ListTransactions(
        credits_pb2.ListTransactionsRequest(tenant="tenants/acme", page_size=-1), metadata=m.admin(), timeout=10)),
    ("ListWebhookEndpoints", lambda c, m: webhooks_pb2_grpc.WebhookServiceStub(c).ListWebhookEndpoints(
        webhooks_pb2.ListWebhookEndpointsRequest(page_size=-1), metadata=m.auth(), timeout=10)),
    ("ListCampaigns", lambda c, m: campaigns_pb2_grpc.CampaignServiceStub(c).ListCampaigns(
        campaigns_pb2.ListCampaignsRequest(page_size=-1), metadata=m.auth(), timeout=10)),
]


@pytest.mark.parametrize("call", [c for _, c in LIST_CALLS], ids=[n for n, _ in LIST_CALLS])
def test_a_negative_page_size_is_invalid_argument_naming_page_size(running_mesh: RunningMesh, channel: grpc.Channel,
                                                                    call: Call) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, running_mesh)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert _violations(caught.value) == ["page_size"]


def test_a_page_size_above_the_maximum_is_clamped(running_mesh: RunningMesh, channel: grpc.Channel) -> None:
    keys = _tenant(channel).ListApiKeys(tenants_pb2.ListApiKeysRequest(parent="tenants/acme", page_size=2**31 - 1),
                                        metadata=running_mesh.admin(), timeout=10)
    assert keys.api_keys


@pytest.mark.parametrize("target", ["ingest", "router"])
def test_request_bytes_that_do_not_decode_are_invalid_argument(running_mesh: RunningMesh, target: str) -> None:
    """Through the edge (which forwards the bytes to the router) and answered by ingest itself."""
    method = ("/esp.v1.ProviderService/GetProvider" if target == "router"
              else "/esp.v1.TenantService/GetTenant")
    with running_mesh.channel() as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff", metadata=running_mesh.admin(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not decode" in (caught.value.details() or "")


def _new_tenant(channel: grpc.Channel, mesh: RunningMesh, tenant_id: str) -> None:
    _tenant(channel).CreateTenant(tenants_pb2.CreateTenantRequest(
        tenant_id=tenant_id, tenant=tenants_pb2.Tenant(display_name="Quota", daily_quota=500,
                                                       otp_rate_per_second=7)), metadata=mesh.admin(), timeout=10)


def test_disabling_a_tenant_through_rest_with_an_update_mask_keeps_its_quota(running_mesh: RunningMesh,
                                                                             channel: grpc.Channel) -> None:
    _new_tenant(channel, running_mesh, "quota-kept")
    response = httpx.patch(f"http://127.0.0.1:{running_mesh.config.gateway_port}/v1/tenants/quota-kept",
                           params={"updateMask": "disabled"}, json={"disabled": True},
                           headers={"Authorization": f"Bearer {running_mesh.config.admin_token}"}, timeout=10)
    assert response.status_code == 200, response.text
    tenant = _tenant(channel).GetTenant(tenants_pb2.GetTenantRequest(name="tenants/quota-kept"),
                                        metadata=running_mesh.admin(), timeout=10)
    assert (tenant.disabled, tenant.daily_quota, tenant.otp_rate_per_second) == (True, 500, 7)


def test_an_update_mask_naming_an_output_only_field_is_invalid_argument(running_mesh: RunningMesh,
                                                                        channel: grpc.Channel) -> None:
    _new_tenant(channel, running_mesh, "mask-create-time")
    with pytest.raises(grpc.RpcError) as caught:
        _tenant(channel).UpdateTenant(tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(name="tenants/mask-create-time"),
            update_mask=field_mask_pb2.FieldMask(paths=["create_time"])), metadata=running_mesh.admin(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value) == ["update_mask"]


def test_a_create_provider_retried_with_its_request_id_returns_the_first_response(running_mesh: RunningMesh,
                                                                                  channel: grpc.Channel) -> None:
    stub = providers_pb2_grpc.ProviderServiceStub(channel)
    request = providers_pb2.CreateProviderRequest(provider_id="replayed", request_id="create-replayed-1",
                                                  provider=providers_pb2.Provider(
                                                      type="smtp", endpoint="127.0.0.1:2525",
                                                      options={"tls": "none"}))
    first = stub.CreateProvider(request, metadata=running_mesh.admin(), timeout=10)
    again = stub.CreateProvider(request, metadata=running_mesh.admin(), timeout=10)
    assert again == first


def test_a_price_book_update_changes_only_the_prices_its_mask_names(running_mesh: RunningMesh,
                                                                    channel: grpc.Channel) -> None:
    stub = credits_pb2_grpc.CreditServiceStub(channel)
    defaults = stub.GetPriceBook(credits_pb2.GetPriceBookRequest(tenant="tenants/-"), metadata=running_mesh.admin(),
                                 timeout=10)
    _new_tenant(channel, running_mesh, "prices-masked")  # not acme: other tests of the session spend its credits
    stub.UpdatePriceBook(credits_pb2.UpdatePriceBookRequest(price_book=credits_pb2.PriceBook(
        tenant="tenants/prices-masked", otp_per_email=40, bulk_per_email=9)), metadata=running_mesh.admin(),
        timeout=10)

    book = stub.UpdatePriceBook(credits_pb2.UpdatePriceBookRequest(
        price_book=credits_pb2.PriceBook(tenant="tenants/prices-masked", otp_per_email=0, bulk_per_email=0),
        update_mask=field_mask_pb2.FieldMask(paths=["bulk_per_email"])), metadata=running_mesh.admin(), timeout=10)

    assert (book.otp_per_email, book.bulk_per_email) == (40, defaults.bulk_per_email)
