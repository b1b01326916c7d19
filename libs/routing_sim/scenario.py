"""A market scenario: providers, what happens to them during a day, and the traffic that day brings.

Scenarios are TOML files (``libs/routing_sim/scenarios/*.toml`` ship with the package). ``load`` reads and
validates one; every mistake is reported as a ``ScenarioError`` naming the field (``providers[2].latency.p99_ms:
must be >= median_ms``), so a platform engineer writing a what-if gets told what to fix, not a traceback.

Times are hours of the simulated day (``at_h = 14.5`` is 14:30); the day is a real 24-hour day with production
volume scaled down (``traffic.emails`` a day), so breaker windows, Retry-After pauses and rate limits keep their
real durations while a day simulates in seconds. Quotas and rate limits in a scenario are at that scale.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from libs.common.message_classes import MessageClass
from libs.providers.capabilities import DEFAULT_CAPABILITIES
from libs.routing.pacing import DAY_S

__all__ = [
    "EVENT_KINDS",
    "SHIPPED_SCENARIOS",
    "CampaignBurst",
    "LatencyModel",
    "MarketEvent",
    "Scenario",
    "ScenarioError",
    "SimProvider",
    "SizeModel",
    "Spike",
    "Traffic",
    "load",
    "parse",
    "shipped",
]

Z99 = 2.3263478740408408
"""The standard normal's 99th percentile: a lognormal's p99 is median · exp(Z99 · sigma)."""
EVENT_KINDS = ("outage", "brownout", "throttle", "quota_cut", "price_change")
SHIPPED_SCENARIOS = Path(__file__).with_name("scenarios")


class ScenarioError(ValueError):
    """A scenario file that cannot be simulated; the message names the field and what is wrong."""


@dataclass(frozen=True)
class LatencyModel:
    """A provider's call latency: lognormal with this median and 99th percentile."""

    median_ms: float
    p99_ms: float

    @property
    def sigma(self) -> float:
        """The lognormal's shape parameter."""
        return math.log(self.p99_ms / self.median_ms) / Z99


@dataclass(frozen=True)
class SimProvider:
    """One provider account of the market (what the catalog entry says, plus how the provider behaves)."""

    id: str
    type: str
    price_per_email_micros: int
    price_per_mb_micros: int
    latency: LatencyModel
    error_rate: float = 0.0
    """Share of calls that fail (5xx) on a normal day."""
    daily_quota: int = 0
    monthly_quota: int = 0
    rate_limit_per_second: float = 0.0
    max_message_bytes: int = 0
    """0: the type's own cap (``libs.providers.capabilities``)."""
    classes: tuple[str, ...] = ()
    """Classes the account may carry; empty: every class."""
    region: str = ""


@dataclass(frozen=True)
class MarketEvent:
    """Something that happens to one provider from ``start_s`` until ``end_s`` (seconds of the day).

    - ``outage``: every call fails at once (connection refused).
    - ``brownout``: calls take ``latency_factor`` times as long and ``error_rate`` of them fail (a silent
      brown-out has ``error_rate = 0``: slow, not failing).
    - ``throttle``: the provider takes at most ``rate_per_second`` calls a second and answers the rest 429 with
      ``Retry-After: retry_after_s``.
    - ``quota_cut``: the account's daily quota becomes ``daily_quota`` (the platform team updates the registry).
    - ``price_change``: the prices become ``price_per_email_micros`` / ``price_per_mb_micros`` (the registry is
      updated at runtime). Quota cuts and price changes last for the rest of the day.
    """

    kind: str
    provider: str
    start_s: float
    end_s: float
    latency_factor: float = 1.0
    error_rate: float = 0.0
    rate_per_second: float = 0.0
    retry_after_s: float = 0.0
    daily_quota: int = 0
    price_per_email_micros: int = 0
    price_per_mb_micros: int = 0

    def active(self, at_s: float) -> bool:
        """Whether the event is under way at ``at_s``."""
        return self.start_s <= at_s < self.end_s


@dataclass(frozen=True)
class SizeModel:
    """Encoded message sizes of one class: a lognormal body, and sometimes attachments."""

    median_bytes: int
    sigma: float = 0.5
    attachment_share: float = 0.0
    """Share of emails carrying attachments."""
    attachment_median_bytes: int = 0
    attachment_sigma: float = 1.0
    max_bytes: int = 150 * 1024 * 1024


@dataclass(frozen=True)
class Spike:
    """Traffic multiplied by ``factor`` between two hours of the day (Black Friday's evening)."""

    start_h: float
    end_h: float
    factor: float


@dataclass(frozen=True)
class CampaignBurst:
    """A campaign whose bulk emails are accepted in one burst at ``at_h``, ``per_second`` a second."""

    at_h: float
    recipients: int
    per_second: float = 200.0


@dataclass(frozen=True)
class Traffic:
    """What customers send during the day."""

    emails: int
    """Single sends accepted during the day (campaign bursts come on top)."""
    hourly_weights: tuple[float, ...]
    """24 weights: the diurnal curve (relative volume of each hour)."""
    mix: Mapping[str, float]
    """Share of the single sends per class (sums to 1)."""
    sizes: Mapping[str, SizeModel]
    spikes: tuple[Spike, ...] = ()
    campaigns: tuple[CampaignBurst, ...] = ()


@dataclass(frozen=True)
class Scenario:
    """One simulated day of the market."""

    name: str
    description: str
    seed: int
    providers: tuple[SimProvider, ...]
    traffic: Traffic
    events: tuple[MarketEvent, ...] = ()
    window_s: float = 900.0
    """Length of the time windows the oracle plans over and the report plots."""
    day_s: float = DAY_S
    """The simulated day: the quota day the health board paces against (``libs.routing.pacing``)."""
    source: str = field(default="", compare=False)
    """The file it was read from, if any."""

    def provider(self, provider_id: str) -> SimProvider:
        """The provider with this id (``KeyError`` when there is none)."""
        for p in self.providers:
            if p.id == provider_id:
                return p
        raise KeyError(provider_id)

    @property
    def windows(self) -> int:
        """How many windows the day has."""
        return math.ceil(self.day_s / self.window_s)


DEFAULT_HOURLY_WEIGHTS = (2, 1.5, 1, 1, 1, 1.5, 3, 5, 7, 8, 8, 7.5, 7, 7, 7.5, 8, 8, 7.5, 7, 6.5, 6, 5, 4, 3)
"""A diurnal curve: quiet nights, a morning ramp, a plateau through the working day, an evening tail."""


def shipped() -> list[Path]:
    """The scenario files that ship with the package, by name."""
    return sorted(SHIPPED_SCENARIOS.glob("*.toml"))


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file (``ScenarioError`` naming the field when it is wrong)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    try:
        scenario = parse(raw, default_name=path.stem)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return Scenario(**{**scenario.__dict__, "source": str(path)})


def parse(raw: Mapping[str, Any], default_name: str = "scenario") -> Scenario:
    """A scenario from its parsed TOML (a mapping); ``ScenarioError`` naming the field when it is wrong."""
    r = _Reader(raw, "")
    _known(r, {"name", "description", "seed", "window_minutes", "providers", "events", "traffic"})
    providers = tuple(_provider(p) for p in r.tables("providers"))
    if len(providers) < 2:
        raise ScenarioError("providers: a market needs at least two providers")
    ids = [p.id for p in providers]
    if len(set(ids)) != len(ids):
        raise ScenarioError(f"providers: ids must be unique (got {', '.join(ids)})")
    window_s = r.number("window_minutes", 15.0, low=1.0, high=240.0) * 60
    scenario = Scenario(
        name=r.text("name", default_name), description=r.text("description", ""),
        seed=int(r.number("seed", 1, low=0, integer=True)), providers=providers,
        traffic=_traffic(r.table("traffic")),
        events=tuple(_event(e, set(ids)) for e in r.tables("events", required=False)),
        window_s=window_s)
    for message_class in MessageClass:
        if scenario.traffic.mix.get(message_class, 0) > 0 and not any(
                not p.classes or message_class in p.classes for p in providers):
            raise ScenarioError(f"traffic.mix: no provider carries {message_class}")
    return scenario


def _provider(r: _Reader) -> SimProvider:
    _known(r, {"id", "type", "price_per_email_micros", "price_per_mb_micros", "latency", "error_rate",
               "daily_quota", "monthly_quota", "rate_limit_per_second", "max_message_bytes", "classes", "region"})
    provider_type = r.text("type")
    if provider_type not in DEFAULT_CAPABILITIES:
        raise ScenarioError(f"{r.at('type')}: unknown provider type {provider_type!r} "
                            f"(one of {', '.join(sorted(DEFAULT_CAPABILITIES))})")
    latency = r.table("latency")
    _known(latency, {"median_ms", "p99_ms"})
    median = latency.number("median_ms", low=0.1)
    p99 = latency.number("p99_ms", low=median)
    classes = tuple(r.strings("classes", ()))
    for name in classes:
        if name not in set(MessageClass):
            raise ScenarioError(f"{r.at('classes')}: unknown class {name!r} (one of {', '.join(MessageClass)})")
    return SimProvider(
        id=r.text("id"), type=provider_type,
        price_per_email_micros=int(r.number("price_per_email_micros", low=0, integer=True)),
        price_per_mb_micros=int(r.number("price_per_mb_micros", 0, low=0, integer=True)),
        latency=LatencyModel(median, p99 if p99 > median else median * 1.0001),
        error_rate=r.number("error_rate", 0.0, low=0.0, high=1.0),
        daily_quota=int(r.number("daily_quota", 0, low=0, integer=True)),
        monthly_quota=int(r.number("monthly_quota", 0, low=0, integer=True)),
        rate_limit_per_second=r.number("rate_limit_per_second", 0.0, low=0.0),
        max_message_bytes=int(r.number("max_message_bytes", 0, low=0, integer=True)),
        classes=classes, region=r.text("region", ""))


def _event(r: _Reader, provider_ids: set[str]) -> MarketEvent:
    _known(r, {"kind", "provider", "at_h", "until_h", "latency_factor", "error_rate", "rate_per_second",
               "retry_after_s", "daily_quota", "price_per_email_micros", "price_per_mb_micros"})
    kind = r.text("kind")
    if kind not in EVENT_KINDS:
        raise ScenarioError(f"{r.at('kind')}: unknown event kind {kind!r} (one of {', '.join(EVENT_KINDS)})")
    provider = r.text("provider")
    if provider not in provider_ids:
        raise ScenarioError(f"{r.at('provider')}: no provider {provider!r} in the scenario")
    start_h = r.number("at_h", low=0.0, high=24.0)
    lasting = kind in ("quota_cut", "price_change")
    end_h = 24.0 if lasting else r.number("until_h", low=start_h, high=24.0)
    if not lasting and end_h <= start_h:
        raise ScenarioError(f"{r.at('until_h')}: must be after at_h")
    event = MarketEvent(kind=kind, provider=provider, start_s=start_h * 3600, end_s=end_h * 3600)
    if kind == "brownout":
        return MarketEvent(**{**event.__dict__, "latency_factor": r.number("latency_factor", 10.0, low=1.0),
                              "error_rate": r.number("error_rate", 0.3, low=0.0, high=1.0)})
    if kind == "throttle":
        return MarketEvent(**{**event.__dict__, "rate_per_second": r.number("rate_per_second", low=0.0),
                              "retry_after_s": r.number("retry_after_s", 30.0, low=0.0)})
    if kind == "quota_cut":
        return MarketEvent(**{**event.__dict__, "daily_quota": int(r.number("daily_quota", low=1, integer=True))})
    if kind == "price_change":
        return MarketEvent(**{**event.__dict__,
                              "price_per_email_micros": int(r.number("price_per_email_micros", low=0, integer=True)),
                              "price_per_mb_micros": int(r.number("price_per_mb_micros", 0, low=0, integer=True))})
    return event


def _traffic(r: _Reader) -> Traffic:
    _known(r, {"emails", "hourly_weights", "mix", "sizes", "spikes", "campaigns"})
    weights = tuple(r.numbers("hourly_weights", DEFAULT_HOURLY_WEIGHTS))
    if len(weights) != 24 or any(w < 0 for w in weights) or not any(weights):
        raise ScenarioError(f"{r.at('hourly_weights')}: needs 24 non-negative weights, not all zero")
    mix_table = r.table("mix")
    _known(mix_table, set(MessageClass))
    mix = {c.value: mix_table.number(c.value, 0.0, low=0.0, high=1.0) for c in MessageClass}
    if abs(sum(mix.values()) - 1) > 1e-6:
        raise ScenarioError(f"{r.at('mix')}: shares must sum to 1 (they sum to {sum(mix.values()):g})")
    sizes_table = r.table("sizes", required=False)
    sizes = {c.value: _sizes(sizes_table.table(c.value, required=False), c) for c in MessageClass}
    spikes = []
    for s in r.tables("spikes", required=False):
        _known(s, {"start_h", "end_h", "factor"})
        start = s.number("start_h", low=0.0, high=24.0)
        spikes.append(Spike(start, s.number("end_h", low=start, high=24.0), s.number("factor", low=0.0)))
    campaigns = []
    for c in r.tables("campaigns", required=False):
        _known(c, {"at_h", "recipients", "per_second"})
        campaigns.append(CampaignBurst(c.number("at_h", low=0.0, high=24.0),
                                       int(c.number("recipients", low=1, integer=True)),
                                       c.number("per_second", 200.0, low=0.01)))
    return Traffic(emails=int(r.number("emails", low=1, integer=True)), hourly_weights=weights,
                   mix=MappingProxyType(mix), sizes=MappingProxyType(sizes), spikes=tuple(spikes),
                   campaigns=tuple(campaigns))


_SIZE_DEFAULTS = {MessageClass.OTP: 3_000, MessageClass.TRANSACTIONAL: 25_000, MessageClass.BULK: 60_000}


def _sizes(r: _Reader, message_class: MessageClass) -> SizeModel:
    _known(r, {"median_bytes", "sigma", "attachment_share", "attachment_median_bytes", "attachment_sigma",
               "max_bytes"})
    share = r.number("attachment_share", 0.0, low=0.0, high=1.0)
    return SizeModel(
        median_bytes=int(r.number("median_bytes", _SIZE_DEFAULTS[message_class], low=1, integer=True)),
        sigma=r.number("sigma", 0.5, low=0.0, high=3.0), attachment_share=share,
        attachment_median_bytes=int(r.number("attachment_median_bytes", 500_000 if share else 0, low=0,
                                             integer=True)),
        attachment_sigma=r.number("attachment_sigma", 1.0, low=0.0, high=3.0),
        max_bytes=int(r.number("max_bytes", 150 * 1024 * 1024, low=1, integer=True)))


_MISSING = object()


class _Reader:
    """Typed access to one TOML table, naming the field in every error."""

    def __init__(self, raw: Any, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ScenarioError(f"{path or 'the file'}: must be a table")
        self.raw = raw
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ScenarioError(f"{self.at(key)}: required")
            return default
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or (default is _MISSING and not value):
            raise ScenarioError(f"{self.at(key)}: must be a non-empty string")
        return value

    def number(self, key: str, default: Any = _MISSING, *, low: float | None = None, high: float | None = None,
               integer: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ScenarioError(f"{self.at(key)}: must be a number (got {value!r})")
        if integer and value != int(value):
            raise ScenarioError(f"{self.at(key)}: must be a whole number (got {value!r})")
        if low is not None and value < low:
            raise ScenarioError(f"{self.at(key)}: must be >= {low:g} (got {value!r})")
        if high is not None and value > high:
            raise ScenarioError(f"{self.at(key)}: must be <= {high:g} (got {value!r})")
        return float(value)

    def numbers(self, key: str, default: Any = _MISSING) -> list[float]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int | float)
                                                      for v in value):
            raise ScenarioError(f"{self.at(key)}: must be a list of numbers")
        return [float(v) for v in value]

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or any(not isinstance(v, str) for v in value):
            raise ScenarioError(f"{self.at(key)}: must be a list of strings")
        return list(value)

    def table(self, key: str, *, required: bool = True) -> _Reader:
        return _Reader(self._get(key, _MISSING if required else {}), self.at(key))

    def tables(self, key: str, *, required: bool = True) -> list[_Reader]:
        value = self._get(key, _MISSING if required else [])
        if not isinstance(value, list):
            raise ScenarioError(f"{self.at(key)}: must be an array of tables ([[{key}]])")
        return [_Reader(v, f"{self.at(key)}[{i}]") for i, v in enumerate(value)]


def _known(r: _Reader, keys: set[str]) -> None:
    unknown = sorted(set(r.raw) - keys)
    if unknown:
        raise ScenarioError(f"{r.at(unknown[0])}: unknown field (known: {', '.join(sorted(keys))})")
