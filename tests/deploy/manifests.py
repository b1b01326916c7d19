"""Rendering, validating and inspecting the deployment manifests, for the deploy tests.

Two sources are rendered offline: the kustomize overlays under ``k8s/`` (with ``kubectl kustomize``, the pinned
kubectl that ``make kubectl`` installs into the virtualenv) and the Helm chart under ``helm/esp-mesh`` (with
``helm-python-sdk``, Helm v4 as a library). Every rendering is a :class:`Rendering`, and the tests ask the same
questions of each.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

Resource = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
CHART_DIR = REPO_ROOT / "helm" / "esp-mesh"
KEDA_SCHEMA_PATH = Path(__file__).with_name("schemas") / "keda-scaledobject-v1alpha1.json"
CUSTOM_SCHEMA_PATHS: Mapping[str, Path] = {
    "keda.sh/v1alpha1": KEDA_SCHEMA_PATH,
    "monitoring.coreos.com/v1": Path(__file__).with_name("schemas") / "prometheusrule-v1.json",
}
"""This suite's schemas of the custom resources the manifests use, by apiVersion (one kind each)."""

# The oldest Kubernetes the chart admits (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

SENDER_CLASSES = ("otp", "transactional", "bulk")
GRPC_PORTS: Mapping[str, int] = {
    "ingest": 50051,
    "router": 50052,
    "ledger": 50053,
    "reports": 50054,
    **{f"sender-{sender_class}": 50055 for sender_class in SENDER_CLASSES},
    "campaigns": 50056,
    "webhooks": 50057,
}
COMPONENTS = (*GRPC_PORTS, "gateway")
PUBLIC_PORTS = frozenset({("ingest", 50051), ("gateway", 8080), ("reports", 8081)})
METRICS_PORT = 9464
MONITORING_NAMESPACE_LABEL = {"kubernetes.io/metadata.name": "monitoring"}
IMAGE_REPOSITORY = "ghcr.io/esp-mesh/esp"
KUBECTL = Path(sys.executable).parent / "kubectl"
"""The pinned kubectl that ``make kubectl`` (scripts/kubectl.sh) installs next to the virtualenv's Python, and that
``make test`` therefore guarantees; not one found on PATH, which may be another version (Debian's kubectl 1.20
carries kustomize v2, which cannot read the overlays' ``patches:``)."""

NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"


@dataclass(frozen=True)
class Rendering:
    """The resources one way of deploying ESP mesh produces."""

    name: str
    """Short label for test ids, e.g. ``kustomize-prod`` or ``helm-default``."""
    resources: tuple[Resource, ...]

    def of_kind(self, kind: str) -> list[Resource]:
        """Every resource of ``kind``."""
        return [resource for resource in self.resources if resource["kind"] == kind]

    def named(self, kind: str, name: str) -> Resource:
        """The one resource of ``kind`` named ``name``.

        Raises:
            LookupError: there is none, or more than one.
        """
        matches = [resource for resource in self.of_kind(kind) if resource["metadata"]["name"] == name]
        if len(matches) != 1:
            raise LookupError(f"{self.name}: {len(matches)} {kind} named {name}")
        return matches[0]

    def deployment(self, component: str) -> Resource:
        """The Deployment of ``component`` (``ingest``, ``sender-otp``, ...), found by its name label.

        Raises:
            LookupError: there is none, or more than one.
        """
        matches = [
            deployment
            for deployment in self.of_kind("Deployment")
            if deployment["metadata"]["labels"].get(NAME_LABEL) == component
        ]
        if len(matches) != 1:
            raise LookupError(f"{self.name}: {len(matches)} Deployments for component {component}")
        return matches[0]


def component_of(resource: Mapping[str, Any]) -> str:
    """The component a resource belongs to, from its ``app.kubernetes.io/name`` label."""
    return str(resource["metadata"]["labels"][NAME_LABEL])


def parse_documents(text: str) -> list[Resource]:
    """Every non-empty YAML document in ``text``."""
    return [document for document in yaml.safe_load_all(text) if document is not None]


def kustomize(directory: Path) -> list[Resource]:
    """The resources ``kubectl kustomize directory`` renders.

    Raises:
        AssertionError: kubectl is missing (run ``make kubectl``) or kustomize refused the kustomization.
    """
    assert KUBECTL.is_file(), f"{KUBECTL} is missing: run `make kubectl` (scripts/kubectl.sh installs it)"
    completed = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, f"kubectl kustomize {directory}: {completed.stderr}"
    return parse_documents(completed.stdout)


def render_kustomize(overlay: str) -> Rendering:
    """An overlay of ``k8s/overlays`` together with its migrations Job (``<overlay>/migrate``)."""
    directory = K8S_DIR / "overlays" / overlay
    resources = kustomize(directory) + kustomize(directory / "migrate")
    return Rendering(name=f"kustomize-{overlay}", resources=tuple(resources))


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """Split ``repo[:tag][@digest]`` into its name, tag and digest."""
    name, _, digest = image.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def render_helm_templates(
    values: Mapping[str, Any] | None = None, *, release: str = "esp", namespace: str = "esp"
) -> dict[str, str]:
    """The chart's rendered templates by path (NOTES.txt included), as ``helm template`` would print them.

    Raises:
        helm_python.HelmValuesError: the values break values.schema.json.
        helm_python.HelmRenderError: a template failed (including the chart's own ``fail`` checks).
    """
    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.render(
            values=dict(values) if values is not None else None, name=release, namespace=namespace, is_install=True
        )


def render_helm(
    name: str, values: Mapping[str, Any] | None = None, *, release: str = "esp", namespace: str = "esp"
) -> Rendering:
    """The chart's Kubernetes resources for ``values`` (merged over values.yaml)."""
    templates = render_helm_templates(values, release=release, namespace=namespace)
    resources: list[Resource] = []
    for path, text in sorted(templates.items()):
        if not path.endswith(".txt"):
            resources.extend(parse_documents(text))
    return Rendering(name=name, resources=tuple(resources))


def load_values_file(name: str) -> dict[str, Any]:
    """A values file of the chart, e.g. ``values.yaml`` or ``ci/prod-values.yaml``."""
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / name).read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _custom_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def schema_errors(resource: Mapping[str, Any], kubernetes_version: str) -> list[str]:
    """Why ``resource`` is not a valid object for ``kubernetes_version`` (empty when it is).

    Built-in kinds are checked against the Kubernetes OpenAPI schemas bundled with kubernetes-validate,
    in strict mode (unknown fields are errors); KEDA ScaledObjects and Prometheus Operator PrometheusRules
    against this suite's schemas (:data:`CUSTOM_SCHEMA_PATHS`). A kind with no schema is itself an error:
    nothing passes unvalidated.
    """
    where = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    custom = CUSTOM_SCHEMA_PATHS.get(str(resource.get("apiVersion")))
    if custom is not None:
        return [
            f"{where}: {'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in _custom_validator(custom).iter_errors(dict(resource))
        ]
    try:
        kubernetes_validate.validate(dict(resource), kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {'/'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error.message}"]
    return []


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or Job."""
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    """The labels of a Deployment's or Job's pods."""
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def workloads(rendering: Rendering) -> list[Resource]:
    """Every Deployment and Job (everything that runs pods)."""
    return rendering.of_kind("Deployment") + rendering.of_kind("Job")


def containers(workload: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container and init container of a workload's pods."""
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container_port(container: Mapping[str, Any], port_name: str) -> int | None:
    """The number of the container port named ``port_name``, if it has one."""
    for port in container.get("ports", []):
        if port.get("name") == port_name:
            return int(port["containerPort"])
    return None


def matches(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a ``matchLabels`` selector selects an object with ``labels``."""
    return all(labels.get(key) == value for key, value in match_labels.items())


def match_labels(selector: Mapping[str, Any]) -> dict[str, str]:
    """A label selector's ``matchLabels``; selectors here never use ``matchExpressions``.

    Raises:
        AssertionError: the selector uses ``matchExpressions``, which these checks do not evaluate.
    """
    assert "matchExpressions" not in selector, f"matchExpressions are not evaluated by these tests: {selector}"
    labels: dict[str, str] = selector.get("matchLabels", {})
    return labels


def autoscaler_targets(rendering: Rendering) -> dict[str, list[str]]:
    """For each Deployment name, the autoscalers (``Kind/name``) that scale it."""
    targets: dict[str, list[str]] = {
        deployment["metadata"]["name"]: [] for deployment in rendering.of_kind("Deployment")
    }
    for autoscaler in rendering.of_kind("HorizontalPodAutoscaler") + rendering.of_kind("ScaledObject"):
        reference = autoscaler["spec"]["scaleTargetRef"]
        if reference.get("kind", "Deployment") == "Deployment":
            targets.setdefault(reference["name"], []).append(f"{autoscaler['kind']}/{autoscaler['metadata']['name']}")
    return targets


def scales_on_cpu(autoscaler: Mapping[str, Any]) -> bool:
    """Whether an HPA or a ScaledObject scales on CPU utilisation."""
    if autoscaler["kind"] == "HorizontalPodAutoscaler":
        return any(
            metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
            for metric in autoscaler["spec"].get("metrics", [])
        )
    return any(trigger["type"] == "cpu" for trigger in autoscaler["spec"]["triggers"])


def replica_range(autoscaler: Mapping[str, Any]) -> tuple[int, int]:
    """An HPA's or ScaledObject's (minimum, maximum) replicas."""
    spec = autoscaler["spec"]
    if autoscaler["kind"] == "HorizontalPodAutoscaler":
        return int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
    return int(spec.get("minReplicaCount", 0)), int(spec.get("maxReplicaCount", 100))


def peer_scope(peer: Mapping[str, Any]) -> str:
    """Who a NetworkPolicy peer admits: ``mesh``, ``monitoring`` or ``outside``.

    A bare ``podSelector`` stays inside the namespace; a ``namespaceSelector`` that names exactly the
    monitoring namespace admits Prometheus; anything else (ipBlock, other namespaces) is the outside.
    """
    if set(peer) == {"podSelector"}:
        return "mesh"
    if set(peer) == {"namespaceSelector"} and match_labels(peer["namespaceSelector"]) == MONITORING_NAMESPACE_LABEL:
        return "monitoring"
    return "outside"


def ingress_reachability(rendering: Rendering) -> set[tuple[str, str, int | str]]:
    """Every (component, scope, port) an ingress NetworkPolicy rule admits; port ``*`` means all ports.

    The scope is that of :func:`peer_scope`; a rule without ``from`` admits the ``outside``.
    """
    reachable: set[tuple[str, str, int | str]] = set()
    for policy in rendering.of_kind("NetworkPolicy"):
        selector = match_labels(policy["spec"]["podSelector"])
        selected = [
            component_of(deployment)
            for deployment in rendering.of_kind("Deployment")
            if matches(selector, pod_labels(deployment))
        ]
        for rule in policy["spec"].get("ingress", []):
            scopes = {peer_scope(peer) for peer in rule["from"]} if rule.get("from") else {"outside"}
            ports: list[int | str] = [port["port"] for port in rule.get("ports", [])] or ["*"]
            reachable.update((component, scope, port) for component in selected for scope in scopes for port in ports)
    return reachable


def mesh_callers(rendering: Rendering) -> dict[tuple[str, int | str], set[str]]:
    """For every (component, port) a ``mesh`` rule of :func:`ingress_reachability` opens, the components whose pods
    the rule's pod selectors admit."""
    deployments = rendering.of_kind("Deployment")
    callers: dict[tuple[str, int | str], set[str]] = {}
    for policy in rendering.of_kind("NetworkPolicy"):
        selector = match_labels(policy["spec"]["podSelector"])
        selected = [component_of(d) for d in deployments if matches(selector, pod_labels(d))]
        for rule in policy["spec"].get("ingress", []):
            peers = [peer for peer in rule.get("from", []) if peer_scope(peer) == "mesh"]
            admitted = {
                component_of(d)
                for peer in peers
                for d in deployments
                if matches(match_labels(peer["podSelector"]), pod_labels(d))
            }
            ports: list[int | str] = [port["port"] for port in rule.get("ports", [])] or ["*"]
            for component in selected:
                for port in ports:
                    if peers:
                        callers.setdefault((component, port), set()).update(admitted)
    return callers


def egress_rules(rendering: Rendering, deployment: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The egress rules the NetworkPolicies selecting ``deployment``'s pods allow, or None when none restricts its
    egress (no policy lists ``Egress`` in its policyTypes: everything is allowed)."""
    rules: list[dict[str, Any]] | None = None
    for policy in rendering.of_kind("NetworkPolicy"):
        if "Egress" in policy["spec"].get("policyTypes", []) and matches(
            match_labels(policy["spec"]["podSelector"]), pod_labels(deployment)
        ):
            rules = (rules or []) + list(policy["spec"].get("egress", []))
    return rules


def default_deny_covers(rendering: Rendering, deployment: Mapping[str, Any]) -> bool:
    """Whether an ingress-only policy with no rules (deny all) selects ``deployment``'s pods."""
    return any(
        "Ingress" in policy["spec"].get("policyTypes", [])
        and not policy["spec"].get("ingress")
        and matches(match_labels(policy["spec"]["podSelector"]), pod_labels(deployment))
        for policy in rendering.of_kind("NetworkPolicy")
    )


def environment(rendering: Rendering, container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The variables a container gets, by name: from ``env`` as written, from ConfigMaps as ``{"value": ...}``.

    Variables from a Secret through ``envFrom`` cannot be known offline and are left out.

    Raises:
        LookupError: an ``envFrom`` ConfigMap is not part of the rendering.
    """
    variables: dict[str, Mapping[str, Any]] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config_map = rendering.named("ConfigMap", source["configMapRef"]["name"])
            variables.update({key: {"value": value} for key, value in config_map.get("data", {}).items()})
    variables.update({variable["name"]: variable for variable in container.get("env", [])})
    return variables
