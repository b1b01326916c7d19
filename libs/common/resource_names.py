"""What a client may send where the mesh expects a resource name, an id, a tag or a page token (AIP-122, AIP-158).

Every server checks these strings where the request enters it, before they reach a query: Postgres refuses a text
value holding NUL outright (which surfaced as INTERNAL), and no id, tag or token the mesh gives out holds a control
character or runs to thousands of characters, so such a value names nothing and is the caller's mistake. Each
check answers INVALID_ARGUMENT with a ``BadRequest`` field violation naming the request's field.
"""

from __future__ import annotations

import re

from libs.common.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_ID_CHARS",
    "MAX_PAGE_TOKEN_CHARS",
    "MAX_TEXT_CHARS",
    "checked_page_token",
    "checked_text",
    "resource_id",
]

MAX_ID_CHARS = 512
"""Longest id (one segment of a resource name). A suppression's id, ``{email}~{topic}``, is the longest the mesh
makes: an address of up to 320 characters and a topic."""
MAX_TEXT_CHARS = 1024
"""Longest filter value compared with stored text (a tag, a topic, a provider)."""
MAX_PAGE_TOKEN_CHARS = 4096
"""Longest page token: the mesh's tokens are an id or a small base64 document, far shorter."""

# C0 controls (tab and line breaks included), DEL, the C1 controls and the Unicode line and paragraph separators:
# none is ever part of an id the mesh makes, and NUL cannot even be stored in a Postgres text column.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NO_CONTROL = "no NUL or other control characters"


def checked_text(value: str, field: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` when it holds no control character and at most ``max_chars`` characters; INVALID_ARGUMENT naming
    ``field`` otherwise. For filter values and bare ids (a tag, a topic, an id given without its collection)."""
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is longer than {max_chars} characters", reason="INVALID_ARGUMENT",
                              field_violations=[FieldViolation(field, f"at most {max_chars} characters")])
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} holds a control character", reason="INVALID_ARGUMENT",
                              field_violations=[FieldViolation(field, _NO_CONTROL)])
    return value


def resource_id(name: str, collection: str, field: str, *, max_chars: int = MAX_ID_CHARS) -> str:
    """The id in ``{collection}/{id}`` (``collection`` may itself have several segments, as
    ``tenants/acme/apiKeys``); INVALID_ARGUMENT naming ``field`` for another shape, an empty id or one holding a
    ``/``, a control character or more than ``max_chars`` characters."""
    prefix = f"{collection}/"
    resource = name.removeprefix(prefix)
    if not name.startswith(prefix) or not resource or "/" in resource:
        shown = f"{collection}/{{id}}"
        raise InvalidArgument(f"{field} must look like {shown}", reason="INVALID_ARGUMENT",
                              field_violations=[FieldViolation(field, f"expected {shown}")])
    return checked_text(resource, field, max_chars=max_chars)


def checked_page_token(token: str, field: str = "page_token") -> str:
    """``token`` when it could be a page token the mesh gave out (no control character, at most
    ``MAX_PAGE_TOKEN_CHARS``); INVALID_ARGUMENT naming ``field`` otherwise. Whether it decodes is the listing's
    own check."""
    return checked_text(token, field, max_chars=MAX_PAGE_TOKEN_CHARS)
