"""Every pod is hardened the same way, whichever way ESP mesh is deployed (the "restricted" Pod Security level
and then some): non-root, read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault
seccomp, no service-account token, requests and limits, native gRPC probes."""

from __future__ import annotations

from tests.deploy.manifests import (
    GRPC_PORTS,
    IMAGE_REPOSITORY,
    Rendering,
    component_of,
    container_port,
    containers,
    pod_spec,
    split_image,
    workloads,
)


def each_container(rendering: Rendering):
    for workload in workloads(rendering):
        for container in containers(workload):
            yield f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}", workload, container


def test_every_pod_runs_as_a_non_root_user(rendering: Rendering):
    offenders = []
    for where, workload, container in each_container(rendering):
        pod_context = pod_spec(workload).get("securityContext", {})
        context = {**pod_context, **container.get("securityContext", {})}
        if context.get("runAsNonRoot") is not True or context.get("runAsUser", 0) == 0:
            offenders.append(where)

    assert offenders == []


def test_every_container_has_a_read_only_root_filesystem(rendering: Rendering):
    offenders = [
        where
        for where, _, container in each_container(rendering)
        if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True
    ]

    assert offenders == []


def test_no_container_can_escalate_privileges_or_run_privileged(rendering: Rendering):
    offenders = [
        where
        for where, _, container in each_container(rendering)
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False
        or container.get("securityContext", {}).get("privileged", False)
    ]

    assert offenders == []


def test_every_container_drops_all_capabilities_and_adds_none(rendering: Rendering):
    offenders = []
    for where, _, container in each_container(rendering):
        capabilities = container.get("securityContext", {}).get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
            offenders.append(where)

    assert offenders == []


def test_every_pod_uses_the_runtime_default_seccomp_profile(rendering: Rendering):
    offenders = [
        workload["metadata"]["name"]
        for workload in workloads(rendering)
        if pod_spec(workload).get("securityContext", {}).get("seccompProfile") != {"type": "RuntimeDefault"}
    ]

    assert offenders == []


def test_no_pod_mounts_a_service_account_token(rendering: Rendering):
    offenders = [
        workload["metadata"]["name"]
        for workload in workloads(rendering)
        if pod_spec(workload).get("automountServiceAccountToken") is not False
    ]

    assert offenders == []


def test_every_pod_runs_under_its_own_service_account(rendering: Rendering):
    accounts = {account["metadata"]["name"]: account for account in rendering.of_kind("ServiceAccount")}
    used = [pod_spec(workload).get("serviceAccountName") for workload in workloads(rendering)]

    assert all(name in accounts for name in used)
    assert len(set(used)) == len(used)
    assert all(account.get("automountServiceAccountToken") is False for account in accounts.values())


def test_every_container_sets_cpu_and_memory_requests_and_limits(rendering: Rendering):
    offenders = []
    for where, _, container in each_container(rendering):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    offenders.append(f"{where}: {kind}.{resource}")

    assert offenders == []


def test_every_grpc_service_is_probed_with_native_grpc_probes_on_its_grpc_port(rendering: Rendering):
    offenders = []
    for deployment in rendering.of_kind("Deployment"):
        component = component_of(deployment)
        if component not in GRPC_PORTS:
            continue
        [container] = pod_spec(deployment)["containers"]
        assert container_port(container, "grpc") == GRPC_PORTS[component], component
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if container.get(probe, {}).get("grpc") != {"port": GRPC_PORTS[component]}:
                offenders.append(f"{component}: {probe}")

    assert offenders == []


def test_every_deployment_has_liveness_and_readiness_probes(rendering: Rendering):
    offenders = [
        f"{deployment['metadata']['name']}: {probe}"
        for deployment in rendering.of_kind("Deployment")
        for container in pod_spec(deployment)["containers"]
        for probe in ("readinessProbe", "livenessProbe")
        if probe not in container
    ]

    assert offenders == []


def test_every_container_runs_the_one_esp_image_at_one_version(rendering: Rendering):
    images = {container["image"] for _, _, container in each_container(rendering)}

    assert len(images) == 1
    name, tag, digest = split_image(images.pop())
    assert name == IMAGE_REPOSITORY
    assert tag or digest
    assert tag != "latest"


def test_every_container_runs_its_own_service_through_the_image_entrypoint(rendering: Rendering):
    """``esp-service <name>`` (scripts/esp-service, the image's entrypoint; tests/deploy/test_image.py checks every
    name it knows starts that module): each Deployment its own service, the migrations Job the migrations."""
    commands = {
        f"{workload['kind']}/{component_of(workload)}": pod_spec(workload)["containers"][0]["command"]
        for workload in workloads(rendering)
    }

    expected = {}
    for where in commands:
        kind, component = where.split("/")
        expected[where] = ["esp-service", "migrate" if kind == "Job" else component.split("-")[0]]
    assert commands == expected


def test_the_read_only_root_filesystem_comes_with_a_writable_tmp(rendering: Rendering):
    offenders = []
    for where, workload, container in each_container(rendering):
        volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
        tmp_mounts = [mount for mount in container.get("volumeMounts", []) if mount["mountPath"] == "/tmp"]
        if len(tmp_mounts) != 1 or "emptyDir" not in volumes.get(tmp_mounts[0]["name"], {}):
            offenders.append(where)

    assert offenders == []
