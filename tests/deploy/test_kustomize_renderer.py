"""The small kustomize renderer behaves like kustomize for every feature the overlays use, and refuses the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy import kustomize
from tests.deploy.manifests import K8S_DIR

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "ingest", "labels": {"app": "ingest"}},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "ingest",
                        "image": "ghcr.io/esp-mesh/esp:0.1.0",
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        "resources": {"limits": {"cpu": "1"}},
                    },
                    {"name": "sidecar", "image": "busybox:1.36"},
                ]
            }
        }
    },
}
SCALED_OBJECT = {
    "apiVersion": "keda.sh/v1alpha1",
    "kind": "ScaledObject",
    "metadata": {"name": "sender-otp"},
    "spec": {"triggers": [{"type": "cpu", "name": "a"}, {"type": "nats-jetstream", "name": "b"}]},
}


def write_kustomization(directory: Path, kustomization: dict, files: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, content in files.items():
        if isinstance(content, list) and content and isinstance(content[0], dict) and "kind" in content[0]:
            (directory / name).write_text(yaml.safe_dump_all(content))
        else:
            (directory / name).write_text(yaml.safe_dump(content))
    return directory


def test_strategic_merge_merges_containers_by_name_and_keeps_the_others():
    patch = {
        "spec": {"template": {"spec": {"containers": [{"name": "ingest", "resources": {"limits": {"cpu": "2"}}}]}}}
    }

    merged = kustomize.strategic_merge(DEPLOYMENT, patch, builtin=True)

    ingest, sidecar = merged["spec"]["template"]["spec"]["containers"]
    assert ingest["resources"] == {"limits": {"cpu": "2"}}
    assert ingest["image"] == "ghcr.io/esp-mesh/esp:0.1.0"
    assert sidecar == {"name": "sidecar", "image": "busybox:1.36"}


def test_strategic_merge_merges_env_by_name_and_appends_new_variables():
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "ingest", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}
                    ]
                }
            }
        }
    }

    merged = kustomize.strategic_merge(DEPLOYMENT, patch, builtin=True)

    assert merged["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ]


def test_strategic_merge_deletes_a_key_patched_to_null():
    merged = kustomize.strategic_merge(DEPLOYMENT, {"metadata": {"labels": {"app": None}}}, builtin=True)

    assert merged["metadata"]["labels"] == {}


def test_strategic_merge_replaces_lists_of_custom_resources_whole():
    patch = {"spec": {"triggers": [{"type": "cpu", "name": "a"}]}}

    merged = kustomize.strategic_merge(SCALED_OBJECT, patch, builtin=False)

    assert merged["spec"]["triggers"] == [{"type": "cpu", "name": "a"}]


def test_strategic_merge_leaves_the_original_untouched():
    kustomize.strategic_merge(DEPLOYMENT, {"metadata": {"labels": {"app": "changed"}}}, builtin=True)

    assert DEPLOYMENT["metadata"]["labels"] == {"app": "ingest"}


def test_strategic_merge_refuses_directives():
    with pytest.raises(kustomize.KustomizeError, match=r"\$patch"):
        kustomize.strategic_merge(DEPLOYMENT, {"metadata": {"$patch": "delete"}}, builtin=True)


def test_json6902_replaces_adds_and_removes_members_and_list_items():
    operations = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "other:1"},
        {"op": "add", "path": "/metadata/labels/tier", "value": "edge"},
        {"op": "add", "path": "/spec/template/spec/containers/-", "value": {"name": "last"}},
        {"op": "remove", "path": "/spec/template/spec/containers/1"},
    ]

    patched = kustomize.apply_json6902(DEPLOYMENT, operations)

    containers = patched["spec"]["template"]["spec"]["containers"]
    assert [container["name"] for container in containers] == ["ingest", "last"]
    assert containers[0]["image"] == "other:1"
    assert patched["metadata"]["labels"] == {"app": "ingest", "tier": "edge"}


def test_json6902_unescapes_pointer_tokens():
    document = {"metadata": {"annotations": {"prometheus.io/port": "1"}}}

    patched = kustomize.apply_json6902(
        document, [{"op": "replace", "path": "/metadata/annotations/prometheus.io~1port", "value": "9464"}]
    )

    assert patched == {"metadata": {"annotations": {"prometheus.io/port": "9464"}}}


def test_json6902_replace_of_a_missing_member_is_an_error():
    with pytest.raises(kustomize.KustomizeError, match="no such member"):
        kustomize.apply_json6902(DEPLOYMENT, [{"op": "replace", "path": "/spec/replicas", "value": 3}])


def test_json6902_refuses_operations_it_does_not_implement():
    with pytest.raises(kustomize.KustomizeError, match="'move'"):
        kustomize.apply_json6902(DEPLOYMENT, [{"op": "move", "from": "/a", "path": "/b"}])


@pytest.mark.parametrize(
    ("entry", "image"),
    [
        ({"name": "ghcr.io/esp-mesh/esp", "newTag": "1.2.3"}, "ghcr.io/esp-mesh/esp:1.2.3"),
        ({"name": "ghcr.io/esp-mesh/esp", "newName": "registry.local:5000/esp"}, "registry.local:5000/esp:0.1.0"),
        ({"name": "ghcr.io/esp-mesh/esp", "digest": "sha256:" + "a" * 64}, "ghcr.io/esp-mesh/esp@sha256:" + "a" * 64),
    ],
)
def test_images_entry_rewrites_matching_containers(entry, image):
    resources = [yaml.safe_load(yaml.safe_dump(DEPLOYMENT))]

    kustomize.set_image(resources, entry)

    ingest, sidecar = resources[0]["spec"]["template"]["spec"]["containers"]
    assert ingest["image"] == image
    assert sidecar["image"] == "busybox:1.36"


def test_split_image_tells_a_registry_port_from_a_tag():
    assert kustomize.split_image("registry.local:5000/esp") == ("registry.local:5000/esp", None, None)
    assert kustomize.split_image("registry.local:5000/esp:v1@sha256:ab") == (
        "registry.local:5000/esp",
        "v1",
        "sha256:ab",
    )


def test_namespace_is_set_on_namespaced_resources_only():
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "esp"}}
    deployment = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))

    kustomize.set_namespace([namespace, deployment], "esp-prod")

    assert "namespace" not in namespace["metadata"]
    assert deployment["metadata"]["namespace"] == "esp-prod"


def test_render_builds_nested_kustomizations_then_patches_namespaces_and_images(tmp_path):
    base = write_kustomization(tmp_path / "base", {"resources": ["app.yaml"]}, {"app.yaml": [DEPLOYMENT]})
    overlay = write_kustomization(
        tmp_path / "overlay",
        {
            "namespace": "esp-dev",
            "resources": [str(base)],
            "images": [{"name": "ghcr.io/esp-mesh/esp", "newTag": "main"}],
            "patches": [
                {"path": "resources.yaml", "target": {"kind": "Deployment"}},
                {"path": "labels.yaml"},
            ],
        },
        {
            "resources.yaml": [{"op": "replace", "path": "/spec/template/spec/containers/0/resources", "value": {}}],
            "labels.yaml": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "ingest", "labels": {"env": "dev"}},
            },
        },
    )

    [deployment] = kustomize.render(overlay)

    assert deployment["metadata"] == {
        "name": "ingest",
        "namespace": "esp-dev",
        "labels": {"app": "ingest", "env": "dev"},
    }
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {}
    assert container["image"] == "ghcr.io/esp-mesh/esp:main"


def test_render_refuses_kustomization_fields_it_does_not_implement(tmp_path):
    directory = write_kustomization(
        tmp_path, {"resources": ["app.yaml"], "commonLabels": {"a": "b"}}, {"app.yaml": [DEPLOYMENT]}
    )

    with pytest.raises(kustomize.KustomizeError, match="commonLabels"):
        kustomize.render(directory)


def test_render_refuses_a_resource_defined_twice(tmp_path):
    directory = write_kustomization(
        tmp_path, {"resources": ["a.yaml", "b.yaml"]}, {"a.yaml": [DEPLOYMENT], "b.yaml": [DEPLOYMENT]}
    )

    with pytest.raises(kustomize.KustomizeError, match="defined twice"):
        kustomize.render(directory)


def test_render_refuses_a_patch_that_matches_nothing(tmp_path):
    directory = write_kustomization(
        tmp_path,
        {"resources": ["a.yaml"], "patches": [{"path": "p.yaml"}]},
        {
            "a.yaml": [DEPLOYMENT],
            "p.yaml": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nope"}},
        },
    )

    with pytest.raises(kustomize.KustomizeError, match="matches 0 resources"):
        kustomize.render(directory)


OVERLAYS = ("overlays/dev", "overlays/prod", "overlays/dev/migrate", "overlays/prod/migrate")


KUBECTL = Path(sys.executable).parent / "kubectl"
"""The pinned kubectl that ``make kubectl`` (scripts/kubectl.sh) installs into the virtualenv: not one found on
PATH, which may be too old to read the overlays (Debian's kubectl 1.20 carries kustomize v2)."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_output_equals_kubectl_kustomize(overlay):
    """The oracle check: kustomize itself (built into kubectl) renders every overlay exactly as our renderer does."""
    if not KUBECTL.is_file():
        pytest.fail(f"{KUBECTL} is missing: run `make kubectl` (scripts/kubectl.sh installs it)")
    completed = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S_DIR / overlay)], capture_output=True, text=True, check=True, timeout=60
    )
    expected = {
        kustomize.resource_id(resource): resource for resource in yaml.safe_load_all(completed.stdout) if resource
    }

    actual = {kustomize.resource_id(resource): resource for resource in kustomize.render(K8S_DIR / overlay)}

    assert actual == expected
