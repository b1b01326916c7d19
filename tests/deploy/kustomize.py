"""A small, strict kustomize renderer for this repository's own overlays.

No kustomize binary is installable from the registries this project can reach, so the deploy tests render
``k8s/`` with this module. It implements only what the overlays use, and refuses everything else loudly
(an unknown kustomization field, an unsupported patch operation or selector, a strategic-merge directive)
so a new overlay feature can never be silently ignored:

* ``resources``: YAML files and directories holding a kustomization;
* ``patches``: strategic-merge patches (one or more documents, each naming its target) and JSON 6902
  patches (a list of ``add`` / ``replace`` / ``remove`` operations), with an optional ``target`` chosen by
  ``group``, ``version``, ``kind`` and ``name``;
* ``namespace``: set on every namespaced resource;
* ``images``: ``newName``, ``newTag`` and ``digest`` for every container and init container.

Transformers run in kustomize's order: patches, then namespace, then images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILE_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "namespace", "resources", "images", "patches"})
SUPPORTED_TARGET_FIELDS = frozenset({"group", "version", "kind", "name"})
SUPPORTED_IMAGE_FIELDS = frozenset({"name", "newName", "newTag", "digest"})
SUPPORTED_JSON6902_OPERATIONS = frozenset({"add", "replace", "remove"})

# Kinds that kustomize's namespace transformer leaves without a namespace.
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
        "PersistentVolume",
        "IngressClass",
        "RuntimeClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)

# Strategic-merge keys of the Kubernetes API fields the overlays patch. Lists not named here are replaced
# whole, which is also what kustomize does for every list of a custom resource (JSON merge patch).
STRATEGIC_MERGE_KEYS: Mapping[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

# API groups served by Kubernetes itself; everything else is a custom resource.
BUILTIN_API_GROUPS = frozenset({"", "apps", "batch", "autoscaling", "policy"})


class KustomizeError(Exception):
    """The kustomization is invalid, or uses a feature this renderer does not implement."""


@dataclass(frozen=True)
class ResourceId:
    """What identifies a resource in a kustomize build."""

    api_version: str
    """``apiVersion`` as written, e.g. ``apps/v1``."""
    kind: str
    name: str
    namespace: str | None

    @property
    def group(self) -> str:
        """The API group (empty for the core group)."""
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        """The API version without its group."""
        return self.api_version.rpartition("/")[2]


def resource_id(resource: Mapping[str, Any]) -> ResourceId:
    """The identity of ``resource`` (apiVersion, kind, name, namespace)."""
    metadata = resource.get("metadata") or {}
    return ResourceId(
        api_version=str(resource["apiVersion"]),
        kind=str(resource["kind"]),
        name=str(metadata["name"]),
        namespace=metadata.get("namespace"),
    )


def is_builtin(resource: Mapping[str, Any]) -> bool:
    """Whether ``resource`` belongs to a Kubernetes API group (not a custom resource)."""
    group = resource_id(resource).group
    return group in BUILTIN_API_GROUPS or group.endswith(".k8s.io")


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document in ``path``."""
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def render(directory: Path) -> list[Resource]:
    """Build the kustomization in ``directory`` into its list of resources.

    Raises:
        KustomizeError: the kustomization is invalid or uses an unsupported feature.
    """
    kustomization = _load_kustomization(directory)
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        location = (directory / entry).resolve()
        if location.is_dir():
            resources.extend(render(location))
        elif location.is_file():
            resources.extend(load_documents(location))
        else:
            raise KustomizeError(f"{directory}: resource {entry!r} does not exist")
    _reject_duplicates(resources, directory)

    for patch in kustomization.get("patches", []):
        _apply_patch(resources, patch, directory)
    if "namespace" in kustomization:
        set_namespace(resources, str(kustomization["namespace"]))
    for image in kustomization.get("images", []):
        set_image(resources, image)
    return resources


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for file_name in KUSTOMIZATION_FILE_NAMES:
        candidate = directory / file_name
        if candidate.is_file():
            documents = load_documents(candidate)
            break
    else:
        raise KustomizeError(f"{directory}: no kustomization file")
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise KustomizeError(f"{candidate}: a kustomization is exactly one YAML mapping")
    kustomization: dict[str, Any] = documents[0]
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{candidate}: kind must be Kustomization")
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZATION_FIELDS
    if unsupported:
        raise KustomizeError(f"{candidate}: fields not supported by this renderer: {sorted(unsupported)}")
    return kustomization


def _reject_duplicates(resources: Iterable[Resource], directory: Path) -> None:
    seen: set[ResourceId] = set()
    for resource in resources:
        identity = resource_id(resource)
        if identity in seen:
            raise KustomizeError(f"{directory}: {identity} is defined twice")
        seen.add(identity)


def set_namespace(resources: Iterable[Resource], namespace: str) -> None:
    """Put every namespaced resource in ``namespace``, as kustomize's ``namespace`` field does."""
    for resource in resources:
        if resource["kind"] not in CLUSTER_SCOPED_KINDS:
            resource.setdefault("metadata", {})["namespace"] = namespace


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """Split ``repo[:tag][@digest]`` into its name, tag and digest."""
    name, _, digest = image.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def set_image(resources: Iterable[Resource], image: Mapping[str, Any]) -> None:
    """Apply one ``images`` entry to every container and init container whose image name matches."""
    unsupported = set(image) - SUPPORTED_IMAGE_FIELDS
    if unsupported or "name" not in image:
        raise KustomizeError(f"images entry {dict(image)!r}: needs 'name'; unsupported fields {sorted(unsupported)}")
    for resource in resources:
        for container in _containers(resource):
            name, tag, digest = split_image(str(container.get("image", "")))
            if name != image["name"]:
                continue
            name = str(image.get("newName", name))
            if "newTag" in image:
                tag, digest = str(image["newTag"]), None
            if "digest" in image:
                tag, digest = None, str(image["digest"])
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _containers(node: Any) -> Iterable[dict[str, Any]]:
    """Every container or init container anywhere under ``node`` (pods, templates, job templates)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (item for item in value if isinstance(item, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _apply_patch(resources: list[Resource], patch: Mapping[str, Any], directory: Path) -> None:
    unsupported = set(patch) - {"path", "patch", "target"}
    if unsupported or ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{directory}: a patch has exactly one of 'path' or 'patch' (and an optional target)")
    if "path" in patch:
        documents = load_documents(directory / str(patch["path"]))
    else:
        documents = [document for document in yaml.safe_load_all(str(patch["patch"])) if document is not None]
    target = patch.get("target")

    if len(documents) == 1 and isinstance(documents[0], list):
        if target is None:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        for resource in _select(resources, target, directory):
            replacement = apply_json6902(resource, documents[0])
            resource.clear()
            resource.update(replacement)
        return

    for document in documents:
        if not isinstance(document, dict):
            raise KustomizeError(f"{directory}: a strategic-merge patch is a YAML mapping")
        if target is not None:
            matched = _select(resources, target, directory)
            # With a target the patch's own identity is only a placeholder, as in kustomize.
            body = {key: value for key, value in document.items() if key not in ("apiVersion", "kind")}
            metadata = {
                key: value for key, value in (body.get("metadata") or {}).items() if key not in ("name", "namespace")
            }
            body["metadata"] = metadata
        else:
            wanted = resource_id(document)
            matched = [
                resource
                for resource in resources
                if resource_id(resource).kind == wanted.kind
                and resource_id(resource).name == wanted.name
                and resource_id(resource).group == wanted.group
            ]
            if len(matched) != 1:
                raise KustomizeError(
                    f"{directory}: strategic-merge patch for {wanted} matches {len(matched)} resources"
                )
            body = document
        for resource in matched:
            merged = strategic_merge(resource, body, builtin=is_builtin(resource))
            resource.clear()
            resource.update(merged)


def _select(resources: list[Resource], target: Mapping[str, Any], directory: Path) -> list[Resource]:
    unsupported = set(target) - SUPPORTED_TARGET_FIELDS
    if unsupported:
        raise KustomizeError(f"{directory}: patch target fields not supported: {sorted(unsupported)}")
    selected = []
    for resource in resources:
        identity = resource_id(resource)
        actual = {"group": identity.group, "version": identity.version, "kind": identity.kind, "name": identity.name}
        if all(actual[field] == str(value) for field, value in target.items()):
            selected.append(resource)
    if not selected:
        raise KustomizeError(f"{directory}: patch target {dict(target)!r} matches no resource")
    return selected


def strategic_merge(original: Any, patch: Any, *, builtin: bool) -> Any:
    """Merge ``patch`` into ``original`` the way a strategic-merge patch does, returning a new value.

    Mappings merge key by key (a ``null`` value deletes the key); lists named in
    :data:`STRATEGIC_MERGE_KEYS` merge item by item on their key for built-in kinds; any other list, and
    any list of a custom resource, is replaced.

    Raises:
        KustomizeError: the patch uses a ``$``-directive, which this renderer does not implement.
    """
    if not isinstance(original, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"strategic-merge directive {key!r} is not supported")
        if value is None:
            merged.pop(key, None)
        elif key in merged and isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = strategic_merge(merged[key], value, builtin=builtin)
        elif builtin and key in STRATEGIC_MERGE_KEYS and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = _merge_list(merged[key], value, STRATEGIC_MERGE_KEYS[key], builtin=builtin)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_list(original: list[Any], patch: list[Any], merge_key: str, *, builtin: bool) -> list[Any]:
    merged = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"every patched list item needs its merge key {merge_key!r}: {item!r}")
        position = next(
            (index for index, existing in enumerate(merged) if existing.get(merge_key) == item[merge_key]), None
        )
        if position is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[position] = strategic_merge(merged[position], item, builtin=builtin)
    return merged


def apply_json6902(document: Any, operations: Iterable[Mapping[str, Any]]) -> Any:
    """Apply RFC 6902 ``add`` / ``replace`` / ``remove`` operations to a copy of ``document``.

    Raises:
        KustomizeError: an unsupported operation, or a path that does not exist where it must.
    """
    result = copy.deepcopy(document)
    for operation in operations:
        op = operation.get("op")
        if op not in SUPPORTED_JSON6902_OPERATIONS:
            raise KustomizeError(f"JSON 6902 operation {op!r} is not supported")
        tokens = _pointer_tokens(str(operation["path"]))
        if not tokens:
            raise KustomizeError("JSON 6902 operations on the whole document are not supported")
        parent = _resolve(result, tokens[:-1])
        last = tokens[-1]
        value = copy.deepcopy(operation.get("value"))
        if isinstance(parent, dict):
            if op != "add" and last not in parent:
                raise KustomizeError(f"{op} {operation['path']}: no such member")
            if op == "remove":
                del parent[last]
            else:
                parent[last] = value
        elif isinstance(parent, list):
            if op == "add" and last == "-":
                parent.append(value)
                continue
            index = _list_index(parent, last, allow_end=op == "add", path=str(operation["path"]))
            if op == "add":
                parent.insert(index, value)
            elif op == "replace":
                parent[index] = value
            else:
                del parent[index]
        else:
            raise KustomizeError(f"{op} {operation['path']}: parent is not a mapping or a list")
    return result


def _pointer_tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise KustomizeError(f"JSON pointer {pointer!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _resolve(document: Any, tokens: list[str]) -> Any:
    node = document
    for token in tokens:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, allow_end=False, path=token)]
        else:
            raise KustomizeError(f"JSON pointer token {token!r} does not exist")
    return node


def _list_index(items: list[Any], token: str, *, allow_end: bool, path: str) -> int:
    if not token.isdigit():
        raise KustomizeError(f"{path}: {token!r} is not a list index")
    index = int(token)
    if index > len(items) or (index == len(items) and not allow_end):
        raise KustomizeError(f"{path}: index {index} is out of range")
    return index
