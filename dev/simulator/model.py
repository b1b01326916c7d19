"""What the simulator is made of: personalities (named provider instances), their knobs, and what it records."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from libs.providers.model import ProviderConfig

PROVIDER_TYPES = ("mailgun", "sendgrid", "ses", "postmark", "smtp")
DOMAIN_STATES = ("verified", "pending", "failed")
"""What the simulator may say of a registered sending domain (each provider in its own words)."""
#: Longest text/html excerpt kept per recorded message.
EXCERPT_CHARS = 2000
#: Largest DKIM-signed raw message kept whole per recorded message (``SimMessage.raw_mime``).
RAW_MIME_LIMIT = 1024 * 1024


@dataclass
class Knobs:
    """Runtime behaviour of one personality; every field can be changed through ``PATCH /_sim/…/knobs``."""

    latency_ms: float = 0.0
    """Fixed delay before every answer."""
    jitter_ms: float = 0.0
    """Uniform random extra delay in [0, jitter_ms] on top of ``latency_ms``."""
    error_rate: float = 0.0
    """Probability of a server error (HTTP 500 in the provider's format; SMTP 450) after validation."""
    throttle_rps: float | None = None
    """Requests per second above which the answer is 429 (SMTP 454) with ``Retry-After``; None = no limit."""
    retry_after_s: float = 1.0
    """The ``Retry-After`` value sent with throttling answers."""
    outage: bool = False
    """While true every request fails as unavailable (HTTP 503; SMTP 421)."""
    outage_for_s: float | None = None
    """Setting this starts an outage that ends by itself after that many seconds."""
    daily_quota: int | None = None
    """Messages accepted per UTC day before the provider's quota error; None = unlimited."""
    hang_rate: float = 0.0
    """Probability of accepting a request (it is recorded as delivered) and then answering only after
    ``hang_s`` — past the client's timeout: the ambiguous case."""
    hang_s: float = 30.0
    bounce_rate: float = 0.0
    """Share of accepted recipients reported as hard bounces by webhook."""
    complaint_rate: float = 0.0
    """Share of accepted recipients reported as delivered and then complained about."""
    webhook_url: str | None = None
    """Where delivery webhooks for this personality are POSTed; None = no webhooks."""
    webhook_delay_ms: float = 500.0
    """Delay between accepting a message and its first webhook (plus up to ``webhook_jitter_ms``)."""
    webhook_jitter_ms: float = 500.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Knobs | None = None) -> Knobs:
        """``base`` (or defaults) with ``values`` applied; raises ``ValueError`` naming every bad key."""
        current = asdict(base or cls())
        known = {f.name: f for f in fields(cls)}
        problems = [f"unknown knob {key!r}" for key in values if key not in known]
        for key, value in values.items():
            if key not in known:
                continue
            default = getattr(cls(), key)
            try:
                current[key] = _coerce(key, value, default)
            except (TypeError, ValueError) as exc:
                problems.append(f"{key}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        knobs = cls(**current)
        for rate in ("error_rate", "hang_rate", "bounce_rate", "complaint_rate"):
            if not 0.0 <= getattr(knobs, rate) <= 1.0:
                problems.append(f"{rate} must be within [0, 1]")
        if knobs.bounce_rate + knobs.complaint_rate > 1.0:
            problems.append("bounce_rate + complaint_rate must not exceed 1")
        if problems:
            raise ValueError("; ".join(problems))
        return knobs

    def to_json(self) -> dict[str, Any]:
        """The knobs as JSON-ready values."""
        return asdict(self)


_OPTIONAL_FLOATS = {"throttle_rps", "outage_for_s"}
_OPTIONAL_INTS = {"daily_quota"}
_OPTIONAL_STRINGS = {"webhook_url"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    if value is None:
        if key in _OPTIONAL_FLOATS | _OPTIONAL_INTS | _OPTIONAL_STRINGS:
            return None
        raise ValueError("may not be null")
    if key in _OPTIONAL_STRINGS:
        if not isinstance(value, str):
            raise TypeError("must be a string")
        return value
    if isinstance(default, bool) or key == "outage":
        if not isinstance(value, bool):
            raise TypeError("must be true or false")
        return value
    if key in _OPTIONAL_INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError("must be a non-negative integer")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError("must be a non-negative number")
    return float(value)


@dataclass(frozen=True)
class Personality:
    """One simulated provider instance: reachable at ``/p/<name>/…`` (HTTP) or by SMTP AUTH user ``<user>``."""

    name: str
    type: str
    credentials: Mapping[str, str]
    """mailgun: api_key, domain, webhook_signing_key; sendgrid: api_key, webhook_private_key_pem (optional);
    ses: access_key_id, secret_access_key; postmark: server_token, webhook_user, webhook_password, account_token
    (the domains API's; optional); smtp: username, password."""
    region: str = ""
    knobs: Knobs = field(default_factory=Knobs)
    """The knobs the personality starts with (and returns to on reset)."""

    def provider_config(self, http_url: str, smtp_host: str, smtp_port: int, **overrides: Any) -> ProviderConfig:
        """A ``ProviderConfig`` for the matching adapter, pointing at this personality in a running simulator."""
        options: dict[str, str] = {}
        credentials: dict[str, str]
        if self.type == "mailgun":
            endpoint = f"{http_url}/p/{self.name}"
            credentials = {"api_key": self.credentials["api_key"]}
            options["domain"] = self.credentials["domain"]
        elif self.type == "sendgrid":
            endpoint = f"{http_url}/p/{self.name}"
            credentials = {"api_key": self.credentials["api_key"]}
        elif self.type == "ses":
            endpoint = f"{http_url}/p/{self.name}"
            credentials = {
                "access_key_id": self.credentials["access_key_id"],
                "secret_access_key": self.credentials["secret_access_key"],
            }
        elif self.type == "postmark":
            endpoint = f"{http_url}/p/{self.name}"
            credentials = {"server_token": self.credentials["server_token"]}
            if self.credentials.get("account_token"):
                credentials["account_token"] = self.credentials["account_token"]
        else:
            endpoint = f"{smtp_host}:{smtp_port}"
            credentials = {"username": self.credentials["username"], "password": self.credentials["password"]}
            options["tls"] = "none"
        values: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "endpoint": endpoint,
            "credentials": credentials,
            "region": self.region,
            "options": options,
        }
        values.update(overrides)
        return ProviderConfig(**values)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (credentials included: they are fake and tests need them)."""
        return {"name": self.name, "type": self.type, "region": self.region, "credentials": dict(self.credentials)}


def default_personalities() -> list[Personality]:
    """The personalities a simulator has when no file is given."""
    return [
        Personality(
            "mailgun-us", "mailgun",
            {"api_key": "key-mailgun-us", "domain": "mg.example.com", "webhook_signing_key": "mailgun-us-signing"},
            region="us",
        ),
        Personality(
            "mailgun-eu", "mailgun",
            {"api_key": "key-mailgun-eu", "domain": "eu.mg.example.com", "webhook_signing_key": "mailgun-eu-signing"},
            region="eu",
        ),
        Personality("sendgrid-1", "sendgrid", {"api_key": "SG.sendgrid-1.simulated"}),
        Personality(
            "ses-1", "ses", {"access_key_id": "AKIASIMULATED0SES1", "secret_access_key": "ses-1-secret"},
            region="us-east-1",
        ),
        Personality(
            "postmark-1", "postmark",
            {"server_token": "postmark-1-token", "webhook_user": "postmark", "webhook_password": "postmark-1-hook",
             "account_token": "postmark-1-account"},
        ),
        Personality("smtp-1", "smtp", {"username": "smtp-1", "password": "smtp-1-password"}),
    ]


def load_personalities(path: Path) -> list[Personality]:
    """Personalities from a JSON file: ``{"personalities": [{"name", "type", "credentials", "region"?,
    "knobs"?}, …]}``; raises ``ValueError`` describing every problem."""
    document = json.loads(path.read_text())
    entries = document.get("personalities") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty 'personalities' list")
    personalities: list[Personality] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{path}: personalities[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        name, kind = entry.get("name"), entry.get("type")
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"{where}: 'name' must be a non-empty string without '/'")
            continue
        if kind not in PROVIDER_TYPES:
            problems.append(f"{where}: 'type' must be one of {', '.join(PROVIDER_TYPES)}")
            continue
        credentials = entry.get("credentials", {})
        if not isinstance(credentials, dict) or not all(isinstance(v, str) for v in credentials.values()):
            problems.append(f"{where}: 'credentials' must map names to strings")
            continue
        try:
            knobs = Knobs.from_mapping(entry.get("knobs", {}))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        personalities.append(Personality(name, kind, credentials, str(entry.get("region", "")), knobs))
    names = [p.name for p in personalities]
    problems.extend(f"{path}: duplicate personality {n!r}" for n in sorted({n for n in names if names.count(n) > 1}))
    if problems:
        raise ValueError("\n".join(problems))
    return personalities


@dataclass(frozen=True)
class SimDomain:
    """A sending domain registered at one personality."""

    name: str
    id: int
    """The provider's numeric id for it (SendGrid, Postmark)."""
    created_at: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class AttachmentInfo:
    """An attachment as the simulator received it (contents reduced to a hash)."""

    filename: str
    content_type: str
    size: int
    sha256: str
    content_id: str | None = None
    inline: bool = False


def signed_raw_mime(raw: bytes) -> str | None:
    """What ``SimMessage.raw_mime`` keeps of a raw message: its base64 when its headers carry a DKIM-Signature
    and it is at most ``RAW_MIME_LIMIT`` bytes, else None."""
    head = b"\n" + raw.partition(b"\r\n\r\n")[0].lower()
    if len(raw) > RAW_MIME_LIMIT or b"\ndkim-signature:" not in head:
        return None
    return base64.b64encode(raw).decode()


@dataclass
class SimMessage:
    """One message a provider request asked to send (a batch request holds several)."""

    sender: str
    to: list[str]
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    sender_name: str = ""
    to_names: list[str] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    esp_message_id: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    attachments: list[AttachmentInfo] = field(default_factory=list)
    provider_message_id: str = ""
    rejection: str | None = None
    """Why this message of a batch was refused on its own (the request as a whole may still succeed)."""
    rejection_code: int | None = None
    raw_mime: str | None = None
    """The MIME document as received, base64, for a raw-MIME message that carries a ``DKIM-Signature`` (tests
    verify it as a receiver would); None otherwise, and beyond ``RAW_MIME_LIMIT`` bytes (the request log is held in
    memory)."""

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: to, cc and bcc."""
        return [*self.to, *self.cc, *self.bcc]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form with long bodies cut to an excerpt."""
        data = asdict(self)
        data["recipients"] = self.recipients
        data["text"] = self.text[:EXCERPT_CHARS] if self.text is not None else None
        data["html"] = self.html[:EXCERPT_CHARS] if self.html is not None else None
        return data


@dataclass
class RequestRecord:
    """One request the simulator received, whatever it answered."""

    seq: int
    personality: str
    provider: str
    received_at: float
    method: str
    path: str
    status: int
    """HTTP status answered, or the SMTP reply code."""
    result: str
    """accepted | sandbox | invalid | unauthorized | throttled | quota | error | outage | hung | not_found."""
    reason: str = ""
    messages: list[SimMessage] = field(default_factory=list)
    request_headers: dict[str, str] = field(default_factory=dict)
    """The request's headers that tests check (authorization scheme, content type, length, accept)."""
    arrived_at: float | None = None
    """When the request arrived (epoch seconds), before its body was read or any latency knob applied;
    ``received_at`` is when it was answered. None for records that only know the latter."""

    @property
    def delivered(self) -> bool:
        """Whether the messages of this request were taken for delivery."""
        return self.result in {"accepted", "hung"}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "seq": self.seq,
            "personality": self.personality,
            "provider": self.provider,
            "received_at": self.received_at,
            "arrived_at": self.arrived_at if self.arrived_at is not None else self.received_at,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "result": self.result,
            "reason": self.reason,
            "delivered": self.delivered,
            "request_headers": self.request_headers,
            "messages": [m.to_json() for m in self.messages],
        }
