"""Settings read once from ``ESP_*`` environment variables into frozen dataclasses.

Each field ``foo_bar`` of a settings dataclass is read from ``ESP_FOO_BAR``. Values are parsed by the field's type
(str, int, float, bool, tuple[str, ...]); every missing or malformed key is collected and reported at once, so a
bad deployment fails at start with the whole list instead of one error per restart.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = [
    "CommonSettings",
    "SettingsError",
    "check_positive",
    "env_name",
    "load_settings",
    "settings_env",
]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """One or more ``ESP_*`` variables are missing or malformed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


def env_name(field_name: str, prefix: str = "ESP_") -> str:
    """The variable a field is read from."""
    return prefix + field_name.upper()


def _parse(raw: str, target: Any) -> Any:
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(target) if a is not type(None)]
        return None if raw == "" else _parse(raw, inner[0])
    if origin is tuple:
        (item, *_rest) = typing.get_args(target)
        return tuple(_parse(part.strip(), item) for part in raw.split(",") if part.strip())
    if target is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if target is int:
        return int(raw)
    if target is float:
        return float(raw)
    if target is str:
        return raw
    raise TypeError(f"unsupported settings type {target!r}")


def load_settings(cls: type[T], env: Mapping[str, str] | None = None, prefix: str = "ESP_") -> T:
    """Build ``cls`` from the environment, raising :class:`SettingsError` listing every bad key."""
    source = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = env_name(field.name, prefix)
        no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in source:
            if no_default:
                problems.append(f"{name}: required")
            continue
        try:
            values[field.name] = _parse(source[name], hints[field.name])
        except (ValueError, TypeError) as exc:
            problems.append(f"{name}: {exc}")
    if not problems:
        try:
            return cls(**values)
        except ValueError as exc:  # __post_init__ validation of value ranges
            problems.append(str(exc))
    raise SettingsError(problems)


def settings_env(settings: object, prefix: str = "ESP_") -> dict[str, str]:
    """The ``ESP_*`` variables :func:`load_settings` would read back into ``settings`` (a worker process started
    by a service gets its parent's settings this way, however the parent got them)."""
    env: dict[str, str] = {}
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, field.name)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        env[env_name(field.name, prefix)] = text
    return env


def check_positive(instance: object, *names: str) -> None:
    """For ``__post_init__``: each named field must be > 0; all offenders are reported together."""
    bad = [f"{env_name(n)}: must be > 0, got {getattr(instance, n)!r}" for n in names if getattr(instance, n) <= 0]
    if bad:
        raise ValueError("; ".join(bad))


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """Settings every service reads."""

    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/esp"
    """Postgres of record (each service owns a schema in it)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"
    """One NATS server, or a cluster's nodes separated by commas."""
    stream_replicas: int = 1
    """How many servers of the NATS cluster keep each JetStream stream (1 to 5; 3 in production, where one
    node may be lost without losing a stored email). A single server takes only 1."""
    namespace: str = ""
    """Prefix of JetStream stream names, subjects and Redis keys; lets several meshes (test runs) share servers."""
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    """0 means the service's default port."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 disables the endpoint."""
    log_level: str = "INFO"
    log_format: str = "json"
    """"json" (one object a line) or "text"."""
    otel_exporter_otlp_endpoint: str = ""
    """When set, spans are exported over OTLP; otherwise tracing is in-process only."""
    shutdown_grace_s: float = 10.0
    """How long in-flight RPCs and messages get to finish after SIGTERM."""
    niceness: int = 0
    """Added to the process's nice value at start (0-19), and to its session's when it leads one (autogroup
    scheduling: ``libs.common.priority``): on a machine shared by several services, background work (reports'
    analytics) yields the CPU to the send path. On Kubernetes each service's CPU requests do this."""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "esp-attachments"
    s3_access_key: str = ""
    s3_secret_key: str = dataclasses.field(default="", repr=False)
    secrets_keys: str = dataclasses.field(default="", repr=False)
    """Key-encryption keys of the secrets sealed at rest (provider credentials, provider webhook signing secrets),
    ``<key id>:<base64 32 bytes>`` separated by commas (``libs.common.secret_box.generate_key_setting`` makes one):
    the first seals, every one opens (rotate by putting a new key first). A secret: from a Kubernetes Secret, never
    a ConfigMap or a log. Read by the router (seals), the senders and reports (open the catalog's sealed values)."""
    sandbox_domains: tuple[str, ...] = ()
    """The platform's shared sandbox sending domains: every tenant may send from them (and their subdomains)
    without verifying a domain of its own; the upstream provider signs such mail, and every provider counts as
    ready for them. Read by ingest (who may send), the router and the senders (routing)."""
    ingest_addr: str = "127.0.0.1:50051"
    router_addr: str = "127.0.0.1:50052"
    ledger_addr: str = "127.0.0.1:50053"
    reports_addr: str = "127.0.0.1:50054"
    campaigns_addr: str = "127.0.0.1:50056"
    webhooks_addr: str = "127.0.0.1:50057"
