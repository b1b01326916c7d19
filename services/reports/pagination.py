"""Opaque page tokens (AIP-158) carrying a keyset cursor.

A token is the URL-safe base64 of a small JSON document: the cursor (the sort key of the last item returned)
and a fingerprint of the listing's other parameters. A token presented with different parameters (another
filter or tenant) is refused, as AIP-158 asks. Tokens are not secret: every query is still restricted to the
caller's tenant, so a crafted token can only move a cursor within the caller's own data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from libs.common.errors import FieldViolation, InvalidArgument
from services.reports.models import Page

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Cursor = list[str]
T = TypeVar("T")


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The page size to use: ``default`` for 0, capped at ``maximum``; negative sizes are refused."""
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            field_violations=[FieldViolation("page_size", "must be >= 0")],
        )
    return min(requested or default, maximum)


def _fingerprint(parameters: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(parameters).encode()).hexdigest()[:16]


def encode_page_token(cursor: Cursor, parameters: Sequence[str]) -> str:
    """A token resuming after ``cursor`` for a listing with these ``parameters``."""
    document = json.dumps({"c": cursor, "p": _fingerprint(parameters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")


def page_of(rows: Sequence[Any], size: int, item: Callable[[Any], T], cursor_of: Callable[[T], Cursor],
            parameters: Sequence[str]) -> Page[T]:
    """The page of the first ``size`` rows (the query asked for one more, to learn whether a next page exists);
    its token resumes after the last item's ``cursor_of``."""
    items = tuple(item(row) for row in rows[:size])
    token = encode_page_token(cursor_of(items[-1]), parameters) if len(rows) > size else ""
    return Page(items, token)


def decode_page_token(token: str, parameters: Sequence[str], cursor_length: int) -> Cursor | None:
    """The cursor in ``token`` (None for the empty token, i.e. the first page).

    Raises:
        InvalidArgument: the token is malformed or was issued for other parameters.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        document = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = document["c"]
        fingerprint = document["p"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise _bad_token("page_token is malformed") from exc
    if not (isinstance(cursor, list) and len(cursor) == cursor_length and all(isinstance(v, str) for v in cursor)):
        raise _bad_token("page_token is malformed")
    if fingerprint != _fingerprint(parameters):
        raise _bad_token("page_token was issued for a different request (filters must not change between pages)")
    return cursor


def _bad_token(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_PAGE_TOKEN",
                           field_violations=[FieldViolation("page_token", message)])
