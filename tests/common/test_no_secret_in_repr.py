"""No object holding a secret shows it in ``repr`` or ``str`` (issue 18: secrets are never logged in plain text).

A config or request object ends up in a log line, a traceback's locals or an assertion message sooner or later;
each one here is built with a recognisable secret and must not print it. Their keys (names) may show.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.common.secret_box import SecretBox, generate_key_setting
from libs.common.settings import CommonSettings, load_settings
from libs.common.unsubscribe import new_key_entry
from libs.providers.model import ProviderConfig
from libs.providers.smtp.send import SmtpSettings
from libs.providers.webhook_model import WebhookRequest
from libs.routing.catalog import ProviderSpec
from services.campaigns.config import CampaignsSettings
from services.ingest.config import IngestSettings
from services.reports.config import ReportsSettings
from services.reports.webhook_receiver import ProviderWebhookConfig
from services.webhooks.endpoints import Endpoint, EndpointSpec

SECRET = "s3cr3t-Value-7f2a9c"
"""The recognisable secret every object below is built with."""


def _key_material(setting: str) -> str:
    return setting.partition(":")[2]


SECRETS_KEYS = generate_key_setting("k1")
UNSUBSCRIBE_KEY = new_key_entry(1)


def _objects() -> list[tuple[str, object, list[str]]]:
    """(name, object, secrets it holds)."""
    smtp = ProviderConfig("smtp-eu", "smtp", "127.0.0.1:2525", {"username": "relay", "password": SECRET})
    return [
        ("ProviderConfig", ProviderConfig("pm", "postmark", "https://api.postmarkapp.com",
                                          {"server_token": SECRET}, options={"message_stream": "outbound"}),
         [SECRET]),
        ("ProviderWebhookConfig", ProviderWebhookConfig("mg", "mailgun", {"signing_key": SECRET}), [SECRET]),
        ("ProviderSpec", ProviderSpec("pm", "postmark", "https://api.postmarkapp.com", {"server_token": SECRET},
                                      webhook_secrets={"webhook_password": SECRET + "-hook"},
                                      sealed_credentials="c2VhbGVk" + SECRET), [SECRET]),
        ("SmtpSettings", SmtpSettings.from_config(smtp), [SECRET]),
        ("WebhookRequest", WebhookRequest("mg", {"signing_key": SECRET}, {}, b"{}", datetime.now(UTC)), [SECRET]),
        ("Endpoint", Endpoint("ep-1", "t-1", EndpointSpec(url="https://example.com/hook"), signing_secret=SECRET),
         [SECRET]),
        ("CommonSettings", load_settings(CommonSettings, {"ESP_SECRETS_KEYS": SECRETS_KEYS,
                                                          "ESP_S3_SECRET_KEY": SECRET}),
         [SECRET, _key_material(SECRETS_KEYS)]),
        ("IngestSettings", load_settings(IngestSettings, {"ESP_ADMIN_TOKEN": SECRET}), [SECRET]),
        ("ReportsSettings", load_settings(ReportsSettings, {"ESP_UNSUBSCRIBE_KEYS": UNSUBSCRIBE_KEY}),
         [_key_material(UNSUBSCRIBE_KEY)]),
        ("CampaignsSettings", load_settings(CampaignsSettings, {"ESP_UNSUBSCRIBE_KEYS": UNSUBSCRIBE_KEY}),
         [_key_material(UNSUBSCRIBE_KEY)]),
        ("SecretBox", SecretBox.from_setting(SECRETS_KEYS), [_key_material(SECRETS_KEYS)]),
    ]


@pytest.mark.parametrize(("obj", "secrets"), [(o, s) for _, o, s in _objects()], ids=[n for n, _, _ in _objects()])
def test_repr_and_str_never_show_a_secret(obj: object, secrets: list[str]) -> None:
    for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
        for secret in secrets:
            assert secret not in text


def test_the_provider_configs_still_name_their_secret_keys_not_values() -> None:
    assert "signing_key" in repr(ProviderWebhookConfig("mg", "mailgun", {"signing_key": SECRET}))
    assert "'pm'" in repr(ProviderConfig("pm", "postmark", "", {"server_token": SECRET}))
