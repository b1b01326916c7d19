"""gRPC status → HTTP status and the ``google.rpc.Status`` JSON error body, as grpc-gateway writes them.

The body is the Status message marshaled like any response: ``{"code": 5, "message": "...", "details":
[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", ...}]}``, with the details decoded from the upstream's
``grpc-status-details-bin`` trailer.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf import descriptor_pool as default_pool_module
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2, status_pb2

# grpc-gateway's HTTPStatusFromCode (v2), keyed by google.rpc.Code number. FAILED_PRECONDITION is 400 on
# purpose (not 412), and CANCELLED is nginx's 499 "client closed request".
HTTP_STATUS_BY_CODE: Mapping[int, int] = {
    0: 200,  # OK
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}
_RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def http_status_from_code(code: int) -> int:
    """The HTTP status grpc-gateway answers for a gRPC code (unknown codes are 500)."""
    return HTTP_STATUS_BY_CODE.get(code, 500)


class GatewayError(Exception):
    """A failure to answer, carried as a gRPC status; ``http_status`` overrides the code's mapping (the
    equivalent of grpc-gateway's ``HTTPStatusError``, used for routing errors such as 405)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        http_status: int | None = None,
        details: Sequence[any_pb2.Any] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.details = tuple(details)
        self.headers: Mapping[str, str] = dict(headers or {})
        """Extra response headers (e.g. ``Allow`` on 405)."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def code_number(self) -> int:
        """The google.rpc.Code number of ``code``."""
        return int(self.code.value[0])

    @property
    def status(self) -> int:
        """The HTTP status to answer."""
        return self.http_status if self.http_status is not None else http_status_from_code(self.code_number)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> GatewayError:
        """The upstream's status, with the details of its ``grpc-status-details-bin`` trailer."""
        details: tuple[any_pb2.Any, ...] = ()
        for key, value in error.trailing_metadata() or ():
            if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
                try:
                    details = tuple(status_pb2.Status.FromString(value).details)
                except Exception:  # a malformed trailer must not hide the status itself
                    details = ()
        return cls(code=error.code(), message=error.details() or "", details=details)


class StatusMarshaler:
    """Writes google.rpc.Status as JSON, resolving ``Any`` details against the contracts' pool first and the
    googleapis types bundled with the runtime second."""

    def __init__(self, pool: DescriptorPool, *, emit_unpopulated: bool) -> None:
        self._pools: Sequence[DescriptorPool] = (pool, default_pool_module.Default())
        self._emit_unpopulated = emit_unpopulated

    def to_dict(self, error: GatewayError) -> dict[str, Any]:
        """The JSON object of the error's Status (proto3 JSON: default values omitted unless configured)."""
        body: dict[str, Any] = {}
        if error.code_number or self._emit_unpopulated:
            body["code"] = error.code_number
        if error.message or self._emit_unpopulated:
            body["message"] = error.message
        if error.details or self._emit_unpopulated:
            body["details"] = [self._detail(detail) for detail in error.details]
        return body

    def _detail(self, detail: any_pb2.Any) -> dict[str, Any]:
        for pool in self._pools:
            try:
                as_dict: dict[str, Any] = json_format.MessageToDict(
                    detail,
                    descriptor_pool=pool,
                    always_print_fields_with_no_presence=self._emit_unpopulated,
                )
                return as_dict
            except (TypeError, KeyError, json_format.Error):
                continue
        # Neither pool knows the type: keep it opaque rather than fail the whole error response.
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode("ascii")}


def retry_after_seconds(error: GatewayError) -> int | None:
    """Whole seconds from a ``google.rpc.RetryInfo`` detail, rounded up, for a ``Retry-After`` header."""
    for detail in error.details:
        if detail.type_url.endswith("/google.rpc.RetryInfo") or detail.type_url == _RETRY_INFO_TYPE:
            info = error_details_pb2.RetryInfo.FromString(detail.value)
            delay: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return max(0, math.ceil(delay))
    return None


def bad_request(message: str, violations: Iterable[tuple[str, str]]) -> GatewayError:
    """INVALID_ARGUMENT with a ``google.rpc.BadRequest`` detail of ``(field, description)`` violations."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=where, description=text)
                for where, text in violations
            ]
        )
    )
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, details=[detail])
