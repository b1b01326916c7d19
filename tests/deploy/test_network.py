"""Only ingest (gRPC), gateway (HTTP) and the reports webhook receiver are reachable from outside; internal
gRPC is open to the mesh's own pods (campaigns' and webhooks' to ingest alone), metrics to the monitoring namespace,
and everything else is denied. Egress is open but for webhooks, which calls customers' URLs: public https, its own
dependencies, and nothing else inside the cluster or the private network."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from tests.deploy.manifests import (
    METRICS_PORT,
    PUBLIC_PORTS,
    Rendering,
    component_of,
    container_port,
    default_deny_covers,
    egress_rules,
    ingress_reachability,
    match_labels,
    matches,
    mesh_callers,
    pod_labels,
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

    assert mesh == {
        ("router", 50052),
        ("ledger", 50053),
        ("reports", 50054),
        ("campaigns", 50056),
        ("webhooks", 50057),
    }


def test_campaigns_is_reachable_from_ingest_alone(rendering: Rendering):
    """Every CampaignService call comes through the edge, which authenticates it; campaigns trusts the caller
    metadata ingest adds, so no other pod may reach it."""
    assert mesh_callers(rendering)[("campaigns", 50056)] == {"ingest"}


def test_webhooks_is_reachable_from_ingest_alone(rendering: Rendering):
    """WebhookService is forwarded by the edge, which authenticates the caller; webhooks trusts the caller metadata."""
    assert mesh_callers(rendering)[("webhooks", 50057)] == {"ingest"}


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


# What customers' URLs must never reach, whatever their names resolve to (RFC 1918, CGNAT, loopback, link-local
# and cloud metadata, unique-local IPv6).
INTERNAL_ADDRESSES = (
    "10.0.0.1",
    "10.96.0.10",
    "172.16.5.4",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "169.254.169.254",
    "::1",
    "fd00:ec2::254",
    "fe80::1",
)
INTERNAL_DEPENDENCY_PORTS = {53, 4222, 4317, 5432}


def _admits_address(peer: Mapping[str, Any], address: str) -> bool:
    block = peer.get("ipBlock")
    if block is None:
        return False
    ip = ipaddress.ip_address(address)
    network = ipaddress.ip_network(block["cidr"])
    if ip.version != network.version or ip not in network:
        return False
    return not any(ip in ipaddress.ip_network(excepted) for excepted in block.get("except", []))


def _rule_ports(rule: Mapping[str, Any]) -> set[int | str]:
    return {port["port"] for port in rule.get("ports", [])} or {"*"}


def test_only_webhooks_restricts_its_egress(rendering: Rendering):
    restricted = {component_of(d) for d in rendering.of_kind("Deployment") if egress_rules(rendering, d) is not None}

    assert restricted == {"webhooks"}


def test_webhooks_egress_reaches_public_https(rendering: Rendering):
    rules = egress_rules(rendering, rendering.deployment("webhooks")) or []
    https = [rule for rule in rules if 443 in _rule_ports(rule)]

    for address in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"):
        assert any(_admits_address(peer, address) for rule in https for peer in rule["to"]), address


def test_webhooks_egress_never_reaches_internal_addresses_but_on_its_dependencies_ports(rendering: Rendering):
    """An ipBlock rule is the only way to the outside; none may admit an internal address, and the port-only rules
    (a managed Postgres or NATS on a private address) open just the dependencies' ports."""
    for rule in egress_rules(rendering, rendering.deployment("webhooks")) or []:
        ports = _rule_ports(rule)
        assert "*" not in ports, rule
        if "to" not in rule:
            assert ports <= INTERNAL_DEPENDENCY_PORTS, rule
            continue
        for peer in rule["to"]:
            assert not any(_admits_address(peer, address) for address in INTERNAL_ADDRESSES), peer


def test_webhooks_egress_reaches_reports_grpc_and_no_other_mesh_pod(rendering: Rendering):
    deployments = rendering.of_kind("Deployment")
    reached: dict[str, set[int | str]] = {}
    for rule in egress_rules(rendering, rendering.deployment("webhooks")) or []:
        for peer in rule.get("to", []):
            if set(peer) == {"podSelector"}:
                for deployment in deployments:
                    if matches(match_labels(peer["podSelector"]), pod_labels(deployment)):
                        reached.setdefault(component_of(deployment), set()).update(_rule_ports(rule))

    assert reached == {"reports": {50054}}


def test_webhooks_egress_allows_dns_over_udp_and_tcp(rendering: Rendering):
    allowed = {
        (port["port"], port.get("protocol", "TCP"))
        for rule in egress_rules(rendering, rendering.deployment("webhooks")) or []
        for port in rule.get("ports", [])
    }

    assert {(53, "UDP"), (53, "TCP")} <= allowed
