"""Campaign templates: compiled once per campaign, rendered once per recipient (issue 17, point 1).

A campaign has a subject, a text and an HTML template in Jinja syntax — ``{{ first_name }}``, ``{% if %}``,
``{% for %}``, filters such as ``{{ name|title }}`` — and campaign-wide default values.
:meth:`CampaignTemplates.compile` checks them when the campaign is created (a problem is an
:class:`~libs.common.errors.InvalidArgument` whose field violations name the template's field path and give line and
column); :meth:`CampaignTemplates.render` then renders one recipient and returns either the :class:`RenderedContent`
or a :class:`RenderFailure` value, never an exception, so a million recipients render in a loop where some fail.

The engine is MiniJinja (the ``minijinja`` package: the Rust engine behind a Python binding), chosen over Jinja2's
``SandboxedEnvironment`` on four counts, measured with minijinja 3.1.0 and Jinja2 3.1.6 on this machine (2 shared
cores, Python 3.11):

- **Sandboxed by design.** A template sees only the values it is given, converted to the engine's own value type:
  ``{{ ''.__class__.__mro__ }}``, ``{{ x.__globals__ }}`` are undefined, not Python objects. Jinja2's sandbox
  refuses them too, but by intercepting attribute access on real Python objects — a denylist to keep right.
- **Errors with line and column.** A syntax error carries its line and byte range; Jinja2's ``TemplateSyntaxError``
  has only the line.
- **Bounded work.** Every render has a *fuel* budget (:data:`DEFAULT_FUEL` instructions; string growth is charged
  too): ``{% for i in range(10000) %}{% for j in range(10000) %}`` stops with "out of fuel" after 2 ms, and
  ``'x' * 1000000000`` or doubling a string in a loop stops before it allocates. Jinja2 caps one ``range`` at
  100,000 but nested loops run unbounded (3·10⁷ empty iterations took 0.7 s; 10¹⁰ would hold a worker for minutes).
- **Speed.** A 2.2 KB HTML body with 3 variables: 1.1 µs per render (Jinja2: 6.8 µs); a one-variable subject:
  0.67 µs (Jinja2: 5.5 µs); compiling the body: 3 µs (Jinja2: 386 µs). The campaign target (10,000 recipients/s
  rendered, reserved and queued on 2 cores) leaves 100 µs a recipient; :meth:`CampaignTemplates.render` of a
  subject, a text and that HTML body, defaults merged and values checked, costs 4.5 µs a recipient.

Policies:

- **Escaping.** HTML templates escape every value (``<``, ``>``, ``&``, quotes and ``/``, the last as ``&#x2f;``,
  which browsers and mail clients read back as ``/`` in text and attributes alike); subject and text templates do
  not. A template's author may still write ``{{ value|safe }}`` on purpose.
- **Subject.** A rendered subject holding a line break or another control character fails that recipient
  (``HEADER_INJECTION``: it could end the header and start another), as does one over 998 characters.
- **Missing variables.** Campaign-wide defaults apply first (a recipient's own value wins over a default); a
  variable still missing follows :class:`MissingVariablePolicy`: ``FAIL`` (the default) fails the recipient with
  reason ``MISSING_VARIABLE`` naming the variable — wherever the template uses it, ``{% if x %}`` included; write
  ``{% if x is defined %}``, ``{{ x|default('') }}`` or give a default to make a variable optional — or ``EMPTY``
  (missing values, and attributes of them, render as the empty string and test false).
- **unsubscribe_url** (:data:`UNSUBSCRIBE_URL`) is reserved: the expander passes each recipient's signed URL to
  :meth:`CampaignTemplates.render`, which sets it last, so a recipient variable of that name never reaches a
  template (it is discarded); campaign defaults may not define it. With no URL given, a template using it follows
  the missing-variable policy.
- **Values** are JSON-like: ``str``, ``int``, ``float``, ``bool``, ``None``, lists and string-keyed mappings of
  them. Anything else fails the recipient (``INVALID_VARIABLE``) instead of handing a Python object to the engine;
  a ``str`` subclass (``markupsafe.Markup``, say) is passed as a plain ``str`` so it cannot skip HTML escaping.
- **Self-contained.** ``include``, ``import``, ``from`` and ``extends`` are refused at compile time: a campaign
  template has nothing to include. An unknown filter or test is refused at compile time too (MiniJinja would only
  notice it while rendering, failing every recipient).

What work remains unbounded: fuel does not charge for copying literal text, so a loop repeating a large literal can
allocate up to fuel / 4 iterations times the literal's size before the size check fails the recipient; the
expander should render in its own worker process with a memory limit.

For later optimisation each :class:`Template` exposes the variables it references and whether it is a *plain
substitution* (nothing but ``{{ name }}`` placeholders): such a template could travel unrendered with per-recipient
variables for a provider's batch API to substitute (DESIGN.md, Wave 2 / Campaigns) — HTML-escaping the values first
when the template is HTML.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from minijinja import Environment, TemplateError

from libs.common.addresses import has_control
from libs.common.content_limits import MAX_BODY_BYTES, MAX_SUBJECT_CHARS
from libs.common.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_FUEL",
    "MAX_TEMPLATE_CHARS",
    "RESERVED_VARIABLES",
    "UNSUBSCRIBE_URL",
    "CampaignTemplates",
    "FailureReason",
    "MissingVariablePolicy",
    "RenderFailure",
    "RenderedContent",
    "Template",
    "TemplateKind",
    "Value",
    "compile_template",
]

UNSUBSCRIBE_URL = "unsubscribe_url"
"""The variable holding a recipient's signed one-click unsubscribe URL (RFC 8058), supplied by the expander."""
RESERVED_VARIABLES = frozenset({UNSUBSCRIBE_URL})
"""Variables only the platform sets: recipient values of these names are discarded, defaults refused."""
DEFAULT_FUEL = 50_000
"""Engine instructions one render may spend: about 12,000 iterations of a loop that prints a literal, 6,000 of one
that prints a value under a condition — far above a newsletter's product list, and at most ~1 ms of CPU."""
MAX_TEMPLATE_CHARS = 1024 * 1024
"""Largest template source accepted: a fifth of the largest body a provider takes (``MAX_BODY_BYTES``)."""

Value: TypeAlias = str | int | float | bool | Sequence["Value"] | Mapping[str, "Value"] | None
"""A variable's value: JSON-like data (a CSV cell is a ``str``; a JSON Lines row may nest lists and objects)."""


class TemplateKind(enum.StrEnum):
    """Which part of the email a template renders; it decides escaping and the checks on the result."""

    SUBJECT = "SUBJECT"
    TEXT = "TEXT"
    HTML = "HTML"


class MissingVariablePolicy(enum.StrEnum):
    """What a variable that neither the recipient nor the campaign defaults define renders as."""

    FAIL = "FAIL"
    """The recipient fails with ``MISSING_VARIABLE`` naming the variable (the default)."""
    EMPTY = "EMPTY"
    """The variable renders as the empty string (and is false in conditions)."""


class FailureReason(enum.StrEnum):
    """Why one recipient's email could not be rendered."""

    MISSING_VARIABLE = "MISSING_VARIABLE"
    INVALID_VARIABLE = "INVALID_VARIABLE"
    HEADER_INJECTION = "HEADER_INJECTION"
    SUBJECT_TOO_LONG = "SUBJECT_TOO_LONG"
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    TOO_COMPLEX = "TOO_COMPLEX"
    RENDER_ERROR = "RENDER_ERROR"


@dataclass(frozen=True, slots=True)
class RenderFailure:
    """One recipient whose email could not be rendered: a value, so the loop over recipients goes on."""

    reason: FailureReason
    message: str
    field: str = ""
    """The template's field path (``campaign.subject``); empty when the recipient's variables themselves are bad."""
    variable: str | None = None
    """The variable at fault (``first_name``, ``order.total``), when one is."""


@dataclass(frozen=True, slots=True)
class RenderedContent:
    """One recipient's rendered subject and bodies (a body is ``None`` when the campaign has no such template)."""

    subject: str
    text: str | None
    html: str | None


# Names a template can use that are not variables: the engine's globals and literal keywords.
_GLOBALS = frozenset({"range", "dict", "namespace", "cycler", "joiner", "debug"})
_NOT_VARIABLES = _GLOBALS | {"true", "false", "none", "True", "False", "None", "loop", "self", "super", "varargs",
                             "kwargs", "caller"}
_PLACEHOLDER = re.compile(r"\{\{[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\}\}")
# Comments and raw blocks hold no code; blanked (newlines kept, so offsets stay valid) before looking at tags.
_OPAQUE = re.compile(r"\{#.*?#\}|\{%[-+]?\s*raw\s*[-+]?%\}.*?\{%[-+]?\s*endraw\s*[-+]?%\}", re.S)
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)
_STATEMENT = re.compile(r"\{%[-+]?\s*([A-Za-z_]+)\s*([A-Za-z_][A-Za-z0-9_]*)?")
_FILTER_USE = re.compile(r"\|\s*([A-Za-z_][A-Za-z0-9_]*)")
_TEST_USE = re.compile(r"\bis\s+(?:not\s+)?([A-Za-z_][A-Za-z0-9_]*)")
_IN_TEMPLATE = re.compile(r" \(in [^)]*\)$")  # the engine's "(in name:line)": we give line and column
_NOT_SELF_CONTAINED = frozenset({"include", "import", "from", "extends"})
_MAX_VALUE_DEPTH = 32
_INVALID = object()


def _blank(match: re.Match[str]) -> str:
    return re.sub(r"[^\n]", " ", match.group())


def _line_column(source: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of a character offset."""
    line_start = source.rfind("\n", 0, offset) + 1
    return source.count("\n", 0, offset) + 1, offset - line_start + 1


def _error_position(source: str, error: TemplateError) -> tuple[int, int] | None:
    """Line and column of an engine error, whose range counts UTF-8 bytes."""
    span = error.range
    if span is None:
        return (error.line, 1) if error.line is not None else None
    offset = len(source.encode()[: span[0]].decode("utf-8", "ignore"))
    return _line_column(source, offset)


def _error_text(source: str, error: TemplateError) -> str:
    """The template text an engine error points at (``d.zz``, ``items``), or ``""``."""
    if error.range is None:
        return ""
    return source.encode()[error.range[0] : error.range[1]].decode("utf-8", "ignore")


def _describe(source: str, error: TemplateError) -> str:
    detail = error.detail or _IN_TEMPLATE.sub("", error.message)
    position = _error_position(source, error)
    return f"line {position[0]}, column {position[1]}: {detail}" if position else detail


_PROBE = Environment(debug=False)


@functools.lru_cache(maxsize=512)
def _known(kind: str, name: str) -> bool:
    """Whether the engine has a filter (``kind == "|"``) or a test (``kind == "is"``) of this name.

    The Python binding does not list them; rendering one use tells, and only "unknown" errors mean no.
    """
    try:
        _PROBE.render_str(f"{{{{ none {kind} {name} }}}}")
    except TemplateError as error:
        return error.kind not in ("UnknownFilter", "UnknownTest")
    return True


def _check_tags(source: str, field: str) -> list[FieldViolation]:
    """Problems MiniJinja's parser lets through and only rendering would find: unknown filters and tests, tags
    that load other templates."""
    problems: list[FieldViolation] = []
    visible = _OPAQUE.sub(_blank, source)
    for tag in _TAG.finditer(visible):
        body = _STRING.sub(_blank, tag.group())
        statement = _STATEMENT.match(body)
        if statement and statement.group(1) in _NOT_SELF_CONTAINED:
            line, column = _line_column(source, tag.start())
            problems.append(FieldViolation(
                field, f"line {line}, column {column}: `{statement.group(1)}` is not available: a campaign "
                       "template is self-contained", "UNSUPPORTED_TAG"))
            continue
        uses = [("|", m) for m in _FILTER_USE.finditer(body)] + [("is", m) for m in _TEST_USE.finditer(body)]
        if statement and statement.group(1) == "filter" and statement.group(2):
            uses.append(("|", statement))
        for kind, use in uses:
            name = use.group(use.lastindex or 1)
            if not _known(kind, name):
                line, column = _line_column(source, tag.start() + use.start(use.lastindex or 1))
                what = "filter" if kind == "|" else "test"
                problems.append(FieldViolation(field, f"line {line}, column {column}: unknown {what} `{name}`",
                                               f"UNKNOWN_{what.upper()}"))
    return problems


def _clean_value(value: object, depth: int = 0) -> object:
    """``value`` as plain JSON-like data, or ``_INVALID``."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if depth >= _MAX_VALUE_DEPTH:
        return _INVALID
    if isinstance(value, str):
        return str.__str__(value)  # a subclass such as markupsafe.Markup would be output unescaped
    if isinstance(value, Mapping):
        clean: dict[str, object] = {}
        for key, item in value.items():
            cleaned = _clean_value(item, depth + 1)
            if type(key) is not str or cleaned is _INVALID:
                return _INVALID
            clean[key] = cleaned
        return clean
    if isinstance(value, (list, tuple)):
        items = [_clean_value(item, depth + 1) for item in value]
        return _INVALID if any(item is _INVALID for item in items) else items
    return _INVALID


class Template:
    """One compiled template (make it with :func:`compile_template`); renders a context to ``str`` or a failure."""

    __slots__ = ("_env", "field", "kind", "on_missing", "plain_substitution", "source", "variables")

    field: str
    """The template's field path in the request (``campaign.subject``): failures and violations name it."""
    kind: TemplateKind
    source: str
    on_missing: MissingVariablePolicy
    variables: frozenset[str]
    """The top-level variable names the template reads (``order`` for ``{{ order.total }}``), reserved ones included."""
    plain_substitution: bool
    """True when the template is literal text and ``{{ name }}`` placeholders only: no statements, filters,
    attributes, comments or whitespace control, so substituting the variables' values is the whole render."""

    def __init__(self, *, env: Environment, field: str, kind: TemplateKind, source: str,
                 on_missing: MissingVariablePolicy, variables: frozenset[str], plain_substitution: bool) -> None:
        self._env = env
        self.field = field
        self.kind = kind
        self.source = source
        self.on_missing = on_missing
        self.variables = variables
        self.plain_substitution = plain_substitution

    def __repr__(self) -> str:
        return f"Template(field={self.field!r}, kind={self.kind.value}, variables={sorted(self.variables)})"

    def render(self, context: Mapping[str, Value]) -> str | RenderFailure:
        """Render with ``context`` (defaults already merged, values already JSON-like), then check the result."""
        try:
            rendered = self._env.render_template(self.field, **context)
        except TemplateError as error:
            return self._failure(error, context)
        except BaseException as error:
            # Only a Rust panic (pyo3's PanicException, a BaseException) is turned into a failure here: an engine
            # bug must cost one recipient, not the worker. KeyboardInterrupt and the like propagate.
            if type(error).__name__ != "PanicException":
                raise
            return RenderFailure(FailureReason.RENDER_ERROR, f"template engine failure: {error}", self.field)
        if self.kind is TemplateKind.SUBJECT:
            if has_control(rendered):  # the set ingest refuses in a subject: it could end the header
                return RenderFailure(FailureReason.HEADER_INJECTION, "the rendered subject holds a line break (CR, "
                                     "LF ...), NUL or another control character", self.field)
            if len(rendered) > MAX_SUBJECT_CHARS:
                return RenderFailure(FailureReason.SUBJECT_TOO_LONG,
                                     f"the rendered subject is longer than {MAX_SUBJECT_CHARS} characters",
                                     self.field)
        elif len(rendered) * 4 > MAX_BODY_BYTES and len(rendered.encode()) > MAX_BODY_BYTES:
            return RenderFailure(FailureReason.BODY_TOO_LARGE,
                                 f"the rendered body is larger than {MAX_BODY_BYTES} bytes", self.field)
        return rendered

    def _failure(self, error: TemplateError, context: Mapping[str, Value]) -> RenderFailure:
        description = _describe(self.source, error)
        if error.kind == "OutOfFuel" or "recursion limit" in error.message:
            return RenderFailure(FailureReason.TOO_COMPLEX, f"the template does too much work: {description}",
                                 self.field)
        # The engine says where it failed, not which variable was missing (an undefined one may also surface as
        # "not iterable" or "unknown function"): name the missing top-level variable used at that spot.
        missing = sorted(self.variables.difference(context))
        spot = _error_text(self.source, error)
        named = [name for name in missing if re.search(rf"\b{re.escape(name)}\b", spot)]
        if named:
            return RenderFailure(FailureReason.MISSING_VARIABLE, f"`{named[0]}` is not defined: {description}",
                                 self.field, named[0])
        if error.kind == "UndefinedError":
            variable = missing[0] if missing else spot.strip() or None
            return RenderFailure(FailureReason.MISSING_VARIABLE, f"`{variable}` is not defined: {description}",
                                 self.field, variable)
        return RenderFailure(FailureReason.RENDER_ERROR, description, self.field)


def _compile(source: str, field: str, kind: TemplateKind, on_missing: MissingVariablePolicy,
             fuel: int) -> Template | list[FieldViolation]:
    if len(source) > MAX_TEMPLATE_CHARS:
        return [FieldViolation(field, f"longer than {MAX_TEMPLATE_CHARS} characters", "TOO_LONG")]
    escape = "html" if kind is TemplateKind.HTML else None
    env = Environment(
        debug=False,  # error messages then carry no copy of the template source
        fuel=fuel,
        undefined_behavior="strict" if on_missing is MissingVariablePolicy.FAIL else "chainable",
        auto_escape_callback=lambda _name: escape,
        keep_trailing_newline=True,  # the body renders as written, final newline included
    )
    env.remove_global("debug")  # it dumps the engine's state; nothing an email needs
    try:
        env.add_template(field, source)
    except TemplateError as error:
        return [FieldViolation(field, _describe(source, error), "TEMPLATE_SYNTAX")]
    problems = _check_tags(source, field)
    if problems:
        return problems
    variables = frozenset(env.undeclared_variables_in_template(field)) - _GLOBALS
    placeholders = _PLACEHOLDER.findall(source)
    rest = _PLACEHOLDER.sub("", source)
    plain = not any(marker in rest for marker in ("{{", "{%", "{#")) and not _NOT_VARIABLES.intersection(placeholders)
    return Template(env=env, field=field, kind=kind, source=source, on_missing=on_missing, variables=variables,
                    plain_substitution=plain)


def _refuse(problems: Sequence[FieldViolation]) -> InvalidArgument:
    first = problems[0]
    message = f"{first.field}: {first.description}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more template problems)"
    return InvalidArgument(message, reason="INVALID_TEMPLATE", field_violations=problems)


def compile_template(source: str, *, field: str, kind: TemplateKind,
                     on_missing: MissingVariablePolicy = MissingVariablePolicy.FAIL,
                     fuel: int = DEFAULT_FUEL) -> Template:
    """Compile one template; ``field`` is its path in the request (``campaign.subject``).

    Raises :class:`~libs.common.errors.InvalidArgument` whose field violations name ``field`` and say the line and
    column of each problem (a syntax error, an unknown filter or test, an ``include``).
    """
    compiled = _compile(source, field, kind, on_missing, fuel)
    if isinstance(compiled, Template):
        return compiled
    raise _refuse(compiled)


class CampaignTemplates:
    """A campaign's subject, text and HTML templates and default values, compiled once, rendered per recipient."""

    __slots__ = ("_defaults", "html", "on_missing", "subject", "text")

    subject: Template
    text: Template | None
    html: Template | None
    on_missing: MissingVariablePolicy

    def __init__(self, *, subject: Template, text: Template | None, html: Template | None,
                 defaults: Mapping[str, Value], on_missing: MissingVariablePolicy) -> None:
        self.subject = subject
        self.text = text
        self.html = html
        self.on_missing = on_missing
        self._defaults = dict(defaults)

    @classmethod
    def compile(cls, *, subject: str, text: str | None = None, html: str | None = None,
                defaults: Mapping[str, Value] | None = None,
                on_missing: MissingVariablePolicy = MissingVariablePolicy.FAIL,
                field_prefix: str = "", fuel: int = DEFAULT_FUEL) -> CampaignTemplates:
        """Compile a campaign's templates, reporting every problem at once.

        Fields are named as in the Campaign message: ``{field_prefix}subject``, ``…text_body``, ``…html_body`` and
        ``…default_variables.<name>`` (pass ``field_prefix="campaign."`` for ``campaign.subject``). Raises
        :class:`~libs.common.errors.InvalidArgument` with one field violation per problem: a template that does not
        compile, a default that is not JSON-like data or that names a reserved variable.
        """
        problems: list[FieldViolation] = []
        clean_defaults: dict[str, Value] = {}
        for name, value in (defaults or {}).items():
            field = f"{field_prefix}default_variables.{name}"
            if name in RESERVED_VARIABLES:
                problems.append(FieldViolation(field, f"`{name}` is reserved: the platform sets it per recipient",
                                               "RESERVED_VARIABLE"))
                continue
            cleaned = _clean_value(value)
            if cleaned is _INVALID:
                problems.append(FieldViolation(field, "not a string, number, boolean, null, list or object",
                                               "INVALID_VARIABLE"))
                continue
            clean_defaults[name] = cleaned  # type: ignore[assignment]  # _clean_value returns JSON-like data
        parts: dict[str, Template | None] = {}
        for part, field_name, source, kind in (("subject", "subject", subject, TemplateKind.SUBJECT),
                                               ("text", "text_body", text, TemplateKind.TEXT),
                                               ("html", "html_body", html, TemplateKind.HTML)):
            if source is None:
                parts[part] = None
                continue
            compiled = _compile(source, f"{field_prefix}{field_name}", kind, on_missing, fuel)
            if isinstance(compiled, Template):
                parts[part] = compiled
            else:
                problems.extend(compiled)
        if problems:
            raise _refuse(problems)
        subject_template = parts["subject"]
        assert subject_template is not None  # compiled above, or we raised
        return cls(subject=subject_template, text=parts["text"], html=parts["html"], defaults=clean_defaults,
                   on_missing=on_missing)

    @property
    def defaults(self) -> Mapping[str, Value]:
        """The campaign-wide default values (a copy)."""
        return dict(self._defaults)

    @property
    def variables(self) -> frozenset[str]:
        """Every variable any of the templates reads."""
        names = self.subject.variables
        for template in (self.text, self.html):
            if template is not None:
                names = names | template.variables
        return names

    @property
    def plain_substitution(self) -> bool:
        """True when every template is a plain substitution (see :attr:`Template.plain_substitution`)."""
        return all(t.plain_substitution for t in (self.subject, self.text, self.html) if t is not None)

    def context(self, variables: Mapping[str, Value], *,
                unsubscribe_url: str | None = None) -> dict[str, Value] | RenderFailure:
        """The values a recipient's templates see: the defaults, then the recipient's own values, then the reserved
        ones (a recipient's ``unsubscribe_url`` is discarded, the given one set). A value that is not JSON-like
        data fails the recipient."""
        context: dict[str, Value] = dict(self._defaults)
        for name, value in variables.items():
            kind = type(value)
            if not (kind is str or kind is int or kind is float or kind is bool or value is None):
                cleaned = _clean_value(value)
                if cleaned is _INVALID or type(name) is not str:
                    return RenderFailure(FailureReason.INVALID_VARIABLE,
                                         f"variable `{name}` is not a string, number, boolean, null, list or object",
                                         variable=str(name))
                value = cleaned  # type: ignore[assignment]  # _clean_value returns JSON-like data
            elif type(name) is not str:
                return RenderFailure(FailureReason.INVALID_VARIABLE, "a variable name is not a string",
                                     variable=str(name))
            context[name] = value
        if unsubscribe_url is None:
            context.pop(UNSUBSCRIBE_URL, None)
        else:
            context[UNSUBSCRIBE_URL] = unsubscribe_url
        return context

    def render(self, variables: Mapping[str, Value], *,
               unsubscribe_url: str | None = None) -> RenderedContent | RenderFailure:
        """Render one recipient: its subject and bodies, or the first failure (see :class:`FailureReason`)."""
        context = self.context(variables, unsubscribe_url=unsubscribe_url)
        if isinstance(context, RenderFailure):
            return context
        return self.render_context(context)

    def render_context(self, context: Mapping[str, Value]) -> RenderedContent | RenderFailure:
        """Render one recipient from the values :meth:`context` gave."""
        subject = self.subject.render(context)
        if isinstance(subject, RenderFailure):
            return subject
        text = self.text.render(context) if self.text is not None else None
        if isinstance(text, RenderFailure):
            return text
        html = self.html.render(context) if self.html is not None else None
        if isinstance(html, RenderFailure):
            return html
        return RenderedContent(subject=subject, text=text, html=html)
