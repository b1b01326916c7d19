"""Campaign templates: compiled once, rendered per recipient; a bad template is refused at compile time with its
field, line and column; a recipient that cannot be rendered is a failure value, never an exception."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidArgument
from services.campaigns.templates import (
    RESERVED_VARIABLES,
    UNSUBSCRIBE_URL,
    CampaignTemplates,
    FailureReason,
    MissingVariablePolicy,
    RenderedContent,
    RenderFailure,
    TemplateKind,
    compile_template,
)

HTML = '<p>Hello {{ first_name }},</p>\n<p>{{ note }}</p>\n<a href="{{ unsubscribe_url }}">Unsubscribe</a>\n'


def rendered(result: RenderedContent | RenderFailure) -> RenderedContent:
    assert isinstance(result, RenderedContent), result
    return result


def failed(result: RenderedContent | RenderFailure | str) -> RenderFailure:
    assert isinstance(result, RenderFailure), result
    return result


def refusal(**kwargs: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        CampaignTemplates.compile(**kwargs)  # type: ignore[arg-type]
    return caught.value


def test_each_recipient_gets_its_own_values():
    campaign = CampaignTemplates.compile(subject="Hi {{ first_name }}", text="Code {{ code }} for {{ first_name }}")
    ann = rendered(campaign.render({"first_name": "Ann", "code": "A1"}))
    bob = rendered(campaign.render({"first_name": "Bob", "code": "B2"}))
    assert (ann.subject, ann.text, ann.html) == ("Hi Ann", "Code A1 for Ann", None)
    assert (bob.subject, bob.text) == ("Hi Bob", "Code B2 for Bob")


def test_conditions_loops_and_filters_render():
    campaign = CampaignTemplates.compile(
        subject="{{ first_name|title }}",
        text="{% if vip %}VIP {% endif %}{% for item in items %}[{{ item.name|upper }}]{% endfor %}",
    )
    result = rendered(campaign.render({"first_name": "ann lee", "vip": True, "items": [{"name": "a"}, {"name": "b"}]}))
    assert result.subject == "Ann Lee"
    assert result.text == "VIP [A][B]"


def test_defaults_fill_in_and_recipient_values_win():
    campaign = CampaignTemplates.compile(subject="Hi {{ first_name }} from {{ shop }}",
                                         defaults={"first_name": "there", "shop": "Acme"})
    assert rendered(campaign.render({})).subject == "Hi there from Acme"
    assert rendered(campaign.render({"first_name": "Ann"})).subject == "Hi Ann from Acme"


def test_text_body_ends_as_written():
    campaign = CampaignTemplates.compile(subject="s", text="Line 1\nLine 2\n")
    assert rendered(campaign.render({})).text == "Line 1\nLine 2\n"


def test_html_escapes_values_and_subject_and_text_do_not():
    value = "<b>Tom & \"Jerry\"</b>"
    campaign = CampaignTemplates.compile(subject="{{ v }}", text="{{ v }}", html="<p>{{ v }}</p>")
    result = rendered(campaign.render({"v": value}))
    assert result.subject == value
    assert result.text == value
    assert result.html == "<p>&lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;&#x2f;b&gt;</p>"


def test_html_escapes_a_str_subclass_that_claims_to_be_safe():
    class Markup(str):
        def __html__(self) -> str:
            return self

    campaign = CampaignTemplates.compile(subject="s", html="{{ v }}")
    assert rendered(campaign.render({"v": Markup("<script>")})).html == "&lt;script&gt;"


def test_syntax_error_is_invalid_argument_with_field_line_and_column():
    error = refusal(subject="Hello", text="Line one\n  {{ first_name + }}", field_prefix="campaign.")
    assert error.reason == "INVALID_TEMPLATE"
    [violation] = error.field_violations
    assert violation.field == "campaign.text_body"
    assert violation.reason == "TEMPLATE_SYNTAX"
    assert "line 2, column 19" in violation.description  # at the `}}` that ends it too soon


def test_syntax_error_column_counts_characters_not_bytes():
    with pytest.raises(InvalidArgument) as caught:
        compile_template("Grüße\nÇa {% if %}", field="campaign.html", kind=TemplateKind.HTML)
    # at the `%}`; counting UTF-8 bytes would say column 11 (Ç is two bytes)
    assert "line 2, column 10" in caught.value.field_violations[0].description


def test_every_bad_template_is_reported_at_once():
    error = refusal(subject="{{ a", html="{% for %}", defaults={UNSUBSCRIBE_URL: "x"}, field_prefix="campaign.")
    assert {v.field for v in error.field_violations} == {
        "campaign.subject", "campaign.html_body", f"campaign.default_variables.{UNSUBSCRIBE_URL}"}


def test_unknown_filter_or_test_is_refused_at_compile_time():
    error = refusal(subject="{{ name|shout }}", text="{% if x is vip %}{% endif %}\n{{ '|shout' }}")
    assert [(v.field, v.reason, v.description) for v in error.field_violations] == [
        ("subject", "UNKNOWN_FILTER", "line 1, column 9: unknown filter `shout`"),
        ("text_body", "UNKNOWN_TEST", "line 1, column 12: unknown test `vip`"),
    ]


def test_include_and_import_are_refused_at_compile_time():
    error = refusal(subject="s", text="{% include 'subject' %}", html="{% import 'x' as y %}")
    assert [v.reason for v in error.field_violations] == ["UNSUPPORTED_TAG", "UNSUPPORTED_TAG"]


def test_missing_variable_fails_the_recipient_by_default_naming_it():
    campaign = CampaignTemplates.compile(subject="Hi", html="<p>{{ first_name }} {{ last_name }}</p>",
                                         field_prefix="campaign.")
    assert campaign.on_missing is MissingVariablePolicy.FAIL
    failure = failed(campaign.render({"first_name": "Ann"}))
    assert (failure.reason, failure.field, failure.variable) == (
        FailureReason.MISSING_VARIABLE, "campaign.html_body", "last_name")
    assert "last_name" in failure.message


@pytest.mark.parametrize("source, variable", [
    ("{% if company %}x{% endif %}", "company"),
    ("{% for item in items %}{% endfor %}", "items"),
    ("{{ name|upper }}", "name"),
    ("{{ order.total }}", "order.total"),
])
def test_missing_variable_is_named_wherever_it_is_used(source, variable):
    template = compile_template(source, field="t", kind=TemplateKind.TEXT)
    failure = failed(template.render({"order": {}}))
    assert (failure.reason, failure.variable) == (FailureReason.MISSING_VARIABLE, variable)


def test_optional_variables_under_fail_use_default_or_is_defined():
    template = compile_template("{{ nick|default('friend') }}{% if vip is defined %}!{% endif %}",
                               field="t", kind=TemplateKind.TEXT)
    assert template.render({}) == "friend"
    assert template.render({"nick": "Al", "vip": True}) == "Al!"


def test_missing_variable_renders_empty_under_empty_policy():
    campaign = CampaignTemplates.compile(
        subject="Hi {{ first_name }}!",
        text="{% if vip %}VIP{% endif %}{{ order.total }}{% for i in items %}x{% endfor %}",
        on_missing=MissingVariablePolicy.EMPTY)
    result = rendered(campaign.render({}))
    assert (result.subject, result.text) == ("Hi !", "")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ x.__class__.__mro__[1].__subclasses__() }}",
    "{{ x.__globals__ }}",
    "{{ d.__class__ }}{{ d.__init__ }}{{ d.items.__self__ }}",
    "{{ self }}{{ config }}{{ request }}{{ lipsum }}",
    "{{ range.__globals__ }}",
])
@pytest.mark.parametrize("policy", list(MissingVariablePolicy))
def test_python_internals_are_out_of_reach(source, policy):
    template = compile_template(source, field="t", kind=TemplateKind.TEXT, on_missing=policy)
    result = template.render({"x": "s", "d": {"k": "v"}})
    if isinstance(result, RenderFailure):
        assert result.reason in (FailureReason.MISSING_VARIABLE, FailureReason.RENDER_ERROR)
        text = result.message
    else:
        text = result
    for leak in ("<class", "object at 0x", "builtins", "__main__", "function", "module"):
        assert leak not in text


def test_debug_dump_of_engine_state_is_unavailable():
    failure = failed(compile_template("{{ debug() }}", field="t", kind=TemplateKind.TEXT).render({"secret": "x"}))
    assert failure.reason is FailureReason.RENDER_ERROR
    assert "secret" not in failure.message


def test_python_objects_as_values_fail_the_recipient():
    class Account:
        password = "hunter2"

    campaign = CampaignTemplates.compile(subject="{{ a.password }}")
    failure = failed(campaign.render({"a": Account()}))
    assert (failure.reason, failure.variable) == (FailureReason.INVALID_VARIABLE, "a")


def test_python_objects_as_defaults_are_refused():
    error = refusal(subject="s", defaults={"f": print}, field_prefix="campaign.")
    assert [(v.field, v.reason) for v in error.field_violations] == [
        ("campaign.default_variables.f", "INVALID_VARIABLE")]


@pytest.mark.parametrize("source", [
    "{% for i in range(100000000) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
])
def test_runaway_template_fails_the_recipient_instead_of_hanging(source):
    campaign = CampaignTemplates.compile(subject="s", html=source)
    failure = failed(campaign.render({}))
    assert failure.reason in (FailureReason.TOO_COMPLEX, FailureReason.RENDER_ERROR)
    assert failure.field == "html_body"


@pytest.mark.parametrize("name", ["\r\nBcc: victim@example.com", "line\nbreak", "nul\x00"])
def test_line_break_in_rendered_subject_fails_the_recipient(name):
    campaign = CampaignTemplates.compile(subject="Hi {{ name }}", text="Hi {{ name }}")
    failure = failed(campaign.render({"name": name}))
    assert (failure.reason, failure.field) == (FailureReason.HEADER_INJECTION, "subject")
    assert rendered(campaign.render({"name": "Ann"})).subject == "Hi Ann"


def test_rendered_subject_over_998_characters_fails_the_recipient():
    campaign = CampaignTemplates.compile(subject="{{ s }}")
    assert rendered(campaign.render({"s": "x" * 998})).subject == "x" * 998
    assert failed(campaign.render({"s": "x" * 999})).reason is FailureReason.SUBJECT_TOO_LONG


def test_a_million_recipients_render_in_a_loop_where_some_fail():
    campaign = CampaignTemplates.compile(subject="Hi {{ name }}")
    results = [campaign.render({"name": n} if n else {}) for n in ("Ann", None, "x\ny", "Bob")]
    assert [type(r).__name__ for r in results] == ["RenderedContent", "RenderFailure", "RenderFailure",
                                                    "RenderedContent"]


def test_referenced_variables_are_reported():
    campaign = CampaignTemplates.compile(
        subject="Hi {{ first_name }}",
        text="{% set greeting = 'Hello' %}{{ greeting }}{% for i in items %}{{ i.name }}{{ loop.index }}{% endfor %}"
             "{{ range(2)|join }}",
        html=HTML)
    assert campaign.subject.variables == {"first_name"}
    assert campaign.text is not None and campaign.text.variables == {"items"}
    assert campaign.variables == {"first_name", "items", "note", UNSUBSCRIBE_URL}


@pytest.mark.parametrize("source, plain", [
    ("Hi {{ first_name }}, your code is {{code}}.\n", True),
    ("No variables at all", True),
    (HTML, True),
    ("{{ first_name|title }}", False),
    ("{% if vip %}VIP{% endif %}", False),
    ("{{ order.total }}", False),
    ("{{- name }}", False),
    ("{# comment #}{{ name }}", False),
    ("{{ true }}", False),
])
def test_plain_substitution_is_detected(source, plain):
    assert compile_template(source, field="t", kind=TemplateKind.TEXT).plain_substitution is plain


def test_campaign_is_plain_substitution_only_when_every_template_is():
    assert CampaignTemplates.compile(subject="Hi {{ a }}", html=HTML).plain_substitution
    assert not CampaignTemplates.compile(subject="Hi {{ a|upper }}", html=HTML).plain_substitution


def test_unsubscribe_url_is_the_one_the_expander_gives():
    campaign = CampaignTemplates.compile(subject="s", text="Leave: {{ unsubscribe_url }}", html=HTML,
                                         defaults={"note": ""})
    result = rendered(campaign.render({"first_name": "Ann", UNSUBSCRIBE_URL: "https://evil.example/"},
                                      unsubscribe_url="https://esp.example/u/abc?t=1&s=2"))
    assert result.text == "Leave: https://esp.example/u/abc?t=1&s=2"
    assert result.html is not None and 'href="https:&#x2f;&#x2f;esp.example&#x2f;u&#x2f;abc?t=1&amp;s=2"' in result.html
    assert "evil" not in result.text + result.html


def test_unsubscribe_url_from_the_recipient_alone_is_not_used():
    campaign = CampaignTemplates.compile(subject="s", text="{{ unsubscribe_url }}")
    failure = failed(campaign.render({UNSUBSCRIBE_URL: "https://evil.example/"}))
    assert (failure.reason, failure.variable) == (FailureReason.MISSING_VARIABLE, UNSUBSCRIBE_URL)


def test_unsubscribe_url_is_reserved_for_defaults():
    assert UNSUBSCRIBE_URL in RESERVED_VARIABLES
    error = refusal(subject="s", defaults={UNSUBSCRIBE_URL: "https://x.example/"}, field_prefix="campaign.")
    assert [(v.field, v.reason) for v in error.field_violations] == [
        (f"campaign.default_variables.{UNSUBSCRIBE_URL}", "RESERVED_VARIABLE")]
