"""The domain's exception tree and its one mapping to ``google.rpc.Status`` (AIP-193).

Domain code raises these; the handler wrapper in :mod:`libs.common.grpc_server` turns them into a gRPC status
with ``ErrorInfo`` and, where given, ``BadRequest``, ``RetryInfo`` and ``QuotaFailure`` details.

A status travels in the call's trailers, which a gRPC client refuses past 16 KiB (and, between 8 and 16 KiB, at
random): a request with thousands of bad fields would otherwise make an error the client cannot read at all
(RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT). So every status is capped where it is built
(:meth:`EspError.to_status`, and :func:`error_parts` for batch results): the first ``MAX_VIOLATIONS`` violations, each
text cut to ``MAX_DETAIL_CHARS``, the ErrorInfo metadata ``OMITTED_VIOLATIONS_KEY`` counting the rest, and the whole
status at most ``MAX_STATUS_BYTES``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "ERROR_DOMAIN",
    "MAX_DETAIL_CHARS",
    "MAX_STATUS_BYTES",
    "MAX_STATUS_MESSAGE_BYTES",
    "MAX_VIOLATIONS",
    "OMITTED_VIOLATIONS_KEY",
    "Aborted",
    "AlreadyExists",
    "EspError",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_from_parts",
    "error_from_status",
    "error_parts",
]

ERROR_DOMAIN = "esp.dev"

MAX_VIOLATIONS = 100
"""Most field (and quota) violations a status lists; a caller fixes the first hundred before it needs the rest."""
MAX_DETAIL_CHARS = 200
"""Longest text of a violation (field path, description) or metadata value: they may echo what the caller sent."""
MAX_STATUS_MESSAGE_BYTES = 512
"""Longest status message, in UTF-8 bytes. It travels twice: in the status, and as ``grpc-message``, where each
byte that is not printable ASCII takes three."""
MAX_STATUS_BYTES = 4096
"""Largest serialized status, the message included. With ``grpc-message`` beside it (at most 1.5 KiB) the trailers
stay under gRPC's 8 KiB soft limit on metadata, past which clients refuse them at random (measured with grpcio 1.82:
a status of 8 KiB failed 2 calls in 30 as RESOURCE_EXHAUSTED, 12 KB 18 in 30) and always past 16 KiB."""
OMITTED_VIOLATIONS_KEY = "omitted_violations"
"""ErrorInfo metadata: how many violations the status leaves out (absent when it lists them all)."""
_ELLIPSIS = "…"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (``BadRequest.FieldViolation``)."""

    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota (``QuotaFailure.Violation``)."""

    subject: str
    description: str


class EspError(Exception):
    """Base of every error the platform reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after_s: float | None = None,
        quota_violations: Sequence[QuotaViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_after_s = retry_after_s
        self.quota_violations = tuple(quota_violations)

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` for this error, details included, capped to ``MAX_STATUS_BYTES`` (see the
        module docstring): when the capped violations still make it too large, fewer of them are listed."""
        keep = MAX_VIOLATIONS
        while True:
            status = self._status(keep)
            if status.ByteSize() <= MAX_STATUS_BYTES:
                return status
            if keep == 0:
                # Only metadata this large is left (our own code's, never the caller's input): the reason and the
                # message say what happened; the rest stays in the server's log.
                return _bare_status(self.code.value[0], status.message, self.reason)
            keep //= 2

    def _status(self, keep: int) -> status_pb2.Status:
        """The status listing at most ``keep`` violations of each kind, texts cut to ``MAX_DETAIL_CHARS``."""
        details: list[any_pb2.Any] = []

        def add(message: object) -> None:
            packed = any_pb2.Any()
            packed.Pack(message)
            details.append(packed)

        omitted = max(0, len(self.field_violations) - keep) + max(0, len(self.quota_violations) - keep)
        add(error_details_pb2.ErrorInfo(reason=_cut(self.reason, MAX_DETAIL_CHARS), domain=ERROR_DOMAIN,
                                        metadata=_capped_metadata(self.metadata, omitted)))
        if self.field_violations:
            add(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=_cut(v.field, MAX_DETAIL_CHARS), description=_cut(v.description, MAX_DETAIL_CHARS),
                            reason=_cut(v.reason, MAX_DETAIL_CHARS),
                        )
                        for v in self.field_violations[:keep]
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(1, int(self.retry_after_s * 1000)))
            add(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.quota_violations:
            add(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=_cut(v.subject, MAX_DETAIL_CHARS),
                                                                 description=_cut(v.description, MAX_DETAIL_CHARS))
                        for v in self.quota_violations[:keep]
                    ]
                )
            )
        return status_pb2.Status(code=self.code.value[0], message=_cut_utf8(self.message, MAX_STATUS_MESSAGE_BYTES),
                                 details=details)


def _cut(text: str, limit: int) -> str:
    """``text``, or its first characters and an ellipsis when it is longer than ``limit``."""
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


def _cut_utf8(text: str, limit: int) -> str:
    """``text``, or as many of its first characters as fit ``limit`` UTF-8 bytes with an ellipsis after them."""
    if len(text) * 4 <= limit or len(text.encode()) <= limit:
        return text
    kept = text.encode()[: limit - len(_ELLIPSIS.encode())].decode(errors="ignore")  # no half character
    return kept + _ELLIPSIS


def _capped_metadata(metadata: Mapping[str, str], omitted: int) -> dict[str, str]:
    """``metadata`` with its values cut, counting ``omitted`` more violations left out (on top of any an upstream's
    status had left out already, when this error was rebuilt from it)."""
    capped = {_cut(key, MAX_DETAIL_CHARS): _cut(value, MAX_DETAIL_CHARS) for key, value in metadata.items()}
    if omitted:
        earlier = metadata.get(OMITTED_VIOLATIONS_KEY, "0")
        capped[OMITTED_VIOLATIONS_KEY] = str(omitted + (int(earlier) if earlier.isdecimal() else 0))
    return capped


def _bare_status(code: int, message: str, reason: str) -> status_pb2.Status:
    """A status with nothing but its code, message and ErrorInfo reason (the last resort of the size cap)."""
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=_cut(reason, MAX_DETAIL_CHARS), domain=ERROR_DOMAIN,
                                            metadata={"details_omitted": "true"}))
    return status_pb2.Status(code=code, message=message, details=[packed])


class InvalidArgument(EspError):
    """The request itself is wrong (a malformed address, a bad field); ``field_violations`` say where."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class Unauthenticated(EspError):
    """No credentials, or credentials that name nobody (a missing or unknown API key)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(EspError):
    """The caller is known but its key lacks the scope the method needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(EspError):
    """No such resource for this caller (another tenant's resources are NOT_FOUND too, so ids leak nothing)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(EspError):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(EspError):
    """The system is not in a state where the request applies (an illegal state transition, no credits)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(EspError):
    """A concurrent request conflicted (the same ``request_id`` with a different body, say); retry at a higher level."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(EspError):
    """A rate limit or quota is spent; ``retry_after_s`` and ``quota_violations`` say which and for how long."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RATE_LIMITED"


class Unavailable(EspError):
    """A dependency is down or overloaded for now; safe to retry after ``retry_after_s``."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unimplemented(EspError):
    """The method is not served here."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(EspError):
    """A bug: an invariant broke. Never raised for bad input."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[int, type[EspError]] = {
    code_pb2.INVALID_ARGUMENT: InvalidArgument,
    code_pb2.UNAUTHENTICATED: Unauthenticated,
    code_pb2.PERMISSION_DENIED: PermissionDenied,
    code_pb2.NOT_FOUND: NotFound,
    code_pb2.ALREADY_EXISTS: AlreadyExists,
    code_pb2.FAILED_PRECONDITION: FailedPrecondition,
    code_pb2.ABORTED: Aborted,
    code_pb2.RESOURCE_EXHAUSTED: ResourceExhausted,
    code_pb2.UNAVAILABLE: Unavailable,
    code_pb2.UNIMPLEMENTED: Unimplemented,
}


def error_from_status(status: status_pb2.Status) -> EspError:
    """Rebuild a domain error from a status received from another service (so it propagates unchanged)."""
    cls = _BY_CODE.get(status.code, Internal)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    quotas: list[QuotaViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            quotas = [QuotaViolation(v.subject, v.description) for v in quota.violations]
    return cls(
        status.message,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after_s=retry_after,
        quota_violations=quotas,
    )


def error_from_parts(code: int, message: str, reason: str = "", metadata: Mapping[str, str] | None = None,
                     fields: Sequence[str] = ()) -> EspError:
    """Rebuild a domain error from the flat form used for per-item results of batch RPCs (``BatchError``)."""
    cls = _BY_CODE.get(code, Internal)
    return cls(message, reason=reason or None, metadata=metadata,
               field_violations=[FieldViolation(f, message) for f in fields])


def error_parts(error: EspError) -> tuple[int, str, str, dict[str, str], list[str]]:
    """The flat form of an error for a batch result: code, message, reason, metadata, fields; capped as
    :meth:`EspError.to_status` caps a status (a batch of emails each with thousands of bad fields would otherwise
    make a response no client accepts)."""
    fields = [_cut(v.field, MAX_DETAIL_CHARS) for v in error.field_violations[:MAX_VIOLATIONS]]
    metadata = _capped_metadata(error.metadata, len(error.field_violations) - len(fields))
    return (error.code.value[0], _cut_utf8(error.message, MAX_STATUS_MESSAGE_BYTES),
            _cut(error.reason, MAX_DETAIL_CHARS), metadata, fields)
