"""`google.api.http` path templates: parsing and matching request paths against them.

Grammar (google/api/http.proto)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

Matching works on the raw (still percent-encoded) path components so that an encoded ``%2F`` never splits a
segment. Captured values are decoded as http.proto prescribes: a single-segment variable (``{id}``,
``{id=*}``) is fully percent-decoded; a multi-segment one (``{name=shelves/*}``, ``{path=**}``) is decoded
except for ``%2F``, which stays encoded so the value's own slashes remain unambiguous.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Literal segments may hold any URL path character except the template's own syntax.
_LITERAL = re.compile(r"^[^/{}*=:]+$")
_ENCODED_SLASH = re.compile(r"(%2[fF])")


class PathTemplateError(ValueError):
    """A path template does not follow the google.api.http grammar."""


class SegmentKind(enum.Enum):
    """What one template segment matches."""

    LITERAL = "literal"
    SINGLE = "*"
    MULTI = "**"


@dataclass(frozen=True)
class Segment:
    """One ``/``-separated piece of a template."""

    kind: SegmentKind
    literal: str = ""
    """The text to match, for LITERAL segments."""


@dataclass(frozen=True)
class Variable:
    """A ``{field.path=...}`` capture: template segments ``[start, end)`` bind to ``field_path``."""

    field_path: tuple[str, ...]
    start: int
    end: int

    @property
    def dotted(self) -> str:
        """The field path as written in the template (``provider.name``)."""
        return ".".join(self.field_path)


@dataclass(frozen=True)
class PathTemplate:
    """A parsed path template such as ``/v1/{name=messages/*}:send``."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str

    @property
    def literal_count(self) -> int:
        """How many literal segments the template has; more literals means a more specific route."""
        return sum(1 for segment in self.segments if segment.kind is SegmentKind.LITERAL)

    @property
    def has_multi_wildcard(self) -> bool:
        """Whether a ``**`` segment makes the template match paths of any length."""
        return any(segment.kind is SegmentKind.MULTI for segment in self.segments)

    def match(self, components: Sequence[str]) -> dict[str, str] | None:
        """Match raw path components (verb already removed); return the captured variables or None.

        Keys of the result are dotted field paths, values the decoded captured text.
        """
        spans = _match_segments(self.segments, components)
        if spans is None:
            return None
        captured: dict[str, str] = {}
        for variable in self.variables:
            first = spans[variable.start][0]
            last = spans[variable.end - 1][1]
            raw_parts = components[first:last]
            single = (
                variable.end - variable.start == 1
                and self.segments[variable.start].kind is SegmentKind.SINGLE
            )
            if single:
                captured[variable.dotted] = unquote(raw_parts[0], errors="strict")
            else:
                captured[variable.dotted] = "/".join(_unquote_keeping_slashes(part) for part in raw_parts)
        return captured

    def split_verb(self, components: Sequence[str]) -> list[str] | None:
        """Remove this template's verb from the last component, or None when the path lacks it.

        Like grpc-gateway, the verb is looked for as a ``:verb`` suffix of the last component, so a colon
        elsewhere in a resource id does not confuse routing; templates without a verb take the path as is.
        """
        parts = list(components)
        if not self.verb:
            return parts
        suffix = ":" + self.verb
        last = parts[-1]
        if not last.endswith(suffix) or len(last) == len(suffix):
            return None
        parts[-1] = last[: -len(suffix)]
        return parts


def _unquote_keeping_slashes(component: str) -> str:
    # Split around encoded slashes, decode the rest, and keep each %2F exactly as the client sent it.
    pieces = _ENCODED_SLASH.split(component)
    return "".join(
        piece if _ENCODED_SLASH.fullmatch(piece) else unquote(piece, errors="strict") for piece in pieces
    )


def _match_segments(segments: Sequence[Segment], components: Sequence[str]) -> list[tuple[int, int]] | None:
    """Backtracking match; returns, per segment, the ``[start, end)`` component span it consumed."""
    spans: list[tuple[int, int]] = [(0, 0)] * len(segments)

    def step(segment_index: int, component_index: int) -> bool:
        if segment_index == len(segments):
            return component_index == len(components)
        segment = segments[segment_index]
        if segment.kind is SegmentKind.MULTI:
            # Greedy first, then give components back to the segments that follow.
            for end in range(len(components), component_index - 1, -1):
                spans[segment_index] = (component_index, end)
                if step(segment_index + 1, end):
                    return True
            return False
        if component_index >= len(components):
            return False
        component = components[component_index]
        if segment.kind is SegmentKind.LITERAL:
            if unquote(component) != segment.literal:
                return False
        elif component == "":
            # An empty segment ("/v1/messages/") names nothing; it must not bind an empty resource id.
            return False
        spans[segment_index] = (component_index, component_index + 1)
        return step(segment_index + 1, component_index + 1)

    return spans if step(0, 0) else None


def parse_path_template(source: str) -> PathTemplate:
    """Parse a google.api.http path template; raise PathTemplateError when it is malformed."""
    if not source.startswith("/"):
        raise PathTemplateError(f"path template {source!r} must start with '/'")
    body = source[1:]
    verb = ""
    tail_start = max(body.rfind("/"), body.rfind("}"))
    colon = body.find(":", tail_start + 1)
    if colon >= 0:
        verb = body[colon + 1 :]
        body = body[:colon]
        if not verb or not _LITERAL.match(verb):
            raise PathTemplateError(f"path template {source!r} has an invalid verb {verb!r}")
    segments: list[Segment] = []
    variables: list[Variable] = []
    for raw in _split_top_level(body, source):
        if raw.startswith("{"):
            if not raw.endswith("}"):
                raise PathTemplateError(f"path template {source!r}: unterminated variable {raw!r}")
            field_text, _, sub_template = raw[1:-1].partition("=")
            field_path = tuple(field_text.split("."))
            if not all(_IDENT.match(name) for name in field_path):
                raise PathTemplateError(f"path template {source!r}: invalid field path {field_text!r}")
            if any(variable.field_path == field_path for variable in variables):
                raise PathTemplateError(f"path template {source!r} binds {field_text!r} twice")
            start = len(segments)
            for sub in (sub_template or "*").split("/"):
                if sub.startswith("{"):
                    raise PathTemplateError(f"path template {source!r}: variables cannot nest")
                segments.append(_plain_segment(sub, source))
            variables.append(Variable(field_path=field_path, start=start, end=len(segments)))
        else:
            segments.append(_plain_segment(raw, source))
    return PathTemplate(source=source, segments=tuple(segments), variables=tuple(variables), verb=verb)


def _plain_segment(raw: str, source: str) -> Segment:
    if raw == "*":
        return Segment(SegmentKind.SINGLE)
    if raw == "**":
        return Segment(SegmentKind.MULTI)
    if not _LITERAL.match(raw):
        raise PathTemplateError(f"path template {source!r}: invalid segment {raw!r}")
    return Segment(SegmentKind.LITERAL, literal=raw)


def _split_top_level(body: str, source: str) -> list[str]:
    """Split on '/' outside braces (a variable's sub-template has its own slashes)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in body:
        if char == "{":
            depth += 1
            if depth > 1:
                raise PathTemplateError(f"path template {source!r}: variables cannot nest")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise PathTemplateError(f"path template {source!r}: unbalanced '}}'")
        if char == "/" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise PathTemplateError(f"path template {source!r}: unbalanced '{{'")
    parts.append("".join(current))
    return parts
