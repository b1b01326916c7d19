"""Pricing a hold from a price book: pure arithmetic, so it is tested without a database."""

from __future__ import annotations

from services.ledger.models import ATTACHMENT_BILLING_UNIT_BYTES, MessageClass, Price, PriceBook


def started_attachment_mib(attachment_bytes: int) -> int:
    """How many started MiB ``attachment_bytes`` is billed as (0 bytes -> 0, 1 byte -> 1, 1 MiB + 1 -> 2)."""
    return -(-attachment_bytes // ATTACHMENT_BILLING_UNIT_BYTES)


def unit_price(book: PriceBook, message_class: MessageClass) -> Price:
    """The unit prices of ``message_class`` in ``book`` (what a hold records)."""
    return Price(per_email=book.per_email(message_class), per_attachment_mb=book.per_attachment_mb)


def hold_amount(price: Price, emails: int, attachment_bytes: int) -> int:
    """Credits to hold for ``emails`` emails that each carry ``attachment_bytes`` of attachments."""
    return emails * (price.per_email + started_attachment_mib(attachment_bytes) * price.per_attachment_mb)
