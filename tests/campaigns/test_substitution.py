"""Which campaign emails travel unrendered: exactly those whose placeholder values reproduce the engine's render."""

from __future__ import annotations

from services.campaigns.substitution import Substitution
from services.campaigns.templates import CampaignTemplates, MissingVariablePolicy, RenderedContent


def _values(templates: CampaignTemplates, variables: dict[str, object],
            url: str | None = None) -> dict[str, str] | None:
    substitution = Substitution.of(templates)
    assert substitution is not None
    context = templates.context(variables, unsubscribe_url=url)  # type: ignore[arg-type]
    assert isinstance(context, dict)
    rendered = templates.render_context(context)
    assert isinstance(rendered, RenderedContent)
    return substitution.values(context, rendered, url)


def test_a_template_with_logic_travels_rendered() -> None:
    templates = CampaignTemplates.compile(subject="Hi", text="{% if vip %}gold{% endif %}")
    assert Substitution.of(templates) is None


def test_plain_placeholders_travel_with_the_recipients_values() -> None:
    templates = CampaignTemplates.compile(subject="Hi {{ name }}", text="Code {{code}}", defaults={"code": "X"})
    assert _values(templates, {"name": "Ann"}) == {"name": "Ann", "code": "X"}


def test_the_unsubscribe_url_travels_as_a_value() -> None:
    templates = CampaignTemplates.compile(subject="Hi {{ name }}", text="Leave: {{ unsubscribe_url }}")
    values = _values(templates, {"name": "Ann"}, url="https://esp.example/u/tok")
    assert values == {"name": "Ann", "unsubscribe_url": "https://esp.example/u/tok"}


def test_a_value_the_html_template_would_escape_travels_rendered() -> None:
    templates = CampaignTemplates.compile(subject="Hi", html="<p>{{ name }}</p>")
    assert _values(templates, {"name": "Ann & Bob"}) is None
    assert _values(templates, {"name": "Ann"}) == {"name": "Ann"}


def test_a_value_that_is_not_a_string_travels_rendered() -> None:
    templates = CampaignTemplates.compile(subject="Hi {{ vip }}", text="x")
    assert _values(templates, {"vip": True}) is None


def test_a_missing_variable_under_the_empty_policy_travels_as_an_empty_value() -> None:
    templates = CampaignTemplates.compile(subject="Hi {{ name }}", text="x", on_missing=MissingVariablePolicy.EMPTY)
    assert _values(templates, {}) == {"name": ""}
