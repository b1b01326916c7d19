"""Adapter types by name: ``create_adapter(config)`` builds the adapter ``config.type`` names.

Built-in adapters register themselves when their ``libs.providers.<type>.send`` module is imported; the registry
imports those modules lazily, the first time a lookup needs them, so importing the registry stays cheap and the
webhook side (reports service) never pulls in boto3 or aiosmtplib.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from libs.providers.base import BaseAdapter, ProviderAdapter, ProviderConfig, UnknownProviderType

#: Provider types shipped with the platform, each in ``libs/providers/<type>/send.py``.
BUILTIN_TYPES: tuple[str, ...] = ("smtp", "mailgun", "sendgrid", "ses", "postmark")

AdapterClass = TypeVar("AdapterClass", bound=type[BaseAdapter])

_adapter_classes: dict[str, type[BaseAdapter]] = {}
_builtins_loaded = False


def register(type_name: str) -> Callable[[AdapterClass], AdapterClass]:
    """Class decorator: make ``create_adapter`` build this class for configs with ``type == type_name``."""

    def decorate(cls: AdapterClass) -> AdapterClass:
        existing = _adapter_classes.get(type_name)
        if existing is not None and existing is not cls:
            raise ValueError(f"adapter type {type_name!r} is already registered by {existing.__qualname__}")
        _adapter_classes[type_name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for type_name in BUILTIN_TYPES:
        importlib.import_module(f"libs.providers.{type_name}.send")
    _builtins_loaded = True


def adapter_class(type_name: str) -> type[BaseAdapter]:
    """The class registered for ``type_name``, or ``UnknownProviderType``."""
    _load_builtins()
    try:
        return _adapter_classes[type_name]
    except KeyError:
        known = ", ".join(sorted(_adapter_classes))
        raise UnknownProviderType(f"no provider adapter of type {type_name!r} (known: {known})") from None


def create_adapter(config: ProviderConfig) -> ProviderAdapter:
    """A new adapter for ``config``; raises ``AdapterConfigError`` (or its subclass ``UnknownProviderType``)."""
    return adapter_class(config.type)(config)


def adapter_types() -> list[str]:
    """The registered adapter type names, sorted."""
    _load_builtins()
    return sorted(_adapter_classes)
