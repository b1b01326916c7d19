"""Every Deployment is autoscaled (CPU everywhere, JetStream consumer lag for senders) and protected by a
PodDisruptionBudget."""

from __future__ import annotations

from tests.deploy.manifests import (
    COMPONENTS,
    SENDER_CLASSES,
    Rendering,
    autoscaler_targets,
    component_of,
    match_labels,
    matches,
    pod_labels,
    pod_spec,
    replica_range,
    scales_on_cpu,
)


def test_every_component_has_one_deployment(rendering: Rendering):
    assert sorted(component_of(deployment) for deployment in rendering.of_kind("Deployment")) == sorted(COMPONENTS)


def test_no_deployment_fixes_its_replica_count(rendering: Rendering):
    """The autoscaler owns spec.replicas; a fixed count would be reset on every apply or upgrade."""
    assert [d["metadata"]["name"] for d in rendering.of_kind("Deployment") if "replicas" in d["spec"]] == []


def test_every_deployment_has_exactly_one_autoscaler(rendering: Rendering):
    """Two autoscalers on one Deployment fight; KEDA's admission webhook rejects a ScaledObject next to an HPA."""
    targets = autoscaler_targets(rendering)

    assert {name: len(scalers) for name, scalers in targets.items() if len(scalers) != 1} == {}


def test_every_autoscaler_scales_on_cpu(rendering: Rendering):
    autoscalers = rendering.of_kind("HorizontalPodAutoscaler") + rendering.of_kind("ScaledObject")

    assert [a["metadata"]["name"] for a in autoscalers if not scales_on_cpu(a)] == []


def test_every_autoscaler_has_a_non_empty_replica_range_of_at_least_one(rendering: Rendering):
    autoscalers = rendering.of_kind("HorizontalPodAutoscaler") + rendering.of_kind("ScaledObject")

    for autoscaler in autoscalers:
        minimum, maximum = replica_range(autoscaler)
        assert 1 <= minimum <= maximum, autoscaler["metadata"]["name"]


def test_every_hpa_uses_autoscaling_v2(rendering: Rendering):
    assert {hpa["apiVersion"] for hpa in rendering.of_kind("HorizontalPodAutoscaler")} <= {"autoscaling/v2"}


def test_cpu_autoscaling_has_cpu_requests_to_measure_against(rendering: Rendering):
    for deployment in rendering.of_kind("Deployment"):
        for container in pod_spec(deployment)["containers"]:
            assert "cpu" in container["resources"]["requests"], deployment["metadata"]["name"]


def test_each_sender_class_is_its_own_deployment_consuming_only_its_class(rendering: Rendering):
    for sender_class in SENDER_CLASSES:
        deployment = rendering.deployment(f"sender-{sender_class}")
        [container] = pod_spec(deployment)["containers"]
        classes = [variable for variable in container["env"] if variable["name"] == "ESP_SENDER_CLASSES"]

        assert classes == [{"name": "ESP_SENDER_CLASSES", "value": sender_class}]


def test_each_sender_class_scales_on_its_jetstream_consumer_lag(renderings: dict[str, Rendering]):
    for name, rendering in renderings.items():
        if name == "helm-without-keda":
            continue
        for sender_class in SENDER_CLASSES:
            deployment = rendering.deployment(f"sender-{sender_class}")
            [scaled_object] = [
                scaled_object
                for scaled_object in rendering.of_kind("ScaledObject")
                if scaled_object["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            ]
            [lag] = [trigger for trigger in scaled_object["spec"]["triggers"] if trigger["type"] == "nats-jetstream"]

            assert lag["metadata"]["stream"] == f"SEND_{sender_class.upper()}", name
            assert lag["metadata"]["consumer"] == f"sender-{sender_class}", name
            assert int(lag["metadata"]["lagThreshold"]) >= 1, name


def test_without_keda_the_senders_fall_back_to_cpu_hpas(renderings: dict[str, Rendering]):
    rendering = renderings["helm-without-keda"]
    targets = autoscaler_targets(rendering)

    assert rendering.of_kind("ScaledObject") == []
    for sender_class in SENDER_CLASSES:
        name = rendering.deployment(f"sender-{sender_class}")["metadata"]["name"]
        assert [scaler.split("/")[0] for scaler in targets[name]] == ["HorizontalPodAutoscaler"]


def test_otp_senders_poll_for_lag_at_least_as_often_as_bulk_senders(renderings: dict[str, Rendering]):
    """otp is latency-critical: it must never be the class that notices its queue last."""
    for name, rendering in renderings.items():
        polling = {
            scaled_object["spec"]["scaleTargetRef"]["name"].rsplit("-", 1)[-1]: scaled_object["spec"]["pollingInterval"]
            for scaled_object in rendering.of_kind("ScaledObject")
        }
        if polling:
            assert polling["otp"] <= polling["transactional"] <= polling["bulk"], name


def test_every_deployment_is_covered_by_exactly_one_pod_disruption_budget(rendering: Rendering):
    budgets = rendering.of_kind("PodDisruptionBudget")
    coverage = {
        deployment["metadata"]["name"]: sum(
            matches(match_labels(budget["spec"]["selector"]), pod_labels(deployment)) for budget in budgets
        )
        for deployment in rendering.of_kind("Deployment")
    }

    assert {name: count for name, count in coverage.items() if count != 1} == {}


def test_disruption_budgets_never_block_a_node_drain(rendering: Rendering):
    """minAvailable equal to the replica count, or maxUnavailable 0, would make every drain hang."""
    for budget in rendering.of_kind("PodDisruptionBudget"):
        assert "minAvailable" not in budget["spec"], budget["metadata"]["name"]
        assert budget["spec"]["maxUnavailable"] not in (0, "0%"), budget["metadata"]["name"]


def test_deployment_selectors_select_their_own_pods(rendering: Rendering):
    for deployment in rendering.of_kind("Deployment"):
        assert matches(match_labels(deployment["spec"]["selector"]), pod_labels(deployment))
