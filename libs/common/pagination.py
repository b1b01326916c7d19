"""Page sizes and page tokens of List RPCs, the same way in every service (AIP-158).

``page_size`` 0 (unset) means the listing's default, a size above its maximum is clamped to the maximum, and a
negative size is INVALID_ARGUMENT naming ``page_size``. A page token holding control characters, or too long to be
one the mesh gave out, is INVALID_ARGUMENT naming ``page_token`` before it reaches a query.
"""

from __future__ import annotations

from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.resource_names import checked_page_token

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "checked_page_token", "page_size"]

DEFAULT_PAGE_SIZE = 50
"""Items per page when the request leaves ``page_size`` at 0."""
MAX_PAGE_SIZE = 1000
"""The most items a page holds, unless a listing sets a smaller maximum."""


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE,
              field: str = "page_size") -> int:
    """The page size to use for ``requested``: ``default`` for 0, at most ``maximum``; INVALID_ARGUMENT naming
    ``field`` for a negative size."""
    if requested < 0:
        raise InvalidArgument(f"{field} must not be negative", reason="INVALID_PAGE_SIZE",
                              field_violations=[FieldViolation(field, "0 (the default) or more")])
    return min(requested or default, maximum)
