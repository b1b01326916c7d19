"""JSON decoding with a nesting limit, for everything the gateway reads from a client.

Python's decoder recurses once per level: a body of a few hundred kilobytes of ``[`` raises RecursionError, and
protobuf's ``ParseDict`` recurses further on whatever the decoder let through. Neither is a gateway failure: it is
a bad request. Decoding refuses values nested deeper than ``MAX_JSON_DEPTH`` with :class:`JsonTooDeep`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JsonTooDeep", "loads"]

MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects read. The contracts' deepest message (a request holding a message
holding a map of values) is under ten levels; 64 leaves room for any value a client puts in free-form fields and
stays far under protobuf's own JSON limit (100) and the interpreter's recursion limit."""


class JsonTooDeep(ValueError):
    """A JSON value nested deeper than the limit."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels")
        self.max_depth = max_depth


def loads(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)``, refusing a value nested deeper than ``max_depth`` levels (an array or object is one
    level; its members one more) with :class:`JsonTooDeep`; other errors as ``json.loads`` raises them."""
    try:
        value = json.loads(data)
    except RecursionError as exc:
        raise JsonTooDeep(max_depth) from exc
    # Fewer brackets than levels allowed cannot nest too deep: most bodies skip the walk.
    brackets = data.count(b"[") + data.count(b"{") if isinstance(data, bytes) else data.count("[") + data.count("{")
    if brackets > max_depth and _deeper_than(value, max_depth):
        raise JsonTooDeep(max_depth)
    return value


def _deeper_than(value: Any, max_depth: int) -> bool:
    """Whether ``value`` (as decoded) nests arrays and objects deeper than ``max_depth``; walked with a stack of
    its own, since recursing is what must not happen here."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            return True
        members = container.values() if isinstance(container, dict) else container
        stack.extend((member, depth + 1) for member in members if isinstance(member, dict | list))
    return False
