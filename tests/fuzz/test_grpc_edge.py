"""The public gRPC edge (ingest's port, which answers or forwards every public RPC) against malformed and oversized
requests: header injection, huge subjects, oversized lists, invalid UTF-8 and undecodable bytes, deep nesting,
negative amounts. Each is refused with a clear status (INVALID_ARGUMENT with the bad field named; RESOURCE_EXHAUSTED
only where gRPC itself defines it, a message over the server's size limit), never INTERNAL or UNKNOWN, and leaves
nothing behind: the tenant's balance, transactions and messages are as they were.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from esp.v1 import (
    common_pb2,
    credits_pb2,
    credits_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
)
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dev import seed
from tests.e2e.conftest import RunningMesh

SEND_EMAIL = "/esp.v1.MessageService/SendEmail"
GET_BALANCE = "/esp.v1.CreditService/GetBalance"
GET_MESSAGE = "/esp.v1.MessageService/GetMessage"
CLEAR_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT}
# gRPC's own status for a request larger than the server accepts (8 MiB, libs/common/grpc_server.py); the
# transport refuses it before any of our code runs.
TOO_LARGE_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
MIB = 1024 * 1024


@dataclass
class Tenant:
    """A tenant of its own for one test, so that "nothing was written" can be checked exactly."""

    id: str
    key: str
    mesh: RunningMesh
    channel: grpc.Channel

    @property
    def name(self) -> str:
        return f"tenants/{self.id}"

    def auth(self) -> tuple[tuple[str, str], ...]:
        return self.mesh.auth(self.key)

    def balance(self) -> credits_pb2.Balance:
        return credits_pb2_grpc.CreditServiceStub(self.channel).GetBalance(
            credits_pb2.GetBalanceRequest(tenant=self.name), metadata=self.auth(), timeout=10)

    def transactions(self) -> list[credits_pb2.Transaction]:
        reply = credits_pb2_grpc.CreditServiceStub(self.channel).ListTransactions(
            credits_pb2.ListTransactionsRequest(tenant=self.name, page_size=100), metadata=self.auth(), timeout=10)
        return list(reply.transactions)

    def send(self, request: messages_pb2.SendEmailRequest) -> messages_pb2.SendEmailResponse:
        return messages_pb2_grpc.MessageServiceStub(self.channel).SendEmail(request, metadata=self.auth(), timeout=30)

    def messages(self) -> list[messages_pb2.Message]:
        reply = messages_pb2_grpc.MessageServiceStub(self.channel).ListMessages(
            messages_pb2.ListMessagesRequest(page_size=100), metadata=self.auth(), timeout=10)
        return list(reply.messages)

    def only_message_is(self, sentinel: str, timeout_s: float = 30) -> list[str]:
        """The tenant's message names once ``sentinel`` is listed (reports learns of messages asynchronously; a
        message accepted before the sentinel would be listed by then too)."""
        deadline = time.monotonic() + timeout_s
        while True:
            names = [message.name for message in self.messages()]
            if sentinel in names or time.monotonic() > deadline:
                return names
            time.sleep(0.1)


@dataclass(frozen=True)
class Snapshot:
    """What a refused call must leave as it was."""

    balance: credits_pb2.Balance
    transactions: list[credits_pb2.Transaction]


@pytest.fixture(scope="module")
def edge(fuzz_mesh: RunningMesh) -> Iterator[grpc.Channel]:
    with fuzz_mesh.channel() as channel:
        yield channel


@pytest.fixture
def tenant(fuzz_mesh: RunningMesh, edge: grpc.Channel) -> Tenant:
    tenant_id = f"fz-{secrets.token_hex(4)}"
    seed.ensure_tenant(edge, fuzz_mesh.config.admin_token, tenant_id)
    key = seed.create_api_key(edge, fuzz_mesh.config.admin_token, tenant_id)
    seed.top_up(edge, fuzz_mesh.config.admin_token, tenant_id, 10_000, f"{tenant_id}-initial")
    return Tenant(tenant_id, key, fuzz_mesh, edge)


def snapshot(tenant: Tenant) -> Snapshot:
    return Snapshot(tenant.balance(), tenant.transactions())


def assert_nothing_written(tenant: Tenant, before: Snapshot) -> None:
    """Balance and journal unchanged, and no message: a valid send afterwards is the tenant's only one."""
    assert tenant.balance() == before.balance
    assert tenant.transactions() == before.transactions
    sentinel = tenant.send(valid_send()).message.name
    assert tenant.only_message_is(sentinel) == [sentinel]


def valid_send(**overrides: Any) -> messages_pb2.SendEmailRequest:
    fields: dict[str, Any] = {
        "request_id": secrets.token_hex(8),
        "message_class": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        "from": common_pb2.EmailAddress(email="shop@example.com", name="Shop"),
        "to": [common_pb2.EmailAddress(email="ada@example.com")],
        "subject": "Your order",
        "text_body": "It ships today.",
    }
    fields.update(overrides)
    return messages_pb2.SendEmailRequest(**fields)


def refusal(call: Callable[[], object], expected: set[grpc.StatusCode]) -> status_pb2.Status | None:
    """The status a call that must fail got; fails the test if it succeeded or got another code."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() in expected, f"{error.code()}: {error.details()}"
    return rpc_status.from_call(error)


def violated_fields(status: status_pb2.Status | None) -> set[str]:
    assert status is not None, "a refusal carries a google.rpc.Status with its details"
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update(violation.field for violation in bad.field_violations)
    return fields


def raw_call(channel: grpc.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> bytes:
    """A unary call with ``payload`` sent as is: bytes no protobuf library would serialize."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    reply: bytes = call(payload, metadata=metadata, timeout=30)
    return reply


def with_bytes_in(message: Any, placeholder: str, replacement: bytes) -> bytes:
    """``message`` serialized with the bytes of the string field holding ``placeholder`` replaced by
    ``replacement`` (same length, so the length prefix stays right)."""
    assert len(replacement) == len(placeholder.encode())
    encoded: bytes = message.SerializeToString()
    assert encoded.count(placeholder.encode()) == 1
    return encoded.replace(placeholder.encode(), replacement)


# -- header injection and oversized fields ----------------------------------------------------------------------------

INJECTION = "\r\nBcc: victim@example.net"
REFUSED_SENDS: dict[str, tuple[dict[str, Any], str]] = {
    "CR/LF in the subject": ({"subject": f"Hello{INJECTION}"}, "subject"),
    "a lone LF in the subject": ({"subject": "Hello\nBcc: victim@example.net"}, "subject"),
    "CR/LF in the sender's display name": (
        {"from": common_pb2.EmailAddress(email="shop@example.com", name=f"Shop{INJECTION}")}, "from"),
    "CR/LF in a recipient's display name": (
        {"to": [common_pb2.EmailAddress(email="ada@example.com", name=f"Ada{INJECTION}")]}, "to"),
    "CR/LF in a custom header's value": ({"headers": {"X-Campaign": f"spring{INJECTION}"}}, "headers"),
    "CR/LF in a custom header's name": ({"headers": {f"X-Campaign{INJECTION}": "spring"}}, "headers"),
    "a reserved header": ({"headers": {"Bcc": "victim@example.net"}}, "headers"),
    "CR/LF in a tag": ({"tags": [f"spring{INJECTION}"]}, "tags"),
    "a subject of 1 MiB": ({"subject": "s" * MIB}, "subject"),
    "metadata over its byte limit": ({"metadata": {f"k{i}": "v" * 1000 for i in range(8)}}, "metadata"),
    "thousands of metadata pairs": ({"metadata": {f"k{i}": "v" for i in range(5000)}}, "metadata"),
    "thousands of recipients": (
        {"to": [common_pb2.EmailAddress(email=f"r{i}@example.com") for i in range(5000)]}, "to"),
    "thousands of tags": ({"tags": [f"t{i}" for i in range(5000)]}, "tags"),
    "thousands of custom headers": ({"headers": {f"X-H{i}": "v" for i in range(5000)}}, "headers"),
    "thousands of attachment ids": ({"attachment_ids": [f"att-{i}" for i in range(5000)]}, "attachment_ids"),
    "a request id of 64 KiB": ({"request_id": "r" * 65536}, "request_id"),
}


@pytest.mark.parametrize("overrides, field", REFUSED_SENDS.values(), ids=REFUSED_SENDS.keys())
def test_a_malformed_send_is_invalid_argument_naming_the_field_and_writes_nothing(
        tenant: Tenant, overrides: dict[str, Any], field: str) -> None:
    before = snapshot(tenant)

    status = refusal(lambda: tenant.send(valid_send(**overrides)), CLEAR_STATUSES)

    assert any(name == field or name.startswith((f"{field}[", f"{field}.")) for name in violated_fields(status))
    assert_nothing_written(tenant, before)


def test_thousands_of_malformed_header_names_are_refused_with_a_status_the_client_can_read(tenant: Tenant) -> None:
    # One violation per bad header, each naming it: the status must still fit the trailers a client accepts.
    headers = {f"X-Bad{INJECTION}{i:05}": "v" for i in range(3000)}
    before = snapshot(tenant)

    refusal(lambda: tenant.send(valid_send(headers=headers)), CLEAR_STATUSES)

    assert_nothing_written(tenant, before)


def test_a_10_mib_subject_is_refused_by_size_and_writes_nothing(tenant: Tenant) -> None:
    before = snapshot(tenant)

    refusal(lambda: tenant.send(valid_send(subject="s" * (10 * MIB))), TOO_LARGE_STATUSES)

    assert_nothing_written(tenant, before)


def test_a_batch_over_the_batch_limit_is_invalid_argument_and_writes_nothing(tenant: Tenant) -> None:
    stub = messages_pb2_grpc.MessageServiceStub(tenant.channel)
    batch = messages_pb2.BatchSendEmailsRequest(requests=[valid_send() for _ in range(2000)])
    before = snapshot(tenant)

    refusal(lambda: stub.BatchSendEmails(batch, metadata=tenant.auth(), timeout=30), CLEAR_STATUSES)

    assert_nothing_written(tenant, before)


def test_a_refused_send_does_not_use_up_its_request_id(tenant: Tenant) -> None:
    request_id = secrets.token_hex(8)
    refusal(lambda: tenant.send(valid_send(request_id=request_id, subject=f"Hi{INJECTION}")), CLEAR_STATUSES)

    accepted = tenant.send(valid_send(request_id=request_id))

    assert accepted.message.name
    assert accepted.message.subject == "Your order"


# -- bytes no protobuf library would produce --------------------------------------------------------------------------

INVALID_UTF8 = b"\xff\xfe\xc3\x28\xed\xa0\x80\xf8"  # not UTF-8 at all, a bad continuation, a surrogate, 5-byte lead


def test_invalid_utf8_in_a_send_is_invalid_argument_and_writes_nothing(tenant: Tenant) -> None:
    payload = with_bytes_in(valid_send(subject="PLACEHLD"), "PLACEHLD", INVALID_UTF8)
    before = snapshot(tenant)

    refusal(lambda: raw_call(tenant.channel, SEND_EMAIL, payload, tenant.auth()), CLEAR_STATUSES)

    assert_nothing_written(tenant, before)


def test_invalid_utf8_in_a_forwarded_read_is_invalid_argument(tenant: Tenant) -> None:
    # The edge forwards reads as raw bytes; the service that owns them (the ledger, reports) decodes them.
    balance = with_bytes_in(credits_pb2.GetBalanceRequest(tenant="PLACEHLD"), "PLACEHLD", INVALID_UTF8)
    message = with_bytes_in(messages_pb2.GetMessageRequest(name="PLACEHLD"), "PLACEHLD", INVALID_UTF8)

    refusal(lambda: raw_call(tenant.channel, GET_BALANCE, balance, tenant.auth()), CLEAR_STATUSES)
    refusal(lambda: raw_call(tenant.channel, GET_MESSAGE, message, tenant.auth()), CLEAR_STATUSES)


def test_a_truncated_message_is_invalid_argument_and_writes_nothing(tenant: Tenant) -> None:
    payload = valid_send().SerializeToString()[:-3]
    before = snapshot(tenant)

    refusal(lambda: raw_call(tenant.channel, SEND_EMAIL, payload, tenant.auth()), CLEAR_STATUSES)

    assert_nothing_written(tenant, before)


def test_deeply_nested_unknown_fields_are_invalid_argument_and_write_nothing(tenant: Tenant) -> None:
    # Field 99 as a group (wire type 3) opened 20,000 times: a parser that recursed per level would blow its stack.
    depth = 20_000
    nested = b"\x9b\x06" * depth + b"\x9c\x06" * depth  # tag (99 << 3 | 3) then (99 << 3 | 4), as varints
    payload = valid_send().SerializeToString() + nested
    before = snapshot(tenant)

    refusal(lambda: raw_call(tenant.channel, SEND_EMAIL, payload, tenant.auth()), CLEAR_STATUSES)

    assert_nothing_written(tenant, before)


# -- amounts ----------------------------------------------------------------------------------------------------------

REFUSED_TOP_UPS = {"negative": -500, "zero": 0, "the largest int64": 2**63 - 1, "the smallest int64": -(2**63)}


@pytest.mark.parametrize("amount", REFUSED_TOP_UPS.values(), ids=REFUSED_TOP_UPS.keys())
def test_a_top_up_of_an_impossible_amount_is_invalid_argument_and_writes_nothing(
        tenant: Tenant, fuzz_mesh: RunningMesh, amount: int) -> None:
    stub = credits_pb2_grpc.CreditServiceStub(tenant.channel)
    request = credits_pb2.TopUpRequest(tenant=tenant.name, amount=amount, request_id=secrets.token_hex(8))
    before = snapshot(tenant)

    status = refusal(lambda: stub.TopUp(request, metadata=fuzz_mesh.admin(), timeout=10), CLEAR_STATUSES)

    assert "amount" in violated_fields(status)
    assert snapshot(tenant) == before


def test_a_negative_price_is_invalid_argument_and_leaves_the_price_book_as_it_was(
        tenant: Tenant, fuzz_mesh: RunningMesh) -> None:
    stub = credits_pb2_grpc.CreditServiceStub(tenant.channel)
    read = credits_pb2.GetPriceBookRequest(tenant=tenant.name)
    before = stub.GetPriceBook(read, metadata=tenant.auth(), timeout=10)
    update = credits_pb2.UpdatePriceBookRequest(price_book=credits_pb2.PriceBook(
        tenant=tenant.name, otp_per_email=7, bulk_per_email=-1))

    status = refusal(lambda: stub.UpdatePriceBook(update, metadata=fuzz_mesh.admin(), timeout=10), CLEAR_STATUSES)

    assert any("bulk_per_email" in field for field in violated_fields(status))
    assert stub.GetPriceBook(read, metadata=tenant.auth(), timeout=10) == before  # otp_per_email not applied alone


def test_a_negative_low_balance_threshold_is_invalid_argument_and_writes_nothing(tenant: Tenant) -> None:
    stub = credits_pb2_grpc.CreditServiceStub(tenant.channel)
    request = credits_pb2.SetLowBalanceThresholdRequest(tenant=tenant.name, threshold=-1)
    before = snapshot(tenant)

    refusal(lambda: stub.SetLowBalanceThreshold(request, metadata=tenant.auth(), timeout=10), CLEAR_STATUSES)

    assert snapshot(tenant) == before


# -- ids and paging ---------------------------------------------------------------------------------------------------

def test_a_nul_byte_in_a_message_id_is_a_clear_refusal(tenant: Tenant) -> None:
    stub = messages_pb2_grpc.MessageServiceStub(tenant.channel)
    request = messages_pb2.GetMessageRequest(name="messages/abc\x00def")

    refusal(lambda: stub.GetMessage(request, metadata=tenant.auth(), timeout=10),
            {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})


def test_a_negative_page_size_is_invalid_argument(tenant: Tenant) -> None:
    stub = messages_pb2_grpc.MessageServiceStub(tenant.channel)
    request = messages_pb2.ListMessagesRequest(page_size=-1)

    status = refusal(lambda: stub.ListMessages(request, metadata=tenant.auth(), timeout=10), CLEAR_STATUSES)

    assert "page_size" in violated_fields(status)


IMPOSSIBLE_ETAGS = {"past int64": "9" * 30, "a digit int() cannot read": "\u00b2"}


@pytest.mark.parametrize("etag", IMPOSSIBLE_ETAGS.values(), ids=IMPOSSIBLE_ETAGS.keys())
def test_a_delete_with_an_impossible_etag_is_refused_and_keeps_the_provider(
        fuzz_mesh: RunningMesh, edge: grpc.Channel, etag: str) -> None:
    # No version of a provider has this etag: the delete is a failed condition (or a bad argument), never a
    # database error.
    provider = f"fz-{secrets.token_hex(4)}"
    seed.ensure_provider(edge, fuzz_mesh.config.admin_token,
                         seed.ProviderSeed(id=provider, type="smtp", endpoint="127.0.0.1:9", options={"tls": "none"}))
    stub = providers_pb2_grpc.ProviderServiceStub(edge)
    request = providers_pb2.DeleteProviderRequest(name=f"providers/{provider}", etag=etag)

    refusal(lambda: stub.DeleteProvider(request, metadata=fuzz_mesh.admin(), timeout=10),
            {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED})

    kept = stub.GetProvider(providers_pb2.GetProviderRequest(name=f"providers/{provider}"),
                            metadata=fuzz_mesh.admin(), timeout=10)
    assert kept.name == f"providers/{provider}"
