"""Services get their settings as ESP_* environment variables: shared ones from one ConfigMap, credentials
only from Secrets, which the manifests reference but never contain."""

from __future__ import annotations

import re

from dev.migrate import SERVICES_WITH_SCHEMAS
from tests.deploy.manifests import GRPC_PORTS, REPO_ROOT, Rendering, component_of, environment, pod_spec, workloads

SHARED_SETTINGS = (
    "ESP_NATS_URL",
    "ESP_REDIS_URL",
    "ESP_S3_BUCKET",
    "ESP_S3_REGION",
    "ESP_INGEST_ADDR",
    "ESP_ROUTER_ADDR",
    "ESP_LEDGER_ADDR",
    "ESP_REPORTS_ADDR",
    "ESP_CAMPAIGNS_ADDR",
    "ESP_WEBHOOKS_ADDR",
    "ESP_PUBLIC_BASE_URL",
    "ESP_LOG_LEVEL",
)
ADDRESSES = {
    "ESP_INGEST_ADDR": "ingest",
    "ESP_ROUTER_ADDR": "router",
    "ESP_LEDGER_ADDR": "ledger",
    "ESP_REPORTS_ADDR": "reports",
    "ESP_CAMPAIGNS_ADDR": "campaigns",
    "ESP_WEBHOOKS_ADDR": "webhooks",
}
SECRET_LOOKING_NAME = re.compile(
    r"(DSN|PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|SIGNING|UNSUBSCRIBE_KEYS)", re.IGNORECASE
)
CREDENTIALS_IN_URL = re.compile(r"://[^/@\s]+:[^/@\s]+@")
USES_POSTGRES = (
    "ingest",
    "router",
    "ledger",
    "reports",
    "campaigns",
    "webhooks",
)
"""The senders are not here: they read the catalog from NATS and state from Redis, never Postgres."""
USES_S3 = ("ingest", "campaigns", "sender-otp", "sender-transactional", "sender-bulk")
USES_UNSUBSCRIBE_KEYS = ("reports", "campaigns")
HTTPS_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s?#]*)?$")


def service_containers(rendering: Rendering):
    for deployment in rendering.of_kind("Deployment"):
        yield component_of(deployment), pod_spec(deployment)["containers"][0]


def test_no_secret_is_part_of_any_rendering(rendering: Rendering):
    assert rendering.of_kind("Secret") == []


def test_every_service_gets_the_shared_settings(rendering: Rendering):
    for component, container in service_containers(rendering):
        missing = [name for name in SHARED_SETTINGS if name not in environment(rendering, container)]
        assert missing == [], component


def test_every_grpc_service_is_told_its_grpc_port(rendering: Rendering):
    for component, container in service_containers(rendering):
        if component in GRPC_PORTS:
            assert environment(rendering, container)["ESP_GRPC_PORT"] == {
                "name": "ESP_GRPC_PORT",
                "value": str(GRPC_PORTS[component]),
            }


def test_the_postgres_dsn_comes_from_a_secret_for_every_service_that_uses_postgres(rendering: Rendering):
    for component, container in service_containers(rendering):
        dsn = environment(rendering, container).get("ESP_POSTGRES_DSN")
        if component in USES_POSTGRES:
            assert dsn is not None and "secretKeyRef" in dsn.get("valueFrom", {}), component
            assert dsn["valueFrom"]["secretKeyRef"].get("optional") is not True, component
        else:
            assert dsn is None, component


def test_the_migrations_job_runs_the_migrations_with_the_dsn_from_a_secret(rendering: Rendering):
    [job] = rendering.of_kind("Job")
    [container] = pod_spec(job)["containers"]

    assert container["command"] == ["esp-service", "migrate"]
    assert "secretKeyRef" in environment(rendering, container)["ESP_POSTGRES_DSN"]["valueFrom"]


def test_every_credential_looking_variable_comes_from_a_secret(rendering: Rendering):
    offenders = []
    for workload in workloads(rendering):
        for container in pod_spec(workload)["containers"]:
            for name, variable in environment(rendering, container).items():
                if SECRET_LOOKING_NAME.search(name) and "secretKeyRef" not in variable.get("valueFrom", {}):
                    offenders.append(f"{workload['metadata']['name']}: {name}")

    assert offenders == []


def test_no_config_map_holds_a_credential(rendering: Rendering):
    for config_map in rendering.of_kind("ConfigMap"):
        for key, value in config_map.get("data", {}).items():
            assert not SECRET_LOOKING_NAME.search(key), key
            assert not CREDENTIALS_IN_URL.search(value), key


def test_service_addresses_point_at_services_serving_that_grpc_port(rendering: Rendering):
    services = {service["metadata"]["name"]: service for service in rendering.of_kind("Service")}
    _, container = next(service_containers(rendering))
    variables = environment(rendering, container)

    for variable, component in ADDRESSES.items():
        host, _, port = variables[variable]["value"].rpartition(":")
        assert host in services, variable
        assert component_of(services[host]) == component, variable
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}, variable


def test_s3_keys_come_from_the_optional_s3_secret_for_every_service_that_uses_s3(rendering: Rendering):
    """Optional, so pods with workload identity (IRSA, GKE WI) start without the Secret."""
    for component, container in service_containers(rendering):
        variables = environment(rendering, container)
        for name in ("ESP_S3_ACCESS_KEY", "ESP_S3_SECRET_KEY"):
            if component in USES_S3:
                reference = variables[name]["valueFrom"]["secretKeyRef"]
                assert "s3" in reference["name"] and reference.get("optional") is True, (component, name)
            else:
                assert name not in variables, (component, name)


def test_reports_and_campaigns_share_one_required_unsubscribe_key_secret(rendering: Rendering):
    """Campaigns signs the one-click tokens reports verifies: with different keys every link would answer 404."""
    references = {}
    for component, container in service_containers(rendering):
        variable = environment(rendering, container).get("ESP_UNSUBSCRIBE_KEYS")
        if component in USES_UNSUBSCRIBE_KEYS:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference.get("optional") is not True, component
            references[component] = (reference["name"], reference["key"])
        else:
            assert variable is None, component

    assert len(set(references.values())) == 1


def test_webhooks_gets_the_required_secrets_keys_from_the_secret_every_other_reader_uses(rendering: Rendering):
    """Endpoints' signing secrets are sealed under ESP_SECRETS_KEYS and webhooks refuses to start without them;
    every service reading the variable reads it from one Secret key, so one rotation covers them all."""
    references = {}
    for component, container in service_containers(rendering):
        variable = environment(rendering, container).get("ESP_SECRETS_KEYS")
        if variable is not None:
            reference = variable["valueFrom"]["secretKeyRef"]
            references[component] = (reference["name"], reference["key"])
            if component == "webhooks":
                assert reference.get("optional") is not True

    assert "webhooks" in references
    assert len(set(references.values())) == 1, references


def test_the_public_base_url_is_https_or_unset(rendering: Rendering):
    """RFC 8058 one-click links must be https; empty makes campaigns refuse one-click campaigns instead."""
    for component, container in service_containers(rendering):
        url = environment(rendering, container)["ESP_PUBLIC_BASE_URL"]["value"]
        assert url == "" or HTTPS_URL.match(url), (component, url)


def test_the_migrations_job_migrates_every_service_that_owns_a_schema():
    """The Job runs dev.migrate: each services/<name>/migrations must be in its list, or the schema never exists."""
    owners = {path.parent.name for path in (REPO_ROOT / "services").glob("*/migrations") if path.is_dir()}

    assert owners == set(SERVICES_WITH_SCHEMAS)
