"""What distinguishes the kustomize environments: dev is small and cheap, prod is highly available and pinned."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import K8S_DIR, Rendering, kustomize, pod_spec, replica_range, split_image

OVERLAY_NAMESPACES = {"dev": "esp-dev", "prod": "esp-prod"}


def autoscalers(rendering: Rendering):
    return rendering.of_kind("HorizontalPodAutoscaler") + rendering.of_kind("ScaledObject")


def test_the_base_renders_on_its_own_without_a_namespace():
    resources = kustomize(K8S_DIR / "base")

    assert resources
    assert all("namespace" not in resource["metadata"] for resource in resources)


@pytest.mark.parametrize(("overlay", "namespace"), OVERLAY_NAMESPACES.items())
def test_every_resource_of_an_overlay_lives_in_its_namespace(renderings, overlay, namespace):
    rendering = renderings[f"kustomize-{overlay}"]

    assert {r["metadata"].get("namespace") for r in rendering.resources if r["kind"] != "Namespace"} == {namespace}
    assert [n["metadata"]["name"] for n in rendering.of_kind("Namespace")] == [namespace]


@pytest.mark.parametrize("overlay", OVERLAY_NAMESPACES)
def test_each_overlay_namespace_enforces_the_restricted_pod_security_standard(renderings, overlay):
    [namespace] = renderings[f"kustomize-{overlay}"].of_kind("Namespace")

    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_prod_runs_at_least_three_replicas_of_everything_to_survive_a_zone_loss(renderings):
    minimums = {a["metadata"]["name"]: replica_range(a)[0] for a in autoscalers(renderings["kustomize-prod"])}

    assert {name: minimum for name, minimum in minimums.items() if minimum < 3 and name != "sender-bulk"} == {}
    assert minimums["sender-bulk"] >= 2


def test_prod_can_scale_every_service_further_than_dev(renderings):
    dev = {a["metadata"]["name"]: replica_range(a)[1] for a in autoscalers(renderings["kustomize-dev"])}
    prod = {a["metadata"]["name"]: replica_range(a)[1] for a in autoscalers(renderings["kustomize-prod"])}

    assert dev.keys() == prod.keys()
    assert [name for name in dev if prod[name] <= dev[name]] == []


def test_dev_runs_one_replica_of_everything(renderings):
    assert {replica_range(a)[0] for a in autoscalers(renderings["kustomize-dev"])} == {1}


def test_prod_gives_every_service_more_cpu_than_dev(renderings):
    def cpu_requests(rendering: Rendering) -> dict[str, float]:
        requests = {}
        for deployment in rendering.of_kind("Deployment"):
            cpu = str(pod_spec(deployment)["containers"][0]["resources"]["requests"]["cpu"])
            requests[deployment["metadata"]["name"]] = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        return requests

    dev, prod = cpu_requests(renderings["kustomize-dev"]), cpu_requests(renderings["kustomize-prod"])

    assert [name for name in dev if prod[name] <= dev[name]] == []


def test_prod_pins_a_release_image_and_its_migrations_run_the_same_image(renderings):
    rendering = renderings["kustomize-prod"]
    images = {
        c["image"]
        for w in rendering.of_kind("Deployment") + rendering.of_kind("Job")
        for c in pod_spec(w)["containers"]
    }

    [image] = images
    _, tag, _ = split_image(image)
    assert tag is not None and tag[0].isdigit()


@pytest.mark.parametrize("overlay", OVERLAY_NAMESPACES)
def test_each_overlay_has_a_migrations_job_in_the_same_namespace(renderings, overlay):
    [job] = renderings[f"kustomize-{overlay}"].of_kind("Job")

    assert job["metadata"]["namespace"] == OVERLAY_NAMESPACES[overlay]


def test_prod_lists_every_node_of_the_three_node_jetstream_cluster(renderings):
    config = renderings["kustomize-prod"].named("ConfigMap", "esp-config")

    assert len(config["data"]["ESP_NATS_URL"].split(",")) == 3


def test_dev_points_s3_at_an_in_cluster_s3_compatible_store(renderings):
    assert renderings["kustomize-dev"].named("ConfigMap", "esp-config")["data"]["ESP_S3_ENDPOINT"].startswith("http://")
    assert "ESP_S3_ENDPOINT" not in renderings["kustomize-prod"].named("ConfigMap", "esp-config")["data"]
