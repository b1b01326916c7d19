"""SMTP relays have no delivery webhooks.

An SMTP relay reports the outcome in the SMTP transaction itself (``250`` after the final ``.`` = accepted,
``4xx`` = try again later, ``5xx`` = permanent), which the sender records; later bounces arrive as DSN emails,
not HTTP callbacks. Asking for a webhook handler for ``smtp`` is therefore a configuration mistake and says so
explicitly instead of accepting requests nobody could have signed.
"""

from __future__ import annotations

from libs.providers.webhook_model import HandlerContext, UnsupportedProvider, WebhookHandler

__all__ = [
    "create_handler",
]

PROVIDER_TYPE = "smtp"


def create_handler(context: HandlerContext) -> WebhookHandler:
    """Always raises: SMTP relays send no delivery webhooks.

    Raises:
        UnsupportedProvider: every time.
    """
    raise UnsupportedProvider(
        "smtp relays have no delivery webhooks: outcomes come from the SMTP reply codes at send time "
        "(and DSN bounce emails), not from HTTP callbacks"
    )
