"""An OpenAPI 3.0 document generated from the same descriptors the transcoder serves.

Choices (see docs/REST.md):

- OpenAPI 3.0.3 rather than protoc-gen-openapiv2's Swagger 2.0: current tooling prefers it, and it can state
  NDJSON request bodies for client-streaming RPCs;
- a path variable with a sub-template is spelled out, its wildcards becoming named parameters:
  ``/v1/{name=tenants/*/apiKeys/*}:revoke`` is documented as ``/v1/tenants/{tenant}/apiKeys/{apiKey}:revoke``
  (OpenAPI path parameters cannot contain ``/``), which is the URL the transcoder matches;
- schemas follow the proto3 JSON mapping (camelCase names, int64 as strings, enums as names, well-known types
  in their JSON forms), one component per message or enum named by its full proto name;
- descriptions come from the proto comments kept in the descriptor set's source info;
- ``google.api.field_behavior`` becomes ``required``, ``readOnly`` (OUTPUT_ONLY) or ``writeOnly``
  (INPUT_ONLY);
- a client-streaming RPC with a plain body (``plain_bodies``) lists it beside NDJSON (``text/csv``,
  ``application/octet-stream``, ``multipart/form-data``...), so generators that cannot stream NDJSON
  (openapi-python-client skips an operation whose every body type is unknown to it) still make an operation;
- a server-streaming ``google.api.HttpBody`` RPC (a CSV export) answers raw bytes of the type its first message
  names, which descriptors cannot tell. Our exports are documented as ``text/csv`` (``STREAMED_MEDIA_TYPES``, the
  type their contracts promise) so that readers and generators see a concrete download; any other such RPC as
  ``*/*`` with a description saying where the type comes from, which stays true for any descriptor set;
- only RPCs the upstream answers are documented, the ones the transcoder routes. The gateway's upstream is ingest,
  the public edge, and the contracts annotate mesh-internal RPCs too (the credit holds), which the edge does not
  expose: a route for them could only ever fail. The edge's own table (``libs.common.public_edge.EDGE_METHODS``)
  decides, so the document, the routes and the edge cannot drift apart; a descriptor set without any service the
  edge fronts (a test's) is documented whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor

from services.gateway.descriptors import DescriptorSet, HttpBinding
from services.gateway.fields import is_map
from services.gateway.path_template import SegmentKind
from services.gateway.plain_bodies import PlainBody, plain_bodies
from services.gateway.transcoder import served_by_the_edge, serves_streamed_body

OPENAPI_VERSION = "3.0.3"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
_STATUS_SCHEMA = "google.rpc.Status"
_ANY_SCHEMA = "google.protobuf.Any"
_MAX_QUERY_DEPTH = 4
STREAMED_MEDIA_TYPES: dict[str, str] = {
    "esp.v1.EventService.ExportEvents": "text/csv",
    "esp.v1.StatsService.ExportStats": "text/csv",
}
"""The media type each server-streaming HttpBody RPC of ours sends (its contract says CSV)."""
_STREAMED_NOTE = (
    "The body is streamed (chunked) as it is produced, of any size. Its Content-Type is the one the first "
    "message of the stream names. An error before the first byte is a google.rpc.Status with its HTTP status; "
    "an error after it cuts the response off without its final chunk, so an incomplete download is never taken "
    "for a whole one."
)

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # 64-bit integers travel as JSON strings (proto3 JSON mapping), like protoc-gen-openapiv2 documents them.
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "description": "Seconds with up to 9 fractional digits, e.g. 1.5s",
    },
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.DoubleValue": {"type": "number", "format": "double", "nullable": True},
    "google.protobuf.FloatValue": {"type": "number", "format": "float", "nullable": True},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int64", "nullable": True},
    "google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    "google.protobuf.StringValue": {"type": "string", "nullable": True},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}
# Field types a URL can carry (see fields.py): scalars, enums and the text-form well-known types.
_URL_MESSAGES = frozenset(
    name
    for name in _WELL_KNOWN
    if name
    not in (
        "google.protobuf.Empty",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
    )
)


class OpenApiError(ValueError):
    """The bindings cannot be documented (two RPCs claim the same path and method)."""


def build_openapi(
    descriptors: DescriptorSet,
    *,
    title: str = "ESP mesh API",
    version: str = "v1",
    description: str = "",
    server_url: str | None = None,
    served: Callable[[MethodDescriptor], bool] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.0 document of every HTTP binding the transcoder serves and the upstream answers.

    ``served`` says which RPCs the upstream answers; by default the public edge's (``served_by_the_edge``).
    """
    is_served = served if served is not None else served_by_the_edge(descriptors)
    schemas = _Schemas(descriptors)
    plain = plain_bodies(descriptors)
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, dict[str, Any]] = {}
    for binding in descriptors.bindings:
        if binding.server_streaming and not serves_streamed_body(binding):
            continue  # not served over HTTP (see Transcoder)
        if not is_served(binding.method):
            continue  # the upstream answers UNIMPLEMENTED: a route no client can use
        path, path_parameters = _openapi_path(binding)
        operation = _operation(binding, path_parameters, schemas, descriptors, plain.get(binding.method.full_name))
        item = paths.setdefault(path, {})
        verb = binding.http_method.lower()
        if verb in item:
            raise OpenApiError(
                f"{path} {binding.http_method} is bound by {item[verb]['operationId']} and "
                f"{operation['operationId']}"
            )
        item[verb] = operation
        service = binding.method.containing_service
        tags.setdefault(
            service.name, _with_description({"name": service.name}, descriptors.comment(service.full_name))
        )
    schemas.status_ref()  # registers google.rpc.Status even when no RPC is bound
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": _with_description({"title": title, "version": version}, description),
        "tags": list(tags.values()),
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An ESP API key."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def operation_id(binding: HttpBinding) -> str:
    """``Service_Method``, with ``2``, ``3``... for additional bindings (protoc-gen-openapiv2's naming)."""
    base = f"{binding.method.containing_service.name}_{binding.method.name}"
    return base if binding.binding_index == 0 else f"{base}{binding.binding_index + 1}"


def _operation(
    binding: HttpBinding,
    path_parameters: list[dict[str, Any]],
    schemas: _Schemas,
    descriptors: DescriptorSet,
    plain: PlainBody | None = None,
) -> dict[str, Any]:
    method = binding.method
    comment = descriptors.comment(method.full_name)
    operation: dict[str, Any] = {
        "operationId": operation_id(binding),
        "tags": [method.containing_service.name],
    }
    if comment:
        operation["summary"] = comment.split("\n", 1)[0]
        operation["description"] = comment
    parameters = list(path_parameters)
    if binding.body != "*":
        excluded = [variable.field_path for variable in binding.template.variables]
        if binding.body:
            excluded.append((binding.body,))
        parameters.extend(_query_parameters(method.input_type, excluded, schemas, descriptors))
    if plain is not None and plain.query_message is not None:
        for parameter in _query_parameters(plain.query_message, [], schemas, descriptors):
            doc = parameter.get("description", "")
            parameter["description"] = f"{doc}\n\n{plain.query_note}" if doc else plain.query_note
            parameters.append(parameter)
    if parameters:
        operation["parameters"] = parameters
    if binding.body:
        operation["requestBody"] = _request_body(binding, schemas, plain)
    if binding.server_streaming:
        success = _streamed_response(binding)
    else:
        success = {
            "description": "A successful response.",
            "content": {"application/json": {"schema": _response_schema(binding, schemas)}},
        }
    operation["responses"] = {
        "200": success,
        "default": {
            "description": "An error: a google.rpc.Status with its details.",
            "content": {"application/json": {"schema": schemas.status_ref()}},
        },
    }
    return operation


def _streamed_response(binding: HttpBinding) -> dict[str, Any]:
    """The 200 response of a server-streaming HttpBody RPC: raw bytes, streamed."""
    media_type = STREAMED_MEDIA_TYPES.get(binding.method.full_name, "*/*")
    return {
        "description": _STREAMED_NOTE,
        "headers": {
            "Content-Disposition": {
                "description": "`attachment; filename=...` when the service names the download.",
                "schema": {"type": "string"},
            }
        },
        "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
    }


def _request_body(binding: HttpBinding, schemas: _Schemas, plain: PlainBody | None = None) -> dict[str, Any]:
    request_type = binding.method.input_type
    if binding.body == "*":
        # Fields already bound by the path are not repeated in the body.
        path_fields = {
            variable.field_path[0] for variable in binding.template.variables if len(variable.field_path) == 1
        }
        if path_fields:
            schema = schemas.message_schema(request_type, omit=path_fields)
        else:
            schema = schemas.message_ref(request_type)
    else:
        schema = schemas.field_schema(request_type.fields_by_name[binding.body])
    if binding.client_streaming:
        description = (
            f"A stream of {request_type.full_name} messages, one JSON object per line "
            "(newline-delimited JSON), forwarded as they arrive."
        )
        if plain is None:
            return {"required": True, "description": description, "content": {NDJSON_MEDIA_TYPE: {"schema": schema}}}
        return {
            "required": True,
            "description": f"{description}\n\n{plain.description}",
            "content": plain.media_types(schema),
        }
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _response_schema(binding: HttpBinding, schemas: _Schemas) -> dict[str, Any]:
    output = binding.method.output_type
    if binding.response_body:
        return schemas.field_schema(output.fields_by_name[binding.response_body])
    return schemas.message_ref(output)


def _openapi_path(binding: HttpBinding) -> tuple[str, list[dict[str, Any]]]:
    """The documented path and its parameters; each wildcard of a variable becomes one named parameter."""
    template = binding.template
    starts = {variable.start: variable for variable in template.variables}
    pieces: list[str] = []
    parameters: list[dict[str, Any]] = []
    used: set[str] = set()
    index = 0
    while index < len(template.segments):
        variable = starts.get(index)
        if variable is None:
            pieces.append(_segment_text(template.segments[index].literal, template.segments[index].kind))
            index += 1
            continue
        field = _json_path(binding.method.input_type, variable.field_path)
        span = template.segments[variable.start : variable.end]
        shape = "/".join(
            segment.literal if segment.kind is SegmentKind.LITERAL else segment.kind.value for segment in span
        )
        previous_literal = ""
        for segment in span:
            if segment.kind is SegmentKind.LITERAL:
                pieces.append(segment.literal)
                previous_literal = segment.literal
                continue
            name = _unique(_parameter_name(previous_literal, field), used)
            pieces.append("{" + name + "}")
            note = f"Part of `{field}`, which the path sets to `{shape}`."
            if segment.kind is SegmentKind.MULTI:
                note += " May contain `/`."
            if len(span) == 1:
                note = f"The `{field}` field."
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": note,
                }
            )
        index = variable.end
    path = "/" + "/".join(pieces)
    if template.verb:
        path += ":" + template.verb
    return path, parameters


def _segment_text(literal: str, kind: SegmentKind) -> str:
    # A bare wildcard outside any variable binds no field, so it has no parameter name: it keeps its
    # template spelling (no annotation in our contracts uses one).
    return literal if kind is SegmentKind.LITERAL else kind.value


def _parameter_name(previous_literal: str, field: str) -> str:
    if not previous_literal:
        return field
    if previous_literal.endswith("ies"):
        return previous_literal[:-3] + "y"
    if previous_literal.endswith("s") and not previous_literal.endswith("ss"):
        return previous_literal[:-1]
    return previous_literal + "Id"


def _unique(name: str, used: set[str]) -> str:
    candidate, counter = name, 2
    while candidate in used:
        candidate, counter = f"{name}{counter}", counter + 1
    used.add(candidate)
    return candidate


def _json_path(message: Descriptor, field_path: Sequence[str]) -> str:
    names: list[str] = []
    current: Descriptor | None = message
    for name in field_path:
        assert current is not None  # validated when the descriptor set was loaded
        field = current.fields_by_name[name]
        names.append(field.json_name)
        current = field.message_type
    return ".".join(names)


def _query_parameters(
    message: Descriptor,
    excluded: Sequence[tuple[str, ...]],
    schemas: _Schemas,
    descriptors: DescriptorSet,
) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []

    def visit(
        current: Descriptor, proto_prefix: tuple[str, ...], json_prefix: str, seen: tuple[str, ...]
    ) -> None:
        for field in current.fields:
            proto_path = (*proto_prefix, field.name)
            if any(proto_path[: len(prefix)] == prefix for prefix in excluded) or is_map(field):
                continue
            name = f"{json_prefix}{field.json_name}"
            nested = field.message_type
            repeated = field.is_repeated
            if nested is not None and nested.full_name not in _URL_MESSAGES:
                if repeated or nested.full_name in seen or len(seen) >= _MAX_QUERY_DEPTH:
                    continue  # not addressable from a query string (or a recursive type)
                visit(nested, proto_path, f"{name}.", (*seen, nested.full_name))
                continue
            schema = schemas.field_schema(field, with_docs=False)
            parameter: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
            if repeated:
                parameter.update(style="form", explode=True)
            doc = descriptors.comment(f"{current.full_name}.{field.name}")
            if doc:
                parameter["description"] = doc
            parameters.append(parameter)

    visit(message, (), "", (message.full_name,))
    return parameters


def _with_description(value: dict[str, Any], description: str) -> dict[str, Any]:
    if description:
        value["description"] = description
    return value


class _Schemas:
    """Builds component schemas on demand (one per message and enum reached from an operation)."""

    def __init__(self, descriptors: DescriptorSet) -> None:
        self._descriptors = descriptors
        self.components: dict[str, dict[str, Any]] = {}

    def status_ref(self) -> dict[str, Any]:
        """A reference to the google.rpc.Status schema, registered on first use."""
        if _STATUS_SCHEMA not in self.components:
            try:
                status = self._descriptors.pool.FindMessageTypeByName(_STATUS_SCHEMA)
            except KeyError:
                status = None
            if status is not None:
                return self.message_ref(status)
            self.components[_STATUS_SCHEMA] = {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "format": "int32"},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": self._any_ref()},
                },
            }
        return _ref(_STATUS_SCHEMA)

    def message_ref(self, message: Descriptor) -> dict[str, Any]:
        """A schema for a message: a reference to its component, or the inline form of a well-known type."""
        if message.full_name == _ANY_SCHEMA:
            return self._any_ref()
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder first: messages may refer to themselves
            self.components[message.full_name] = self.message_schema(message)
        return _ref(message.full_name)

    def message_schema(
        self, message: Descriptor, omit: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, Any]:
        """The object schema of a message (``omit``: top-level proto field names to leave out)."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.fields:
            if field.name in omit:
                continue
            properties[field.json_name] = self.field_schema(field)
            if field_behavior_pb2.REQUIRED in _behaviors(field):
                required.append(field.json_name)
        schema: dict[str, Any] = {"type": "object"}
        _with_description(schema, self._descriptors.comment(message.full_name))
        if properties:
            schema["properties"] = properties
        if required:
            schema["required"] = required
        return schema

    def field_schema(self, field: FieldDescriptor, *, with_docs: bool = True) -> dict[str, Any]:
        """The schema of one field's JSON value."""
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self._single(value_field)}
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        if not with_docs:
            return schema
        extras: dict[str, Any] = {}
        comment = self._descriptors.comment(f"{field.containing_type.full_name}.{field.name}")
        if comment:
            extras["description"] = comment
        behaviors = _behaviors(field)
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            extras["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            extras["writeOnly"] = True
        if not extras:
            return schema
        if "$ref" in schema:
            # OpenAPI 3.0 ignores siblings of $ref, so annotations go beside an allOf wrapper.
            return {"allOf": [schema], **extras}
        return {**schema, **extras}

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message_ref(field.message_type)
        if field.enum_type is not None:
            return self._enum_ref(field.enum_type)
        return dict(_SCALARS[field.type])

    def _enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        if enum.full_name not in self.components:
            lines = [self._descriptors.comment(enum.full_name)]
            for value in enum.values:
                doc = self._descriptors.comment(f"{enum.full_name}.{value.name}")
                lines.append(f"- {value.name}: {doc}" if doc else f"- {value.name}")
            self.components[enum.full_name] = {
                "type": "string",
                "enum": [value.name for value in enum.values],
                "default": enum.values[0].name,
                "description": "\n".join(line for line in lines if line),
            }
        return _ref(enum.full_name)

    def _any_ref(self) -> dict[str, Any]:
        self.components.setdefault(
            _ANY_SCHEMA,
            {
                "type": "object",
                "description": "A message of any type: `@type` names it, its fields follow.",
                "properties": {"@type": {"type": "string"}},
                "additionalProperties": {},
            },
        )
        return _ref(_ANY_SCHEMA)


def _behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}
