"""Which campaign emails can travel unrendered, their ``{{ name }}`` placeholders filled in by the provider.

A campaign's emails rendered one by one all differ, so the sender can group none of them into a provider's batch
call: one call per email. When every template of a campaign is a plain substitution (literal text and
``{{ name }}`` placeholders only), an email can instead carry the templates as they are plus its recipient's values
(``SendTask.recipient_variables``); emails of one campaign then differ only in recipient and values, and Mailgun
(recipient-variables) or SendGrid (substitutions) take up to 1,000 of them in one call, while other providers get
them substituted by the sender.

The engine still renders every recipient (its checks — a control character in the subject, a body too large — and
its failures stay the truth), and an email goes unrendered only when substituting its values into the templates
gives exactly what the engine rendered: a value the HTML template would escape, or one that is not a string (the
engine writes ``true``, Python ``True``), sends that recipient's email rendered instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.campaigns.templates import CampaignTemplates, MissingVariablePolicy, RenderedContent, Value

__all__ = ["UNSUBSCRIBE_PLACEHOLDER", "Substitution"]

_PLACEHOLDER = re.compile(r"\{\{[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\}\}")
UNSUBSCRIBE_PLACEHOLDER = "{{ unsubscribe_url }}"
"""How the one-click URL appears in an unrendered email's List-Unsubscribe header."""


def _substitute(template: str | None, values: Mapping[str, str]) -> str | None:
    if template is None:
        return None
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


@dataclass(frozen=True)
class Substitution:
    """A campaign's templates as they travel unrendered."""

    subject: str
    text: str | None
    html: str | None
    names: frozenset[str]
    """Every placeholder the templates hold."""
    on_missing: MissingVariablePolicy

    @classmethod
    def of(cls, templates: CampaignTemplates) -> Substitution | None:
        """The unrendered form of ``templates``; None when one of them is more than a plain substitution."""
        if not templates.plain_substitution:
            return None
        return cls(subject=templates.subject.source, text=templates.text.source if templates.text else None,
                   html=templates.html.source if templates.html else None, names=templates.variables,
                   on_missing=templates.on_missing)

    def values(self, context: Mapping[str, Value], rendered: RenderedContent,
               unsubscribe_url: str | None) -> dict[str, str] | None:
        """The recipient's placeholder values, or None when substituting them would not give ``rendered`` (the
        email then travels rendered)."""
        values: dict[str, str] = {}
        for name in self.names:
            value = context.get(name)
            if value is None and name not in context and self.on_missing is MissingVariablePolicy.EMPTY:
                value = ""
            if type(value) is not str:
                return None
            values[name] = value
        if (_substitute(self.subject, values) != rendered.subject or _substitute(self.text, values) != rendered.text
                or _substitute(self.html, values) != rendered.html):
            return None
        if unsubscribe_url is not None:
            values["unsubscribe_url"] = unsubscribe_url
        return values
