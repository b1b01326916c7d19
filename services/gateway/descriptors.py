"""The contracts as the gateway sees them: a FileDescriptorSet loaded into a private pool, plus every
`google.api.http` binding found on its methods.

The transcoder and the OpenAPI generator both read this one model, so the REST surface and its documentation
cannot drift apart. A private descriptor pool (rather than the generated ``*_pb2`` modules) keeps the gateway
generic: any descriptor set built with ``buf build`` (imports included) can be served without code changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Imported for their side effect: registering the google.api.http and google.api.field_behavior extensions
# so that parsing a FileDescriptorSet decodes those options instead of keeping them as unknown bytes.
from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from services.gateway.path_template import PathTemplate, PathTemplateError, parse_path_template

_ = field_behavior_pb2  # keep the registration import visible to linters


class DescriptorError(ValueError):
    """The descriptor set cannot be served (unreadable, or an http rule that does not fit its method)."""


@dataclass(frozen=True)
class HttpBinding:
    """One HTTP rule of one RPC: the primary rule or one of its ``additional_bindings``."""

    method: MethodDescriptor
    http_method: str
    """Upper-case HTTP method (``custom`` rules keep their kind as written)."""
    template: PathTemplate
    body: str
    """``""`` (no body), ``"*"`` (the whole request) or the name of one top-level request field."""
    response_body: str
    """``""`` for the whole response, else the name of the response field written as the body."""
    binding_index: int
    """0 for the primary rule, 1.. for additional bindings in declaration order."""

    @property
    def service_name(self) -> str:
        """Fully-qualified service name, e.g. ``esp.v1.MessageService``."""
        name: str = self.method.containing_service.full_name
        return name

    @property
    def grpc_path(self) -> str:
        """The HTTP/2 path of the RPC, e.g. ``/esp.v1.MessageService/SendEmail``."""
        return f"/{self.service_name}/{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        """Whether the request side is a stream (sent as newline-delimited JSON)."""
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        """Whether the response side is a stream."""
        return bool(self.method.server_streaming)


@dataclass(frozen=True)
class DescriptorSet:
    """A descriptor pool built from one FileDescriptorSet, with its HTTP bindings and source comments."""

    pool: descriptor_pool.DescriptorPool
    files: tuple[descriptor_pb2.FileDescriptorProto, ...]
    bindings: tuple[HttpBinding, ...]
    comments: Mapping[str, str] = field(default_factory=dict)
    """Leading comments by element: message/enum/service full name, ``Message.field``, ``Service.Method``,
    ``Enum.VALUE``."""

    def message_class(self, descriptor: Descriptor) -> type[Message]:
        """The (cached) dynamic message class for a descriptor of this pool."""
        message_class: type[Message] = message_factory.GetMessageClass(descriptor)
        return message_class

    def comment(self, key: str) -> str:
        """The leading comment of an element (see ``comments``), or ``""``."""
        return self.comments.get(key, "")

    @property
    def annotated_methods(self) -> tuple[MethodDescriptor, ...]:
        """Every RPC with at least one HTTP binding, in declaration order."""
        seen: dict[str, MethodDescriptor] = {}
        for binding in self.bindings:
            seen.setdefault(binding.method.full_name, binding.method)
        return tuple(seen.values())


def load_descriptor_set(source: str | Path | bytes) -> DescriptorSet:
    """Load a serialized FileDescriptorSet (a path or its bytes) and collect its HTTP bindings."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        file_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    except Exception as exc:  # the protobuf runtime raises DecodeError or RuntimeError, depending on backend
        raise DescriptorError(f"not a FileDescriptorSet: {exc}") from exc
    pool = descriptor_pool.DescriptorPool()
    for file_proto in _dependency_order(file_set.file):
        try:
            pool.Add(file_proto)
        except Exception as exc:
            raise DescriptorError(f"cannot load {file_proto.name}: {exc}") from exc
    bindings: list[HttpBinding] = []
    for file_proto in file_set.file:
        for service_proto in file_proto.service:
            service = pool.FindServiceByName(_qualified(file_proto.package, service_proto.name))
            for method_proto in service_proto.method:
                if not method_proto.options.HasExtension(annotations_pb2.http):
                    continue
                method = service.methods_by_name[method_proto.name]
                rule = method_proto.options.Extensions[annotations_pb2.http]
                bindings.extend(_bindings_of(method, rule))
    return DescriptorSet(
        pool=pool,
        files=tuple(file_set.file),
        bindings=tuple(bindings),
        comments=_collect_comments(file_set.file),
    )


def _bindings_of(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Iterable[HttpBinding]:
    yield _binding(method, rule, 0)
    for index, extra in enumerate(rule.additional_bindings, start=1):
        if extra.additional_bindings:
            raise DescriptorError(f"{method.full_name}: additional_bindings cannot nest")
        yield _binding(method, extra, index)


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int) -> HttpBinding:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise DescriptorError(f"{method.full_name}: http rule has no pattern")
    if pattern == "custom":
        http_method, path = rule.custom.kind, rule.custom.path
    else:
        http_method, path = pattern.upper(), getattr(rule, pattern)
    try:
        template = parse_path_template(path)
    except PathTemplateError as exc:
        raise DescriptorError(f"{method.full_name}: {exc}") from exc
    request = method.input_type
    for variable in template.variables:
        leaf = _resolve(request, variable.field_path, method.full_name)
        if leaf.is_repeated or leaf.type == FieldDescriptor.TYPE_MESSAGE:
            raise DescriptorError(
                f"{method.full_name}: path variable {variable.dotted} must be a singular scalar"
            )
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise DescriptorError(
            f"{method.full_name}: body field {rule.body!r} is not a field of {request.full_name}"
        )
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise DescriptorError(
            f"{method.full_name}: response_body {rule.response_body!r} is not a response field"
        )
    return HttpBinding(
        method=method,
        http_method=http_method,
        template=template,
        body=rule.body,
        response_body=rule.response_body,
        binding_index=index,
    )


def _resolve(message: Descriptor, path: tuple[str, ...], where: str) -> FieldDescriptor:
    current = message
    leaf: FieldDescriptor | None = None
    for depth, name in enumerate(path):
        leaf = current.fields_by_name.get(name)
        if leaf is None:
            raise DescriptorError(f"{where}: {'.'.join(path)} is not a field of {message.full_name}")
        if depth < len(path) - 1:
            if leaf.message_type is None or leaf.is_repeated:
                raise DescriptorError(f"{where}: {'.'.join(path[: depth + 1])} is not a singular message")
            current = leaf.message_type
    assert leaf is not None  # path is never empty: the template parser rejects empty field paths
    return leaf


def _qualified(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name


def _dependency_order(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> list[descriptor_pb2.FileDescriptorProto]:
    """Files sorted so that each comes after its imports (a pool rejects a file whose imports are missing)."""
    by_name = {file_proto.name: file_proto for file_proto in files}
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    placed: set[str] = set()

    def place(name: str, trail: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in trail:
            raise DescriptorError(f"import cycle: {' -> '.join((*trail, name))}")
        file_proto = by_name.get(name)
        if file_proto is None:
            raise DescriptorError(f"the descriptor set lacks {name!r}; build it with its imports")
        for dependency in file_proto.dependency:
            place(dependency, (*trail, name))
        placed.add(name)
        ordered.append(file_proto)

    for name in by_name:
        place(name, ())
    return ordered


# FileDescriptorProto field numbers used by SourceCodeInfo paths (descriptor.proto).
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _collect_comments(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """Map element names to their cleaned leading comments, using each file's source info (if kept)."""
    comments: dict[str, str] = {}
    for file_proto in files:
        by_path = {
            tuple(location.path): location.leading_comments
            for location in file_proto.source_code_info.location
            if location.leading_comments.strip()
        }
        if not by_path:
            continue
        names: dict[tuple[int, ...], str] = {}
        for index, message in enumerate(file_proto.message_type):
            _name_message(
                names, (_FILE_MESSAGE, index), _qualified(file_proto.package, message.name), message
            )
        for index, enum in enumerate(file_proto.enum_type):
            _name_enum(names, (_FILE_ENUM, index), _qualified(file_proto.package, enum.name), enum)
        for index, service in enumerate(file_proto.service):
            service_name = _qualified(file_proto.package, service.name)
            names[(_FILE_SERVICE, index)] = service_name
            for method_index, method in enumerate(service.method):
                names[(_FILE_SERVICE, index, _SERVICE_METHOD, method_index)] = f"{service_name}.{method.name}"
        for path, text in by_path.items():
            if path in names:
                comments[names[path]] = _clean_comment(text)
    return comments


def _name_message(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full_name: str,
    message: descriptor_pb2.DescriptorProto,
) -> None:
    names[path] = full_name
    for index, field_proto in enumerate(message.field):
        names[(*path, _MESSAGE_FIELD, index)] = f"{full_name}.{field_proto.name}"
    for index, nested in enumerate(message.nested_type):
        _name_message(names, (*path, _MESSAGE_NESTED, index), f"{full_name}.{nested.name}", nested)
    for index, enum in enumerate(message.enum_type):
        _name_enum(names, (*path, _MESSAGE_ENUM, index), f"{full_name}.{enum.name}", enum)


def _name_enum(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full_name: str,
    enum: descriptor_pb2.EnumDescriptorProto,
) -> None:
    names[path] = full_name
    for index, value in enumerate(enum.value):
        names[(*path, _ENUM_VALUE, index)] = f"{full_name}.{value.name}"


def _clean_comment(text: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()
