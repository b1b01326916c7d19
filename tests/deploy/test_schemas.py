"""Every rendered resource is a valid Kubernetes object (KEDA's included), for the oldest and newest versions."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import KUBERNETES_VERSIONS, Rendering, schema_errors


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(rendering: Rendering, kubernetes_version: str):
    errors = [error for resource in rendering.resources for error in schema_errors(resource, kubernetes_version)]

    assert errors == []


def test_a_resource_with_an_unknown_field_is_reported(renderings: dict[str, Rendering]):
    deployment = dict(renderings["helm-default"].of_kind("Deployment")[0])
    deployment["spec"] = {**deployment["spec"], "replica": 3}

    assert any("replica" in error for error in schema_errors(deployment, KUBERNETES_VERSIONS[0]))


def test_a_scaled_object_without_a_consumer_is_reported(renderings: dict[str, Rendering]):
    scaled_object = renderings["kustomize-prod"].named("ScaledObject", "sender-otp")
    triggers = [
        {**trigger, "metadata": {key: value for key, value in trigger["metadata"].items() if key != "consumer"}}
        if trigger["type"] == "nats-jetstream"
        else trigger
        for trigger in scaled_object["spec"]["triggers"]
    ]
    broken = {**scaled_object, "spec": {**scaled_object["spec"], "triggers": triggers}}

    assert any("consumer" in error for error in schema_errors(broken, KUBERNETES_VERSIONS[0]))


def test_a_kind_without_a_schema_is_reported():
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}

    assert schema_errors(unknown, KUBERNETES_VERSIONS[0]) != []
