"""Adapter types by name: ``create_adapter(config)`` builds the adapter ``config.type`` names.

The built-in types are the rows of ``libs.providers.capabilities.DEFAULT_CAPABILITIES``; each lives in
``libs/providers/<type>/send.py``, whose ``ADAPTER`` is its class. The registry imports a type's module the first
time a lookup needs it, so importing the registry pulls in neither boto3 nor aiosmtplib, and the send modules
never import the registry: the dependency runs one way.
"""

from __future__ import annotations

import importlib

from libs.providers.base import BaseAdapter, ProviderAdapter
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.providers.errors import UnknownProviderType
from libs.providers.model import ProviderConfig

__all__ = [
    "BUILTIN_TYPES",
    "adapter_class",
    "adapter_types",
    "create_adapter",
]

#: Provider types shipped with the platform, each in ``libs/providers/<type>/send.py``.
BUILTIN_TYPES: tuple[str, ...] = tuple(DEFAULT_CAPABILITIES)

_adapter_classes: dict[str, type[BaseAdapter]] = {}


def adapter_class(type_name: str) -> type[BaseAdapter]:
    """The adapter class of ``type_name``, or ``UnknownProviderType``."""
    found = _adapter_classes.get(type_name)
    if found is None:
        if type_name not in BUILTIN_TYPES:
            known = ", ".join(sorted(BUILTIN_TYPES))
            raise UnknownProviderType(f"no provider adapter of type {type_name!r} (known: {known})")
        module = importlib.import_module(f"libs.providers.{type_name}.send")
        found = _adapter_classes[type_name] = module.ADAPTER
    return found


def create_adapter(config: ProviderConfig) -> ProviderAdapter:
    """A new adapter for ``config``; raises ``AdapterConfigError`` (or its subclass ``UnknownProviderType``)."""
    return adapter_class(config.type)(config)


def adapter_types() -> list[str]:
    """The adapter type names, sorted."""
    return sorted(BUILTIN_TYPES)
