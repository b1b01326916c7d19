"""Limits on an email's content that hold wherever the content comes from: a send request (ingest checks them at
accept) or a campaign's templates rendered per recipient (the expander checks the rendered result)."""

from __future__ import annotations

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_SUBJECT_CHARS",
]

MAX_SUBJECT_CHARS = 998
"""RFC 5322's line limit: a longer subject cannot be sent unfolded."""
MAX_BODY_BYTES = 5 * 1024 * 1024
"""Per body part (UTF-8): Postmark's cap, the strictest of the providers."""
