"""Settings are read once from ESP_* variables and every bad key is reported together."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest

from libs.common.settings import CommonSettings, SettingsError, check_positive, load_settings, settings_env


@dataclass(frozen=True)
class Example:
    name: str
    workers: int = 4
    ratio: float = 0.5
    debug: bool = False
    classes: tuple[str, ...] = ("otp",)

    def __post_init__(self) -> None:
        check_positive(self, "workers")


def test_values_are_parsed_by_their_field_types():
    settings = load_settings(Example, {"ESP_NAME": "x", "ESP_WORKERS": "8", "ESP_RATIO": "0.25",
                                       "ESP_DEBUG": "yes", "ESP_CLASSES": "otp, bulk"})
    assert settings == Example("x", 8, 0.25, True, ("otp", "bulk"))


def test_defaults_apply_when_a_variable_is_absent():
    assert load_settings(Example, {"ESP_NAME": "x"}) == Example("x")


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(SettingsError) as caught:
        load_settings(Example, {"ESP_WORKERS": "many", "ESP_RATIO": "half", "ESP_DEBUG": "perhaps"})
    problems = "\n".join(caught.value.problems)
    for key in ("ESP_NAME: required", "ESP_WORKERS", "ESP_RATIO", "ESP_DEBUG"):
        assert key in problems


def test_range_checks_run_after_parsing():
    with pytest.raises(SettingsError, match="ESP_WORKERS: must be > 0"):
        load_settings(Example, {"ESP_NAME": "x", "ESP_WORKERS": "0"})


def test_settings_are_frozen():
    settings = load_settings(CommonSettings, {})
    with pytest.raises(AttributeError):
        settings.grpc_port = 1  # type: ignore[misc]


def test_settings_env_reads_back_into_the_same_settings():
    settings = Example("x", 8, 0.1 + 0.2, True, ("otp", "bulk"))
    assert load_settings(Example, settings_env(settings)) == settings


@pytest.mark.parametrize("module, name", [
    ("services.ingest.config", "IngestSettings"), ("services.router.config", "RouterSettings"),
    ("services.sender.config", "SenderSettings"), ("services.ledger.config", "LedgerSettings"),
    ("services.reports.config", "ReportsSettings")])
def test_every_services_settings_survive_the_trip_to_a_worker(module: str, name: str):
    cls = getattr(importlib.import_module(module), name)
    settings = load_settings(cls, {"ESP_ADMIN_TOKEN": "a" * 32, "ESP_NAMESPACE": "ns", "ESP_METRICS_PORT": "9100"})
    assert load_settings(cls, settings_env(settings)) == settings
