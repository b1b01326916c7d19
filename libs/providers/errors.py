"""Every exception the provider layer raises, in one tree.

A provider's answer — accepted, throttled, refused, no answer — is never an exception: the base adapter turns it
into a ``SendResult`` with an ``Outcome``. These exceptions are for what is found *before* any network call (the
email cannot go to this provider, or the provider cannot be built) and for an attachment stream that breaks the
size it announced. The sender routes around ``UnsupportedFeature`` and ``MessageTooLarge`` (another provider may
take the email) and fails the email on ``InvalidMessage`` (no provider will)::

    ProviderError                  base of everything below
    ├── AdapterConfigError         a provider's configuration is incomplete or invalid
    │   └── UnknownProviderType    no adapter is registered under the configured type
    ├── InvalidMessage             the email cannot be sent anywhere as it is (no recipients, no body, bad header)
    ├── UnsupportedFeature         the email uses something this provider cannot do (too many tags …)
    │   └── TooManyRecipients      more recipients than one message at this provider may have
    ├── MessageTooLarge            the encoded email exceeds this provider's size cap
    └── AttachmentSizeMismatch     an attachment streamed a different number of bytes than it declared
"""

from __future__ import annotations

__all__ = [
    "AdapterConfigError",
    "AttachmentSizeMismatch",
    "InvalidMessage",
    "MessageTooLarge",
    "ProviderError",
    "TooManyRecipients",
    "UnknownProviderType",
    "UnsupportedFeature",
]


class ProviderError(Exception):
    """Base of every error the provider layer raises."""


class AdapterConfigError(ProviderError):
    """A provider configuration is incomplete or invalid."""


class UnknownProviderType(AdapterConfigError):
    """No adapter is registered under the configured type."""


class InvalidMessage(ProviderError):
    """The email cannot be sent anywhere as it is (no recipients, no body …)."""


class UnsupportedFeature(ProviderError):
    """The email uses something this provider cannot do; route it to another provider."""

    def __init__(self, provider_type: str, feature: str) -> None:
        super().__init__(f"{provider_type} does not support {feature}")
        self.provider_type = provider_type
        self.feature = feature


class TooManyRecipients(UnsupportedFeature):
    """More recipients than one message at this provider may have."""

    def __init__(self, provider_type: str, count: int, limit: int) -> None:
        super().__init__(provider_type, f"{count} recipients in one message (limit {limit})")
        self.count = count
        self.limit = limit


class MessageTooLarge(ProviderError):
    """The encoded message exceeds the provider's cap; raised before any network call."""

    def __init__(self, provider_type: str, size: int, limit: int) -> None:
        super().__init__(f"message of {size} encoded bytes exceeds the {provider_type} cap of {limit} bytes")
        self.provider_type = provider_type
        self.size = size
        self.limit = limit


class AttachmentSizeMismatch(ProviderError):
    """An attachment stream yielded a different number of bytes than its declared size."""
