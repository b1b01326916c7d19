"""Opaque page tokens (AIP-158) carrying a keyset cursor.

A token is the URL-safe base64 of a small JSON document: the cursor (the sort key of the last item returned)
and a fingerprint of the listing's other parameters. A token presented with different parameters (another
filter or tenant) is refused, as AIP-158 asks. Tokens are not secret: every query is still restricted to the
caller's tenant, so a crafted token can only move a cursor within the caller's own data. Its fingerprint can be
forged too, so every cursor value is checked before it reaches a query as strictly as the request's own fields
(``libs.common.resource_names``): text Postgres can store (no NUL, no other control character, no lone surrogate
JSON can spell as ``\\ud800``), and a timestamp where the listing's cursor holds one. Anything else is
INVALID_ARGUMENT naming ``page_token``, never a database error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from libs.common.errors import FieldViolation, InvalidArgument
from libs.common.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_size
from libs.common.resource_names import MAX_PAGE_TOKEN_CHARS, checked_text
from services.reports.models import Page

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Cursor", "decode_page_token", "encode_page_token", "page_of",
           "page_size"]

Cursor = list[str]
T = TypeVar("T")


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


def decode_page_token(token: str, parameters: Sequence[str], cursor_length: int, *,
                      times: Collection[int] = ()) -> Cursor | None:
    """The cursor in ``token`` (None for the empty token, i.e. the first page): ``cursor_length`` strings, those at
    the positions ``times`` timestamps (returned in their UTC ISO 8601 form, which Python and Postgres both read).

    Raises:
        InvalidArgument: the token is malformed (a cursor value Postgres could not take included) or was issued for
            other parameters.
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
    if not (isinstance(cursor, list) and len(cursor) == cursor_length and all(_is_text(v) for v in cursor)):
        raise _bad_token("page_token is malformed")
    if fingerprint != _fingerprint(parameters):
        raise _bad_token("page_token was issued for a different request (filters must not change between pages)")
    return [_time(value) if index in times else value for index, value in enumerate(cursor)]


def _is_text(value: object) -> bool:
    """Whether ``value`` is a string a query may compare with stored text."""
    if not isinstance(value, str):
        return False
    try:
        checked_text(value, "page_token", max_chars=MAX_PAGE_TOKEN_CHARS)
        value.encode()  # a lone surrogate ("\ud800" in the JSON) is no UTF-8 and fails in the driver
    except (InvalidArgument, UnicodeEncodeError):
        return False
    return True


def _time(value: str) -> str:
    """The cursor's timestamp in UTC ISO 8601; INVALID_ARGUMENT when ``value`` is none (the listings give out
    offset-aware ones)."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("no UTC offset")
        return parsed.astimezone(UTC).isoformat()
    except (ValueError, OverflowError) as exc:
        raise _bad_token("page_token is malformed") from exc


def _bad_token(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_PAGE_TOKEN",
                           field_violations=[FieldViolation("page_token", message)])
