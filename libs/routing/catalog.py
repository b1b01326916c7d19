"""The provider catalog every router and sender replica holds in memory, hot-reloaded from a JetStream KV bucket.

The router writes each provider (Postgres is the truth) to the KV bucket after every change; every replica
watches the bucket, so a create, update, disable or delete reaches all of them in milliseconds, without restart.

Secrets never travel in plain text: the router writes a provider's credentials and webhook signing secrets sealed
(``libs.common.secret_box``, bound to the provider id) as ``sealed_credentials`` / ``sealed_webhook_secrets``, and a
catalog given the :class:`~libs.common.secret_box.SecretBox` of ``ESP_SECRETS_KEYS`` opens them in memory (senders
need the credentials, reports the webhook secrets). A catalog without one (ingest reads size caps only) leaves
them sealed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from libs.common.jetstream import open_kv_bucket, watch_bucket
from libs.common.secret_box import SecretBox, SecretUnreadable
from libs.providers.model import ProviderConfig

__all__ = [
    "ProviderCatalog",
    "ProviderSpec",
    "bucket_name",
    "credentials_context",
    "open_bucket",
    "provider_config",
    "webhook_secrets_context",
]

log = logging.getLogger(__name__)


def credentials_context(provider_id: str) -> str:
    """What a provider's sealed credentials are bound to (the same in Postgres and in the KV bucket)."""
    return f"router.provider_credentials/{provider_id}"


def webhook_secrets_context(provider_id: str) -> str:
    """What a provider's sealed webhook signing secrets are bound to."""
    return f"router.provider_webhook_secrets/{provider_id}"


@dataclass(frozen=True)
class ProviderSpec:
    """One provider account as routing and sending need it. Its secrets (credentials, webhook secrets) are held in
    plain text in memory only: the KV value seals them (:meth:`to_json` with a box), ``repr`` leaves them out."""

    id: str
    type: str
    endpoint: str
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    region: str = ""
    display_name: str = ""
    price_per_email_micros: int = 0
    price_per_mb_micros: int = 0
    max_message_bytes: int = 0
    """0 means the adapter's own cap."""
    batch_size: int = 0
    rate_limit_per_second: float = 0.0
    daily_quota: int = 0
    monthly_quota: int = 0
    allowed_classes: tuple[str, ...] = ()
    """Empty means every class."""
    weight: float = 1.0
    disabled: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    version: int = 0
    webhook_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """What verifies the provider's delivery webhooks (keys per type: ``libs/providers/<type>/webhook.py``)."""
    sealed_credentials: str = field(default="", compare=False, repr=False)
    """The credentials as the KV value carried them (base64 of a sealed value), kept when they could not be opened
    here; not part of equality (every seal differs)."""
    sealed_webhook_secrets: str = field(default="", compare=False, repr=False)
    """The same for the webhook secrets."""

    @property
    def secrets_unopened(self) -> bool:
        """Whether the KV value carried sealed secrets this process did not open (no key, or not the right one)."""
        return bool((self.sealed_credentials and not self.credentials)
                    or (self.sealed_webhook_secrets and not self.webhook_secrets))

    def to_json(self, secrets: SecretBox | None = None) -> bytes:
        """The KV bucket's value for this provider. With ``secrets`` (what the router always passes) the
        credentials and webhook secrets are sealed, bound to the provider id, and no plain secret is written;
        without, they are written as they are (test fixtures of providers whose secrets are no secret)."""
        data = asdict(self)
        if secrets is not None:
            data["credentials"], data["webhook_secrets"] = {}, {}
            data["sealed_credentials"] = _seal_map(secrets, self.credentials, credentials_context(self.id))
            data["sealed_webhook_secrets"] = _seal_map(secrets, self.webhook_secrets,
                                                       webhook_secrets_context(self.id))
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, secrets: SecretBox | None = None) -> ProviderSpec:
        """A provider from its KV value, its sealed secrets opened with ``secrets`` when given (a value that does
        not open is logged, without its content, and left sealed); fields this version does not know are
        ignored."""
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}  # forward compatible: ignore unknown fields
        data["allowed_classes"] = tuple(data.get("allowed_classes", ()))
        provider_id = str(data.get("id", ""))
        if secrets is not None:
            for name, context in (("credentials", credentials_context(provider_id)),
                                  ("webhook_secrets", webhook_secrets_context(provider_id))):
                sealed = data.get(f"sealed_{name}", "")
                if sealed:
                    opened = _open_map(secrets, sealed, context)
                    if opened is not None:
                        data[name] = opened
        return cls(**data)

    def carries(self, message_class: str) -> bool:
        """Whether the provider may carry emails of ``message_class``."""
        return not self.allowed_classes or message_class in self.allowed_classes

    def price_micros(self, message_bytes: int) -> float:
        """What the provider charges for one email of ``message_bytes`` (price per email + price per MB)."""
        return self.price_per_email_micros + self.price_per_mb_micros * message_bytes / 1_000_000


DEFAULT_TIMEOUT_S = 10.0


def provider_config(spec: ProviderSpec) -> ProviderConfig:
    """The adapter configuration a provider's registry entry describes (option ``timeout_s`` sets how long a
    send may wait for the provider's answer)."""
    try:
        timeout = float(spec.options.get("timeout_s", DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout = DEFAULT_TIMEOUT_S
    return ProviderConfig(name=spec.id, type=spec.type, endpoint=spec.endpoint, credentials=dict(spec.credentials),
                          region=spec.region, options=dict(spec.options), timeout_s=timeout)


def _seal_map(secrets: SecretBox, values: Mapping[str, str], context: str) -> str:
    if not values:
        return ""
    plaintext = json.dumps(dict(values), sort_keys=True, separators=(",", ":")).encode()
    return base64.b64encode(secrets.seal(plaintext, context=context)).decode("ascii")


def _open_map(secrets: SecretBox, sealed: str, context: str) -> dict[str, str] | None:
    try:
        opened = json.loads(secrets.open(base64.b64decode(sealed, validate=True), context=context))
    except (SecretUnreadable, binascii.Error, ValueError):
        log.error("a provider's sealed secrets do not open with ESP_SECRETS_KEYS (missing or rotated key?)",
                  extra={"context": context})
        return None
    return {str(k): str(v) for k, v in opened.items()}


def bucket_name(namespace: str) -> str:
    """The providers KV bucket of one mesh."""
    return f"{namespace}_providers" if namespace else "providers"


async def open_bucket(js: JetStreamContext, namespace: str) -> KeyValue:
    """The providers KV bucket, created on first use."""
    return await open_kv_bucket(js, bucket_name(namespace))


class ProviderCatalog:
    """In-memory view of the KV bucket, kept current by a watcher; readers see a consistent snapshot dict."""

    def __init__(self, kv: KeyValue, secrets: SecretBox | None = None) -> None:
        """``secrets`` opens the providers' sealed credentials and webhook secrets (without it they stay sealed)."""
        self.kv = kv
        self._secrets = secrets
        self._providers: dict[str, ProviderSpec] = {}
        self._listeners: list[Callable[[str, ProviderSpec | None], None]] = []
        self._loaded = asyncio.Event()

    @property
    def providers(self) -> Mapping[str, ProviderSpec]:
        """The current providers by id: a snapshot that is replaced, never changed, on every update."""
        return self._providers

    def on_change(self, listener: Callable[[str, ProviderSpec | None], None]) -> None:
        """Call ``listener(id, spec or None when removed)`` on every change (e.g. to drop a stale adapter)."""
        self._listeners.append(listener)

    async def wait_loaded(self, timeout_s: float = 10.0) -> None:
        """Wait until the bucket's initial contents are in (``TimeoutError`` after ``timeout_s``)."""
        await asyncio.wait_for(self._loaded.wait(), timeout_s)

    def _apply(self, key: str, spec: ProviderSpec | None) -> None:
        updated = dict(self._providers)
        if spec is None:
            updated.pop(key, None)
        else:
            updated[key] = spec
        self._providers = updated
        for listener in self._listeners:
            try:
                listener(key, spec)
            except Exception:
                log.exception("provider change listener failed")

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the bucket until ``stop``; re-watches after connection trouble."""
        await watch_bucket(self.kv, self._take, self._loaded, stop, what="provider catalog")

    def _take(self, key: str, value: bytes | None) -> None:
        self._apply(key, None if value is None else ProviderSpec.from_json(value, self._secrets))
