"""Which fields an Update RPC changes: its ``update_mask``, read the same way by every service (AIP-134).

- A mask names the fields to change, by their proto names; a field it names takes the request's value, even the
  default (that is how a field is cleared).
- ``*`` replaces every updatable field (a field left unset goes back to its default).
- No mask (or an empty one) changes the fields the request sets: for a field without presence, a value other than
  the default; for one with presence (``optional``, messages), a value given. A field cannot be cleared that way;
  it takes a mask naming it.
- A path that is no field of the resource, or a field the API documents as ``OUTPUT_ONLY``, ``IDENTIFIER`` or
  ``IMMUTABLE`` (``google.api.field_behavior``), is INVALID_ARGUMENT naming ``update_mask``; so is a nested path
  (``options.timeout_s``): maps and lists are replaced whole.
"""

from __future__ import annotations

from collections.abc import Collection

from google.api import field_behavior_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from libs.common.errors import FieldViolation, InvalidArgument

__all__ = ["FULL_REPLACEMENT", "update_paths"]

FULL_REPLACEMENT = "*"
"""The mask path that replaces every updatable field."""

_NOT_UPDATABLE = frozenset({field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER,
                            field_behavior_pb2.IMMUTABLE})


def _behaviours(field: FieldDescriptor) -> frozenset[int]:
    return frozenset(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def update_paths(mask: FieldMask, resource: Message, *, immutable: Collection[str] = (),
                 not_in_full_replacement: Collection[str] = (), field: str = "update_mask") -> tuple[str, ...]:
    """The top-level fields of ``resource`` an update with ``mask`` changes, in the order the resource declares
    them (see the module's docstring).

    Args:
        mask: the request's ``update_mask`` (empty when the client sent none).
        resource: the resource in the request, holding the new values.
        immutable: fields that cannot change although the proto does not mark them ``IMMUTABLE``.
        not_in_full_replacement: updatable fields ``*`` leaves alone; they change only when named (write-only
            secrets, which a client cannot read back to send again).
        field: the name of the mask field in the request, for the error.

    Raises:
        InvalidArgument: a path names no field, a nested field, or one that cannot change.
    """
    fields = resource.DESCRIPTOR.fields_by_name
    updatable = [name for name, f in fields.items()
                 if name not in immutable and not _behaviours(f) & _NOT_UPDATABLE]
    requested = list(dict.fromkeys(mask.paths))
    if not requested:
        given = {f.name for f, _value in resource.ListFields()}
        return tuple(name for name in updatable if name in given)
    if FULL_REPLACEMENT in requested:
        if requested != [FULL_REPLACEMENT]:
            raise InvalidArgument(f"{field}: '*' stands alone", reason="INVALID_UPDATE_MASK", field_violations=[
                FieldViolation(field, "'*' replaces every field and cannot be combined with other paths")])
        return tuple(name for name in updatable if name not in not_in_full_replacement)
    problems = []
    for path in requested:
        if path not in fields:
            problems.append(FieldViolation(field, f"{path!r} is not a field of {resource.DESCRIPTOR.name}"
                                           + (" (nested paths are not supported)" if "." in path else "")))
        elif path not in updatable:
            problems.append(FieldViolation(field, f"{path!r} cannot be changed (output only or immutable)"))
    if problems:
        raise InvalidArgument(f"{field} names fields that cannot be updated", reason="INVALID_UPDATE_MASK",
                              field_violations=problems)
    return tuple(name for name in updatable if name in requested)
