"""The environment the manifests give each pod is the one its code reads: every ``ESP_*`` variable is a field of
that service's settings class (derived from the classes themselves, ``libs.common.settings.env_name``), every
secret setting (a field kept out of ``repr``) comes from one key of a Secret, and the Secrets referenced are exactly
those some setting reads — no Secret poured wholesale into the environment for code that never looks at it. Both ways
round: every key of a Secret a pod mounts is a setting its code reads, and every secret setting (a field kept out of
``repr``, or a DSN, which carries a password) its code reads is mounted from a Secret.

Holds for every rendering: both kustomize overlays and the Helm chart with each of its CI values files."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from libs.common.settings import CommonSettings, env_name
from tests.deploy.manifests import REPO_ROOT, Rendering, component_of, environment, pod_spec

SERVICES = REPO_ROOT / "services"


def package_of(component: str) -> str:
    """The service package a Deployment runs (``sender-otp`` → ``sender``)."""
    return component.split("-")[0]


@cache
def settings_class(package: str) -> type[Any]:
    """The settings dataclass ``services/<package>/config.py`` defines (the one its ``__main__`` loads)."""
    module = importlib.import_module(f"services.{package}.config")
    found = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls)
             and cls.__name__.endswith(("Settings", "Config"))]
    assert len(found) == 1, f"services/{package}/config.py: expected one settings class, found {found}"
    return found[0]


def settings_fields(package: str) -> dict[str, dataclasses.Field[Any]]:
    """The fields of the package's settings class, by the variable each is read from."""
    return {env_name(f.name): f for f in dataclasses.fields(settings_class(package))}


def secret_settings(package: str) -> set[str]:
    """The variables of the package's settings that hold secrets: fields kept out of repr, and DSNs (a Postgres DSN
    carries the password)."""
    return {name for name, f in settings_fields(package).items() if not f.repr or f.name.endswith("_dsn")}


@cache
def reads_setting(package: str, field_name: str) -> bool:
    """Whether the package's code reads ``settings.<field_name>`` (a field every service inherits from
    ``CommonSettings`` but only some use, like ``secrets_keys``)."""
    pattern = re.compile(rf"\.{field_name}\b")
    return any(pattern.search(path.read_text()) for path in Path(SERVICES / package).rglob("*.py"))


def containers(rendering: Rendering) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for deployment in rendering.of_kind("Deployment"):
        for container in pod_spec(deployment)["containers"]:
            yield component_of(deployment), container


def test_every_variable_a_pod_gets_is_a_setting_of_its_service(rendering: Rendering):
    unknown = []
    for component, container in containers(rendering):
        known = settings_fields(package_of(component))
        for variable in container.get("env", []):
            name = variable["name"]
            if name not in known:
                unknown.append(f"{component}: {name}")
    assert unknown == []


def test_every_config_map_key_is_a_setting_some_service_reads(rendering: Rendering):
    packages = {path.parent.name for path in SERVICES.glob("*/config.py")}
    read = set().union(*(settings_fields(package) for package in packages))
    unread = [key for config_map in rendering.of_kind("ConfigMap") for key in config_map.get("data", {})
              if key.startswith("ESP_") and key not in read]
    assert unread == []


def test_secret_settings_come_from_one_key_of_a_secret_and_no_secret_is_poured_into_the_environment(
        rendering: Rendering):
    problems = []
    for component, container in containers(rendering):
        secrets = secret_settings(package_of(component))
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                problems.append(f"{component}: every key of Secret {source['secretRef']['name']} as a variable")
        for name, variable in environment(rendering, container).items():
            if name in secrets and "secretKeyRef" not in variable.get("valueFrom", {}):
                problems.append(f"{component}: {name} not from a Secret")
    assert problems == []


def test_the_services_that_read_esp_secrets_keys_share_one_required_secret_and_no_other_gets_it(
        rendering: Rendering):
    """The router seals with it and the senders and reports open with it: with different keys nothing opens."""
    name = env_name("secrets_keys")
    assert name in {env_name(f.name) for f in dataclasses.fields(CommonSettings)}
    references: dict[str, tuple[str, str]] = {}
    readers = set()
    for component, container in containers(rendering):
        variable = environment(rendering, container).get(name)
        if reads_setting(package_of(component), "secrets_keys"):
            readers.add(package_of(component))
            assert variable is not None, f"{component} reads {name} but is not given it"
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference.get("optional") is not True, component
            references[component] = (reference["name"], reference["key"])
        else:
            assert variable is None, f"{component} is given {name} but never reads it"

    assert {"router", "sender", "reports"} <= readers
    assert len(set(references.values())) == 1


def test_the_secrets_the_documentation_lists_are_the_ones_the_manifests_reference(rendering: Rendering):
    referenced = set()
    for _, container in containers(rendering):
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                referenced.add(reference["name"].removeprefix("esp-prod-"))
    documented = set(re.findall(r"^\| `(esp-[a-z0-9-]+)`", (REPO_ROOT / "docs/DEPLOYMENT.md").read_text(), re.M))

    assert referenced == documented


def secret_references(container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The container's variables that come from a key of a Secret, with their ``secretKeyRef``."""
    return {
        variable["name"]: variable["valueFrom"]["secretKeyRef"]
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }


def test_every_secret_key_a_pod_mounts_is_a_setting_its_code_reads(rendering: Rendering):
    """A Secret's key in the environment of a service that never reads it is a secret exposed for nothing (or a
    variable the code stopped reading, silently ignored)."""
    unread = []
    for component, container in containers(rendering):
        package = package_of(component)
        fields = settings_fields(package)
        for name, reference in secret_references(container).items():
            field = fields.get(name)
            if field is None or not reads_setting(package, field.name):
                unread.append(f"{component}: {name} (Secret {reference['name']}, key {reference['key']})")
    assert unread == []


def test_every_secret_setting_a_service_reads_is_mounted_from_a_secret(rendering: Rendering):
    """A secret setting the code reads but no manifest provides keeps its empty default in the cluster: the feature
    behind it (admin access, S3 keys, sealing keys) silently off, or the service unable to start."""
    missing = []
    for component, container in containers(rendering):
        package = package_of(component)
        mounted = secret_references(container)
        for name in sorted(secret_settings(package)):
            if reads_setting(package, settings_fields(package)[name].name) and name not in mounted:
                missing.append(f"{component}: {name}")
    assert missing == []
