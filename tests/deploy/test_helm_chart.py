"""The Helm chart lints clean, renders offline with Helm v4 (helm-python-sdk), and its values.schema.json
accepts the shipped values while rejecting bad ones."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

from libs.common.settings import load_settings
from libs.routing.pacing import UNIFORM
from services.router.config import RouterSettings
from services.sender.config import SenderSettings
from tests.deploy.manifests import (
    CHART_DIR,
    COMPONENTS,
    SENDER_CLASSES,
    component_of,
    load_values_file,
    pod_spec,
    render_helm,
    render_helm_templates,
)

VALUES_FILES = ("values.yaml", "ci/prod-values.yaml", "ci/no-keda-values.yaml")
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))


def merged_values(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """values.yaml with ``overrides`` coalesced over it, exactly as an install would see them."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(overrides)


def schema_validator() -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    return jsonschema.Draft7Validator(SCHEMA)


def test_chart_metadata_is_helm_v2_with_a_kubernetes_floor():
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))

    assert metadata["apiVersion"] == "v2"
    assert metadata["name"] == "esp-mesh"
    assert metadata["type"] == "application"
    assert metadata["kubeVersion"].startswith(">=1.29")


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_without_errors_or_warnings(values_file):
    report = helm_python.lint(
        CHART_DIR, load_values_file(values_file), strict=True, namespace="esp", kube_version="v1.29.0"
    )

    assert report["errors"] == []
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


def test_the_chart_has_one_template_per_service():
    templates = {path.name for path in (CHART_DIR / "templates").iterdir()}

    assert {
        "ingest.yaml",
        "router.yaml",
        "ledger.yaml",
        "reports.yaml",
        "campaigns.yaml",
        "webhooks.yaml",
        "gateway.yaml",
        "sender.yaml",
    } <= templates
    assert {"_helpers.tpl", "NOTES.txt", "migrations.yaml", "config.yaml"} <= templates


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_shipped_values_satisfy_the_values_schema(values_file):
    errors = list(schema_validator().iter_errors(merged_values(load_values_file(values_file))))

    assert errors == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"s3": {"endpoint": "http://minio.esp-dev.svc.cluster.local:9000"}},
        {"ingest": {"podDisruptionBudget": {"maxUnavailable": "50%"}}},
        {"image": {"tag": "1.2.3-rc.1"}},
        {"nats": {"url": "tls://nats-0:4222,tls://nats-1:4222"}},
        {"redis": {"url": "rediss://redis.example.internal:6380/2"}},
        {"ingest": {"resources": {"requests": {"cpu": 0.5}}}},
        {"publicBaseUrl": "https://mail.example.com:8443/esp"},
    ],
    ids=[
        "s3-endpoint",
        "pdb-percentage",
        "prerelease-tag",
        "nats-tls-cluster",
        "redis-tls",
        "numeric-cpu",
        "public-base-url-with-port-and-path",
    ],
)
def test_reasonable_overrides_satisfy_the_values_schema(overrides):
    assert list(schema_validator().iter_errors(merged_values(overrides))) == []


# Each bad override, and the path of the value the schema must blame for it.
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-top-level-key": ({"replicaCount": 3}, ""),
    "unknown-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "malformed-digest": ({"image": {"digest": "sha256:xyz"}}, "/image/digest"),
    "zero-min-replicas": ({"ingest": {"autoscaling": {"minReplicas": 0}}}, "/ingest/autoscaling/minReplicas"),
    "cpu-target-above-100": (
        {"ledger": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
        "/ledger/autoscaling/targetCPUUtilizationPercentage",
    ),
    "missing-limits": ({"router": {"resources": {"limits": None}}}, "/router/resources"),
    "nonsense-cpu-quantity": (
        {"reports": {"resources": {"requests": {"cpu": "lots"}}}},
        "/reports/resources/requests/cpu",
    ),
    "unknown-log-level": ({"logLevel": "verbose"}, "/logLevel"),
    "nats-url-not-nats": ({"nats": {"url": "http://nats:4222"}}, "/nats/url"),
    "root-user": ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
    "bad-secret-name": ({"secrets": {"postgres": {"name": "Bad_Name"}}}, "/secrets/postgres/name"),
    "pdb-blocking-drains": (
        {"gateway": {"podDisruptionBudget": {"maxUnavailable": 0}}},
        "/gateway/podDisruptionBudget/maxUnavailable",
    ),
    "unknown-sender-class": ({"sender": {"classes": {"marketing": {"enabled": True}}}}, "/sender/classes"),
    "zero-lag-threshold": (
        {"sender": {"classes": {"otp": {"autoscaling": {"lagThreshold": 0}}}}},
        "/sender/classes/otp/autoscaling/lagThreshold",
    ),
    "enabled-not-boolean": ({"gateway": {"enabled": "yes"}}, "/gateway/enabled"),
    "public-base-url-not-https": ({"publicBaseUrl": "http://esp.example.com"}, "/publicBaseUrl"),
    "webhooks-zero-max-replicas": (
        {"webhooks": {"autoscaling": {"maxReplicas": 0}}},
        "/webhooks/autoscaling/maxReplicas",
    ),
    "negative-demand-weight": ({"routing": {"demandProfile": [1, -1]}}, "/routing/demandProfile/1"),
    "campaigns-cpu-target-above-100": (
        {"campaigns": {"autoscaling": {"targetCPUUtilizationPercentage": 101}}},
        "/campaigns/autoscaling/targetCPUUtilizationPercentage",
    ),
}


@pytest.mark.parametrize(("overrides", "blamed"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected_by_the_values_schema(overrides, blamed):
    errors = list(schema_validator().iter_errors(merged_values(overrides)))

    assert ["/" + "/".join(map(str, error.absolute_path)) for error in errors] == [blamed or "/"]


@pytest.mark.parametrize(("overrides", "blamed"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_helm_refuses_to_render_bad_values(overrides, blamed):
    with pytest.raises(helm_python.HelmValuesError, match=f"at '{blamed}'"):
        render_helm_templates(overrides)


def test_an_empty_replica_range_fails_the_render_with_a_clear_message():
    with pytest.raises(
        helm_python.HelmRenderError, match=r"ingest: autoscaling.minReplicas \(5\) is above maxReplicas"
    ):
        render_helm_templates({"ingest": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}})


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook_after_their_service_account():
    rendering = render_helm("hooks")
    [job] = rendering.of_kind("Job")
    account = rendering.named("ServiceAccount", pod_spec(job)["serviceAccountName"])

    for hooked in (job, account):
        assert hooked["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(account["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert "before-hook-creation" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]


def test_the_migrations_hook_needs_nothing_the_chart_creates():
    """Hooks run before the release's ordinary objects exist, so the Job may only use external Secrets."""
    rendering = render_helm("hooks")
    [job] = rendering.of_kind("Job")
    [container] = pod_spec(job)["containers"]

    assert "envFrom" not in container
    assert all("configMapKeyRef" not in variable.get("valueFrom", {}) for variable in container["env"])
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_object_names_carry_the_release_name():
    rendering = render_helm("named", release="mail")

    assert {r["metadata"]["name"].split("-")[0] for r in rendering.resources} == {"mail"}


def test_fullname_override_replaces_the_release_name_prefix():
    rendering = render_helm("overridden", {"fullnameOverride": "esp"}, release="mail-prod")

    assert rendering.deployment("sender-transactional")["metadata"]["name"] == "esp-sender-transactional"


def test_a_long_release_name_still_yields_valid_object_names():
    rendering = render_helm("long", release="a" * 53)

    assert max(len(r["metadata"]["name"]) for r in rendering.resources) <= 63


def test_an_image_digest_wins_over_the_tag():
    digest = "sha256:" + "0123456789abcdef" * 4
    rendering = render_helm("digest", {"image": {"tag": "9.9.9", "digest": digest}})

    assert {pod_spec(d)["containers"][0]["image"] for d in rendering.of_kind("Deployment")} == {
        f"ghcr.io/esp-mesh/esp@{digest}"
    }


def test_the_image_tag_defaults_to_the_app_version():
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    deployment = render_helm("default").deployment("ingest")

    assert pod_spec(deployment)["containers"][0]["image"] == f"ghcr.io/esp-mesh/esp:{metadata['appVersion']}"


def test_a_disabled_service_renders_nothing_of_its_own():
    rendering = render_helm("no-gateway", {"gateway": {"enabled": False}})

    assert [
        r["kind"] for r in rendering.resources if r["metadata"]["labels"].get("app.kubernetes.io/name") == "gateway"
    ] == []
    assert sorted(component_of(d) for d in rendering.of_kind("Deployment")) == sorted(set(COMPONENTS) - {"gateway"})


def test_a_disabled_sender_class_renders_no_deployment_or_scaled_object():
    rendering = render_helm("no-bulk", {"sender": {"classes": {"bulk": {"enabled": False}}}})

    assert "sender-bulk" not in {component_of(d) for d in rendering.of_kind("Deployment")}
    assert len(rendering.of_kind("ScaledObject")) == len(SENDER_CLASSES) - 1


def test_disabling_migrations_and_network_policies_removes_them():
    rendering = render_helm("bare", {"migrations": {"enabled": False}, "networkPolicy": {"enabled": False}})

    assert rendering.of_kind("Job") == []
    assert rendering.of_kind("NetworkPolicy") == []


def test_a_settings_change_rolls_the_pods():
    def checksum(values: dict[str, Any] | None) -> str:
        deployment = render_helm("checksum", values).deployment("router")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(None) != checksum({"logLevel": "debug"})


def test_the_default_deny_policy_selects_only_this_releases_pods():
    rendering = render_helm("scoped", release="mail")
    [deny] = [p for p in rendering.of_kind("NetworkPolicy") if not p["spec"].get("ingress")]

    assert deny["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "mail"


def test_a_disabled_campaigns_service_renders_nothing_of_its_own():
    rendering = render_helm("no-campaigns", {"campaigns": {"enabled": False}})

    assert [
        r["kind"] for r in rendering.resources if r["metadata"]["labels"].get("app.kubernetes.io/name") == "campaigns"
    ] == []


def test_ingest_is_told_where_campaigns_is_and_campaigns_the_public_base_url():
    rendering = render_helm("campaigns", {"publicBaseUrl": "https://mail.example.com"}, release="mail")
    config = rendering.named("ConfigMap", "mail-config")["data"]

    assert config["ESP_CAMPAIGNS_ADDR"] == "mail-campaigns:50056"
    assert rendering.named("Service", "mail-campaigns")["spec"]["ports"][0]["port"] == 50056
    assert config["ESP_PUBLIC_BASE_URL"] == "https://mail.example.com"


def test_the_demand_profile_reaches_senders_and_routers_as_the_setting_they_pace_by():
    hourly = [1] * 18 + [6, 6, 3, 1, 1, 1]
    config = render_helm("demand", {"routing": {"demandProfile": hourly}}, release="mail").named(
        "ConfigMap", "mail-config")["data"]

    for settings in (load_settings(SenderSettings, config), load_settings(RouterSettings, config)):
        assert settings.demand().share_by(18 * 3600) == pytest.approx(18 / sum(hourly))


def test_without_a_demand_profile_quotas_are_paced_over_a_straight_line():
    config = render_helm("no-demand", release="mail").named("ConfigMap", "mail-config")["data"]

    assert load_settings(SenderSettings, config).demand() == UNIFORM


def test_a_disabled_webhooks_service_renders_nothing_of_its_own():
    rendering = render_helm("no-webhooks", {"webhooks": {"enabled": False}})

    assert [
        r["kind"] for r in rendering.resources if r["metadata"]["labels"].get("app.kubernetes.io/name") == "webhooks"
    ] == []


def test_ingest_is_told_where_webhooks_is():
    rendering = render_helm("webhooks", release="mail")

    assert rendering.named("ConfigMap", "mail-config")["data"]["ESP_WEBHOOKS_ADDR"] == "mail-webhooks:50057"
    assert rendering.named("Service", "mail-webhooks")["spec"]["ports"][0]["port"] == 50057


def webhooks_egress_ports(values: dict[str, Any]) -> set[int]:
    [policy] = [p for p in render_helm("egress", values).of_kind("NetworkPolicy") if component_of(p) == "webhooks"]
    return {port["port"] for rule in policy["spec"]["egress"] for port in rule.get("ports", [])}


def test_webhooks_egress_follows_the_nats_and_otlp_endpoints():
    """NetworkPolicies take no host names: the ports of nats.url and of the OTLP endpoint are opened instead."""
    default = webhooks_egress_ports({})
    custom = webhooks_egress_ports(
        {
            "nats": {"url": "tls://nats-0.example.internal:7422,tls://nats-1.example.internal:7422"},
            "otelExporterOtlpEndpoint": "http://otel.observability:14317",
        }
    )

    assert default == {443, 50054, 5432, 4222, 53}
    assert custom == {443, 50054, 5432, 7422, 53, 14317}
    assert 4317 in webhooks_egress_ports({"otelExporterOtlpEndpoint": "http://otel.observability"})


def test_notes_warn_when_one_click_unsubscribe_has_no_public_base_url():
    unset = render_helm_templates()["esp-mesh/templates/NOTES.txt"]
    set_ = render_helm_templates({"publicBaseUrl": "https://mail.example.com"})["esp-mesh/templates/NOTES.txt"]

    assert "publicBaseUrl is empty" in unset
    assert "publicBaseUrl is empty" not in set_
    assert "https://mail.example.com/u/<token>" in set_


def test_notes_name_the_public_endpoints_and_the_secrets_to_create():
    notes = render_helm_templates(release="mail", namespace="email")["esp-mesh/templates/NOTES.txt"]

    assert "mail-ingest.email.svc:50051" in notes
    assert "mail-gateway.email.svc:8080" in notes
    assert "mail-reports.email.svc:8081" in notes
    for secret in ("esp-postgres", "esp-s3", "esp-unsubscribe-keys", "esp-secrets-keys", "esp-admin-token"):
        assert secret in notes
    for unread in ("esp-provider-credentials", "esp-webhook-signing-keys"):  # read by no code: not asked for
        assert unread not in notes
