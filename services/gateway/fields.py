"""Setting request fields from URL text (path variables and query parameters), the way grpc-gateway does.

Rules (grpc-gateway ``runtime.PopulateQueryParameters`` / ``PopulateFieldFromPath``):

- a key is a dotted field path; each name may be the proto name (``page_size``) or the JSON name
  (``pageSize``); ``labels[key]=value`` sets one entry of a map field;
- unknown names are ignored (forward compatibility), but walking *through* a repeated, map or scalar field
  is an error;
- repeated fields take every value of the key (``?tags=a&tags=b``); a singular field given twice is an error;
- scalars parse like Go's ``strconv`` (bools accept 1/t/true/...), int64 ranges are enforced, bytes are base64
  (standard or URL-safe), enums take a value name or a number that names a value;
- well-known message types parse from their JSON text form: Timestamp (RFC 3339), Duration (``1.5s``),
  FieldMask (comma-separated paths) and the scalar wrappers. Other message types cannot come from a URL.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message


class FieldValueError(ValueError):
    """A URL value does not fit its field (reported to the client as INVALID_ARGUMENT)."""


_KEY = re.compile(r"^(?P<path>[^\[\]]+)(?:\[(?P<map_key>[^\]]*)\])?$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_FLOAT = re.compile(
    r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)$", re.IGNORECASE
)
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")

_INT_RANGES: Mapping[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_WRAPPERS = frozenset(
    {
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)


def find_field(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by proto name or JSON name (both spellings are accepted, as grpc-gateway does)."""
    by_proto = message.fields_by_name.get(name)
    if by_proto is not None:
        return by_proto
    return next((candidate for candidate in message.fields if candidate.json_name == name), None)


def is_map(field: FieldDescriptor) -> bool:
    """Whether a field is a ``map<K, V>`` (a repeated synthetic entry message)."""
    return field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry


def set_path_variable(message: Message, dotted_path: str, value: str) -> None:
    """Bind a path variable (``provider.name``) onto the request, creating intermediate messages."""
    fields = _walk(message.DESCRIPTOR, dotted_path.split("."), dotted_path)
    if fields is None:
        raise FieldValueError(f"missing parameter {dotted_path}")
    _assign(message, fields, None, [value], dotted_path)


def populate_query_parameters(
    message: Message, params: Iterable[tuple[str, str]], excluded: Sequence[tuple[str, ...]]
) -> None:
    """Set fields from query parameters, skipping any under ``excluded`` proto paths (path variables and
    the body field, which the query must not override)."""
    grouped: dict[str, list[str]] = {}
    for key, value in params:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        parsed = _KEY.match(key)
        if parsed is None:
            raise FieldValueError(f"invalid query parameter name {key!r}")
        fields = _walk(message.DESCRIPTOR, parsed["path"].split("."), key)
        if fields is None:
            continue  # unknown names are ignored, as grpc-gateway does
        proto_path = tuple(field.name for field in fields)
        if any(proto_path[: len(prefix)] == prefix for prefix in excluded):
            continue
        _assign(message, fields, parsed["map_key"], values, key)


def _walk(descriptor: Descriptor, names: Sequence[str], key: str) -> list[FieldDescriptor] | None:
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for depth, name in enumerate(names):
        if current is None:
            raise FieldValueError(f"invalid path {key!r}: {'.'.join(names[:depth])} is not a message")
        field = find_field(current, name)
        if field is None:
            return None
        fields.append(field)
        if depth < len(names) - 1:
            if field.message_type is None or field.is_repeated:
                raise FieldValueError(f"invalid path {key!r}: {field.name} is not a singular message")
            if field.message_type.full_name.startswith("google.protobuf."):
                raise FieldValueError(f"invalid path {key!r}: {field.name} cannot be addressed into")
            current = field.message_type
    return fields


def _assign(
    message: Message, fields: Sequence[FieldDescriptor], map_key: str | None, values: Sequence[str], key: str
) -> None:
    target = message
    for field in fields[:-1]:
        target = getattr(target, field.name)
    leaf = fields[-1]
    try:
        if is_map(leaf):
            if map_key is None:
                raise FieldValueError(f"map field {key!r} needs a key: {leaf.name}[key]=value")
            if len(values) != 1:
                raise FieldValueError(f"too many values for map entry {key!r}")
            entry = leaf.message_type
            parsed_key = _parse_scalar(entry.fields_by_name["key"], map_key)
            value_field = entry.fields_by_name["value"]
            container = getattr(target, leaf.name)
            if value_field.message_type is not None:
                _set_message_from_text(container[parsed_key], values[0])
            else:
                container[parsed_key] = _parse_scalar(value_field, values[0])
            return
        if map_key is not None:
            raise FieldValueError(f"{leaf.name} is not a map field")
        if leaf.is_repeated:
            container = getattr(target, leaf.name)
            for value in values:
                if leaf.message_type is not None:
                    _set_message_from_text(container.add(), value)
                else:
                    container.append(_parse_scalar(leaf, value))
            return
        if len(values) != 1:
            raise FieldValueError(f"too many values for field {key!r}: {', '.join(values)}")
        if leaf.message_type is not None:
            _set_message_from_text(getattr(target, leaf.name), values[0])
        else:
            setattr(target, leaf.name, _parse_scalar(leaf, values[0]))
    except FieldValueError as exc:
        raise FieldValueError(f"type mismatch, parameter: {key}, error: {exc}") from exc


def _parse_scalar(field: FieldDescriptor, text: str) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text
    if kind == FieldDescriptor.TYPE_BOOL:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise FieldValueError(f"{text!r} is not a bool")
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        if not _INTEGER.match(text):
            raise FieldValueError(f"{text!r} is not an integer")
        number = int(text)
        if not low <= number <= high:
            raise FieldValueError(f"{text} is out of range")
        return number
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if not _FLOAT.match(text):
            raise FieldValueError(f"{text!r} is not a number")
        real = float(text)
        if kind == FieldDescriptor.TYPE_FLOAT and math.isfinite(real) and abs(real) > 3.4028234663852886e38:
            raise FieldValueError(f"{text} is out of range")
        return real
    if kind == FieldDescriptor.TYPE_BYTES:
        return _decode_base64(text)
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        named = enum.values_by_name.get(text)
        if named is not None:
            return named.number
        if _INTEGER.match(text) and int(text) in enum.values_by_number:
            return int(text)
        raise FieldValueError(f"{text} is not a valid {enum.full_name}")
    raise FieldValueError(f"unsupported field type {kind}")


def _decode_base64(text: str) -> bytes:
    padded = (text + "=" * (-len(text) % 4)).encode("ascii", errors="replace")
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error:
        pass
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise FieldValueError(f"{text!r} is not base64") from exc


def _set_message_from_text(target: Message, text: str) -> None:
    name = target.DESCRIPTOR.full_name
    try:
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            target.FromJsonString(text)  # well-known-type mixin
            return
    except ValueError as exc:
        raise FieldValueError(str(exc)) from exc
    if name == "google.protobuf.FieldMask":
        # grpc-gateway takes comma-separated paths and replaces any mask already set (e.g. one derived from a
        # PATCH body); camelCase paths are turned into proto (snake_case) paths.
        del target.paths[:]
        target.paths.extend(_snake_path(path) for path in text.split(",") if path)
        return
    if name in _WRAPPERS:
        target.value = _parse_scalar(target.DESCRIPTOR.fields_by_name["value"], text)
        return
    raise FieldValueError(f"{name} cannot be set from a URL")


def _snake_path(path: str) -> str:
    if "_" in path:
        return path
    return ".".join(_CAMEL_BOUNDARY.sub("_", part).lower() for part in path.split("."))


def field_mask_from_body(body: Any, descriptor: Descriptor) -> list[str]:
    """The field paths a PATCH body sets: every leaf key, recursing into nested message objects.

    This is grpc-gateway's ``FieldMaskFromRequestBody``: when a PATCH request has an ``update_mask`` and the
    client did not send one, the mask is derived from the fields present in the JSON body.
    """
    paths: list[str] = []

    def visit(value: Any, current: Descriptor, prefix: str) -> None:
        for key, child in value.items():
            field = find_field(current, key)
            if field is None:
                continue
            path = f"{prefix}{field.name}"
            nested = field.message_type
            if (
                isinstance(child, dict)
                and child
                and nested is not None
                and not field.is_repeated
                and not nested.full_name.startswith("google.protobuf.")
            ):
                visit(child, nested, f"{path}.")
            else:
                paths.append(path)

    if isinstance(body, dict):
        visit(body, descriptor, "")
    return paths
