"""Checks of the arguments every ledger operation takes, and the bounds they enforce."""

from __future__ import annotations

from services.ledger.errors import InvalidAmount, InvalidLedgerArgument
from services.ledger.models import MessageClass

MAX_ID_LENGTH = 200
# Bounds that keep every amount the ledger computes or stores inside a Postgres bigint.
MAX_EMAILS_PER_HOLD = 10_000_000
MAX_ATTACHMENT_BYTES = 2**40
MAX_UNIT_PRICE = 10**9
MAX_TOP_UP = 10**15


def require_id(name: str, value: str) -> None:
    """Raise :class:`InvalidLedgerArgument` unless ``value`` is a non-empty string of at most ``MAX_ID_LENGTH``."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidLedgerArgument(name, f"must be a non-empty string of at most {MAX_ID_LENGTH} characters")


def require_positive(name: str, value: int, maximum: int) -> None:
    """Raise :class:`InvalidAmount` unless ``value`` is an integer in [1, ``maximum``]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise InvalidAmount(name, value, f"must be an integer in [1, {maximum}]")


def require_price(name: str, value: int) -> None:
    """Raise :class:`InvalidAmount` unless ``value`` is a unit price: an integer in [0, ``MAX_UNIT_PRICE``]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UNIT_PRICE:
        raise InvalidAmount(name, value, f"must be an integer in [0, {MAX_UNIT_PRICE}]")


def parse_message_class(value: MessageClass | str) -> MessageClass:
    """The class named ``value``; :class:`InvalidLedgerArgument` naming the choices for anything else."""
    try:
        return MessageClass.parse(value)
    except ValueError as exc:
        raise InvalidLedgerArgument("message_class", str(exc)) from None
