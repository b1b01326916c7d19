"""An error's status stays small enough for a client to read, however many bad fields the request had: the first
``MAX_VIOLATIONS`` violations, their texts cut, a count of the rest, and the whole status under ``MAX_STATUS_BYTES``
(gRPC clients refuse trailers past 8 KiB at random and always past 16 KiB)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from esp.v1 import credits_pb2, credits_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from libs.common.auth import TrustedHeaderAuthenticator
from libs.common.errors import (
    MAX_DETAIL_CHARS,
    MAX_STATUS_BYTES,
    MAX_STATUS_MESSAGE_BYTES,
    MAX_VIOLATIONS,
    OMITTED_VIOLATIONS_KEY,
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    error_from_status,
    error_parts,
)
from libs.common.grpc_server import ServiceApp
from tests.serving import served

# Four bytes of UTF-8 a character, and a field path as long as a header name may make it: the worst case per byte.
WIDE = "\U0001f4e7"


def bad_headers(count: int, name_chars: int = 40) -> list[FieldViolation]:
    return [FieldViolation(f"headers[X-Bad-{i:05}-{WIDE * name_chars}]", f"not a valid header name: {WIDE * 300}",
                           "INVALID_HEADER_NAME") for i in range(count)]


def unpack(status: status_pb2.Status, cls: Any) -> Any:
    for detail in status.details:
        if detail.Is(cls.DESCRIPTOR):
            value = cls()
            detail.Unpack(value)
            return value
    raise AssertionError(f"no {cls.DESCRIPTOR.name} detail")


def test_a_status_with_thousands_of_violations_stays_under_the_size_cap() -> None:
    status = InvalidArgument("bad headers", field_violations=bad_headers(3000)).to_status()

    assert status.ByteSize() <= MAX_STATUS_BYTES
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_capped_status_lists_the_first_violations_and_counts_the_others() -> None:
    violations = [FieldViolation(f"to[{i}].email", "not an address") for i in range(3000)]

    status = InvalidArgument("bad recipients", field_violations=violations).to_status()

    listed = unpack(status, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in listed] == [f"to[{i}].email" for i in range(MAX_VIOLATIONS)]
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert info.metadata[OMITTED_VIOLATIONS_KEY] == str(3000 - MAX_VIOLATIONS)


def test_a_status_with_few_short_violations_is_left_whole() -> None:
    error = InvalidArgument("bad", metadata={"k": "v"}, field_violations=[FieldViolation("subject", "too long")])

    status = error.to_status()

    assert [v.field for v in unpack(status, error_details_pb2.BadRequest).field_violations] == ["subject"]
    assert dict(unpack(status, error_details_pb2.ErrorInfo).metadata) == {"k": "v"}


def test_long_texts_in_a_status_are_cut_with_an_ellipsis() -> None:
    error = InvalidArgument("m" * 10_000, metadata={"value": "v" * 10_000},
                            field_violations=[FieldViolation("f" * 10_000, "d" * 10_000)])

    status = error.to_status()

    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES and status.message.startswith("mmm")
    assert status.message.endswith("…")
    violation = unpack(status, error_details_pb2.BadRequest).field_violations[0]
    assert len(violation.field) == len(violation.description) == MAX_DETAIL_CHARS
    assert violation.field.startswith("fff") and violation.field.endswith("…")
    assert len(unpack(status, error_details_pb2.ErrorInfo).metadata["value"]) == MAX_DETAIL_CHARS


def test_quota_violations_are_capped_too() -> None:
    error = ResourceExhausted("slow down", quota_violations=[QuotaViolation(f"q{i}", WIDE * 300) for i in range(500)])

    status = error.to_status()

    assert status.ByteSize() <= MAX_STATUS_BYTES
    assert 0 < len(unpack(status, error_details_pb2.QuotaFailure).violations) <= MAX_VIOLATIONS


def test_a_capped_status_relayed_by_another_service_keeps_the_count_of_what_it_left_out() -> None:
    first = InvalidArgument("bad", field_violations=[FieldViolation(f"f{i}", "bad") for i in range(3000)]).to_status()

    relayed = error_from_status(first).to_status()

    assert relayed == first


def test_the_batch_form_of_an_error_is_capped_like_its_status() -> None:
    error = InvalidArgument("x" * 10_000, field_violations=bad_headers(3000))

    _code, message, _reason, metadata, fields = error_parts(error)

    assert len(message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert len(fields) == MAX_VIOLATIONS
    assert all(len(field) <= MAX_DETAIL_CHARS for field in fields)
    assert metadata[OMITTED_VIOLATIONS_KEY] == str(3000 - MAX_VIOLATIONS)


# -- through a real server and client ---------------------------------------------------------------------------
class Refusing(credits_pb2_grpc.CreditServiceServicer):
    """TopUp refuses with one violation per bad header of a request that had thousands."""

    async def TopUp(self, request: Any, context: Any) -> credits_pb2.Balance:
        raise InvalidArgument(f"{3000} header names are invalid {WIDE * 5000}", reason="INVALID_EMAIL_REQUEST",
                              field_violations=bad_headers(3000, name_chars=1000))


@pytest.fixture
async def refusing_server() -> AsyncIterator[str]:
    app = ServiceApp(name="test", default_port=0,
                     servicers=[(credits_pb2_grpc.add_CreditServiceServicer_to_server, Refusing())],
                     service_names=["esp.v1.CreditService"], authenticator=TrustedHeaderAuthenticator())
    async with served(app, shutdown_grace_s=2) as (address, _):
        yield address


async def test_a_client_reads_the_invalid_argument_of_a_request_with_thousands_of_bad_fields(refusing_server: str):
    async with grpc.aio.insecure_channel(refusing_server) as channel:
        for _ in range(20):  # past 8 KiB of trailers a client refuses them at random: one lucky call proves little
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await credits_pb2_grpc.CreditServiceStub(channel).TopUp(
                    credits_pb2.TopUpRequest(), metadata=(("x-esp-tenant", "t1"),), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
            assert status is not None
            assert len(unpack(status, error_details_pb2.BadRequest).field_violations) >= 1
            assert unpack(status, error_details_pb2.ErrorInfo).reason == "INVALID_EMAIL_REQUEST"
