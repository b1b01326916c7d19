"""A whole mesh with the provider simulator reporting deliveries, and headless Chromium to look at its dashboard.

Chromium and chromedriver are Debian's (``make test`` installs them through ``make browser-tools``); when either is
missing the browser tests fail saying so, they never skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dev import mesh as m
from tests.campaigns.conftest import CampaignMesh, start_campaign_mesh
from tests.conftest import S3Server

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"selenium is missing from the virtualenv ({exc}): it is a dev dependency; `make install` "
                      "installs it") from exc

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
"""Screenshots the browser tests save (git-ignored)."""
CHROMIUM = os.environ.get("ESP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ESP_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def dashboard_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[CampaignMesh]:
    """The mesh, its one provider the simulated Mailgun, whose delivery webhooks reach reports at once."""
    namespace = f"{run_id}d{secrets.token_hex(2)}"
    running = start_campaign_mesh(new_database(), redis_url, nats_url, s3_server, namespace,
                                  tmp_path_factory.mktemp("dashboard-mesh-logs"), provider_webhooks=True,
                                  # A callback that beats its message's SENT event is parked: match it again soon.
                                  extra_env={"ESP_PARKED_SWEEP_INTERVAL_S": "1"})
    yield running
    running.mesh.stop()
    asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


def _require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"the dashboard's browser test needs headless Chromium and chromedriver, missing: "
                    f"{', '.join(missing)}. Install them with `make browser-tools` (Debian: apt-get install chromium "
                    f"chromium-driver), or point ESP_TEST_CHROMIUM / ESP_TEST_CHROMEDRIVER at them.", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with its console log readable (``driver.get_log("browser")``)."""
    _require_browser()
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", "--lang=en-US",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.fail(f"headless Chromium did not start ({CHROMIUM}, {CHROMEDRIVER}): {exc.msg}", pytrace=False)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
