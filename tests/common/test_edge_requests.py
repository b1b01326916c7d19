"""The shared checks every server applies where a request enters it (issue 21): request bytes that do not decode,
resource ids, filter values and page tokens that no resource could have, page sizes (AIP-158) and update masks
(AIP-134)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from esp.v1 import credits_pb2, credits_pb2_grpc, providers_pb2, tenants_pb2, webhooks_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from libs.common.auth import TrustedHeaderAuthenticator
from libs.common.errors import InvalidArgument
from libs.common.field_masks import update_paths
from libs.common.grpc_server import ServiceApp
from libs.common.pagination import page_size
from libs.common.resource_names import checked_page_token, checked_text, resource_id
from tests.serving import served


class Balances(credits_pb2_grpc.CreditServiceServicer):
    async def GetBalance(self, request: Any, context: Any) -> credits_pb2.Balance:
        return credits_pb2.Balance(tenant=request.tenant)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    app = ServiceApp(name="test", default_port=0,
                     servicers=[(credits_pb2_grpc.add_CreditServiceServicer_to_server, Balances())],
                     service_names=["esp.v1.CreditService"], authenticator=TrustedHeaderAuthenticator())
    async with served(app) as (address, _):
        yield address


async def test_request_bytes_that_do_not_decode_are_invalid_argument_naming_the_type(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/esp.v1.CreditService/GetBalance", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "request body does not decode as esp.v1.GetBalanceRequest"
    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(caught.value).details[0].Unpack(info)  # type: ignore[union-attr]
    assert info.reason == "UNDECODABLE_REQUEST"


async def test_request_bytes_that_decode_still_reach_the_handler(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credits_pb2.GetBalanceRequest(tenant="tenants/acme"), timeout=10)
    assert reply.tenant == "tenants/acme"


def _fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.field_violations]


@pytest.mark.parametrize("name", ["messages/a\x00b", "messages/a\nb", "messages/a\x7fb", "messages/a\x85b",
                                  "messages/" + "x" * 513, "messages/", "messages/a/b", "message/a", "a"])
def test_a_resource_name_no_resource_could_have_is_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resource_id(name, "messages", "parent")
    assert _fields(caught.value) == ["parent"]


def test_a_resource_name_gives_its_id() -> None:
    assert resource_id("tenants/acme/apiKeys/k1", "tenants/acme/apiKeys", "name") == "k1"
    assert resource_id("suppressions/ann@example.com~news", "suppressions", "name") == "ann@example.com~news"


@pytest.mark.parametrize("value", ["a\x00b", "\t", "x" * 1025])
def test_a_filter_value_with_a_control_character_or_too_long_is_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        checked_text(value, "tag")
    assert _fields(caught.value) == ["tag"]


def test_a_page_token_with_a_nul_byte_is_invalid_argument_naming_page_token() -> None:
    with pytest.raises(InvalidArgument) as caught:
        checked_page_token("abc\x00")
    assert _fields(caught.value) == ["page_token"]


def test_a_negative_page_size_is_invalid_argument_naming_page_size() -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size(-1)
    assert _fields(caught.value) == ["page_size"]


def test_page_size_zero_is_the_default_and_above_the_maximum_is_the_maximum() -> None:
    assert (page_size(0, default=20, maximum=100), page_size(2**31 - 1, maximum=100), page_size(7)) == (20, 100, 7)


def test_no_update_mask_changes_the_fields_the_request_sets() -> None:
    tenant = tenants_pb2.Tenant(name="tenants/acme", disabled=True, daily_quota=0)
    assert update_paths(FieldMask(), tenant) == ("disabled",)


def test_an_optional_field_set_to_its_default_counts_as_set_without_a_mask() -> None:
    endpoint = webhooks_pb2.WebhookEndpoint(name="webhookEndpoints/e1", enabled=False)
    assert update_paths(FieldMask(), endpoint) == ("enabled",)


def test_a_mask_names_the_fields_to_change_even_to_their_default() -> None:
    tenant = tenants_pb2.Tenant(name="tenants/acme", disabled=True)
    assert update_paths(FieldMask(paths=["daily_quota"]), tenant) == ("daily_quota",)


def test_a_star_mask_replaces_every_updatable_field_but_those_left_out() -> None:
    paths = update_paths(FieldMask(paths=["*"]), providers_pb2.Provider(), immutable=("etag",),
                         not_in_full_replacement=("credentials", "webhook_secrets"))
    assert "display_name" in paths and "type" in paths
    assert not {"name", "etag", "credentials", "webhook_secrets", "create_time", "credentials_ref"} & set(paths)


@pytest.mark.parametrize("path", ["no_such_field", "create_time", "name", "options.timeout_s"])
def test_a_mask_path_that_is_unknown_output_only_identifier_or_nested_is_invalid_argument(path: str) -> None:
    resource: Any = providers_pb2.Provider() if path.startswith("options") else tenants_pb2.Tenant()
    with pytest.raises(InvalidArgument) as caught:
        update_paths(FieldMask(paths=[path]), resource)
    assert _fields(caught.value) == ["update_mask"]


def test_a_star_combined_with_other_paths_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        update_paths(FieldMask(paths=["*", "disabled"]), tenants_pb2.Tenant())
    assert _fields(caught.value) == ["update_mask"]
