"""The ledger's domain errors.

Each derives from :class:`LedgerError` and from the shared :mod:`libs.common.errors` class that fixes its gRPC
status, so the one handler wrapper maps them to ``google.rpc.Status`` with an ``ErrorInfo`` whose ``reason`` and
``metadata`` are the attributes set here. The ledger itself never touches gRPC.
"""

from __future__ import annotations

from libs.common.errors import (
    AlreadyExists,
    EspError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)


class LedgerError(EspError):
    """Base of every error the ledger reports; ``reason`` and ``metadata`` (all strings) describe it."""


class InsufficientCredits(LedgerError, FailedPrecondition):
    """The tenant's available credits do not cover the hold; ``shortfall`` is what is missing."""

    def __init__(self, tenant_id: str, required: int, available: int) -> None:
        self.tenant_id = tenant_id
        self.required = required
        self.available = available
        self.shortfall = required - available
        super().__init__(
            f"tenant {tenant_id} needs {required} credits but has {available} available",
            reason="INSUFFICIENT_CREDITS",
            metadata={
                "tenant_id": tenant_id,
                "required": str(required),
                "available": str(available),
                "shortfall": str(self.shortfall),
            },
        )


class HoldNotFound(LedgerError, NotFound):
    """No hold has this id."""

    def __init__(self, hold_id: str) -> None:
        self.hold_id = hold_id
        super().__init__(f"hold {hold_id} does not exist", reason="HOLD_NOT_FOUND", metadata={"hold_id": hold_id})


class HoldAlreadyResolved(LedgerError, FailedPrecondition):
    """The hold was already committed, released or expired by another request; it resolves only once."""

    def __init__(self, hold_id: str, state: str) -> None:
        self.hold_id = hold_id
        self.state = str(state)
        super().__init__(
            f"hold {hold_id} is already {self.state}",
            reason="HOLD_ALREADY_RESOLVED",
            metadata={"hold_id": hold_id, "state": self.state},
        )


class IdempotencyMismatch(LedgerError, AlreadyExists):
    """The idempotency key (request id, hold id or event id) was used before for a different request."""

    def __init__(self, key_name: str, key: str, detail: str) -> None:
        self.key_name = key_name
        self.key = key
        super().__init__(
            f"{key_name} {key} was already used for a different request: {detail}",
            reason="IDEMPOTENCY_MISMATCH",
            metadata={"key_name": key_name, "key": key, "detail": detail},
        )


class InvalidLedgerArgument(LedgerError, InvalidArgument):
    """A request field is malformed (empty id, unknown class, bad page size ...)."""

    def __init__(self, field: str, description: str, *, reason: str = "INVALID_ARGUMENT") -> None:
        self.field = field
        super().__init__(
            f"{field}: {description}",
            reason=reason,
            metadata={"field": field},
            field_violations=[FieldViolation(field, description)],
        )


class InvalidAmount(InvalidLedgerArgument):
    """An amount (credits, emails, bytes, price, threshold) is negative, zero where it must be positive, or
    larger than allowed."""

    def __init__(self, field: str, value: int, description: str) -> None:
        self.value = value
        super().__init__(field, f"{description} (got {value})", reason="INVALID_AMOUNT")
        self.metadata["value"] = str(value)


class InvalidPageToken(InvalidLedgerArgument):
    """The page token was not issued by this method for this tenant."""

    def __init__(self) -> None:
        super().__init__("page_token", "not a page token of this listing", reason="INVALID_PAGE_TOKEN")
