"""Only ingest (gRPC), gateway (HTTP) and the reports webhook receiver are reachable from outside; internal
gRPC is open to the mesh's own pods (campaigns' to ingest alone), metrics to the monitoring namespace, and
everything else is denied."""

from __future__ import annotations

from tests.deploy.manifests import (
    METRICS_PORT,
    PUBLIC_PORTS,
    Rendering,
    component_of,
    container_port,
    default_deny_covers,
    ingress_reachability,
    mesh_callers,
    pod_spec,
)


def test_every_deployment_is_under_a_default_deny_ingress_policy(rendering: Rendering):
    uncovered = [
        d["metadata"]["name"] for d in rendering.of_kind("Deployment") if not default_deny_covers(rendering, d)
    ]

    assert uncovered == []


def test_only_the_public_edges_are_reachable_from_outside(rendering: Rendering):
    outside = {(component, port) for component, scope, port in ingress_reachability(rendering) if scope == "outside"}

    assert outside == PUBLIC_PORTS


def test_the_monitoring_namespace_reaches_only_the_metrics_port(rendering: Rendering):
    monitoring = {
        (component, port) for component, scope, port in ingress_reachability(rendering) if scope == "monitoring"
    }

    assert {port for _, port in monitoring} == {METRICS_PORT}
    assert {component for component, _ in monitoring} == {component_of(d) for d in rendering.of_kind("Deployment")}


def test_mesh_pods_reach_exactly_the_internal_grpc_ports(rendering: Rendering):
    mesh = {(component, port) for component, scope, port in ingress_reachability(rendering) if scope == "mesh"}

    assert mesh == {("router", 50052), ("ledger", 50053), ("reports", 50054), ("campaigns", 50056)}


def test_campaigns_is_reachable_from_ingest_alone(rendering: Rendering):
    """Every CampaignService call comes through the edge, which authenticates it; campaigns trusts the caller
    metadata ingest adds, so no other pod may reach it."""
    assert mesh_callers(rendering)[("campaigns", 50056)] == {"ingest"}


def test_the_other_internal_grpc_ports_admit_every_mesh_component(rendering: Rendering):
    everyone = {component_of(d) for d in rendering.of_kind("Deployment")}

    for port in (("router", 50052), ("ledger", 50053), ("reports", 50054)):
        assert mesh_callers(rendering)[port] == everyone, port


def test_senders_accept_no_connections_but_scrapes(rendering: Rendering):
    """Senders only pull from JetStream; their gRPC port exists for the kubelet's health probes alone."""
    reachable = {(component, scope) for component, scope, _ in ingress_reachability(rendering)}

    assert {scope for component, scope in reachable if component.startswith("sender-")} == {"monitoring"}


def test_every_port_a_policy_opens_is_a_port_the_pods_serve(rendering: Rendering):
    served = {
        (component_of(deployment), int(port["containerPort"]))
        for deployment in rendering.of_kind("Deployment")
        for container in pod_spec(deployment)["containers"]
        for port in container.get("ports", [])
    }
    opened = {(component, port) for component, _, port in ingress_reachability(rendering)}

    assert opened - served == set()


def test_every_pod_serves_metrics_on_the_metrics_port(rendering: Rendering):
    for deployment in rendering.of_kind("Deployment"):
        [container] = pod_spec(deployment)["containers"]
        assert container_port(container, "metrics") == METRICS_PORT, deployment["metadata"]["name"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_every_service_is_cluster_internal(rendering: Rendering):
    """Exposure is the job of the cluster's ingress or Gateway API, not of a Service type."""
    assert {service["spec"].get("type", "ClusterIP") for service in rendering.of_kind("Service")} == {"ClusterIP"}


def test_every_service_port_targets_a_named_container_port_of_its_pods(rendering: Rendering):
    deployments = {component_of(deployment): deployment for deployment in rendering.of_kind("Deployment")}
    for service in rendering.of_kind("Service"):
        [container] = pod_spec(deployments[component_of(service)])["containers"]
        for port in service["spec"]["ports"]:
            assert container_port(container, port["targetPort"]) == port["port"], service["metadata"]["name"]


def test_grpc_service_ports_declare_http2(rendering: Rendering):
    """appProtocol lets meshes and L7 load balancers balance gRPC per request instead of per connection."""
    for service in rendering.of_kind("Service"):
        for port in service["spec"]["ports"]:
            if port["name"] == "grpc":
                assert port.get("appProtocol") == "kubernetes.io/h2c", service["metadata"]["name"]
