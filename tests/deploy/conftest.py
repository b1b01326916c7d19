"""Renderings shared by the deploy tests; every one is produced offline, with no cluster."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import Rendering, load_values_file, render_helm, render_kustomize

RENDERINGS = ("kustomize-dev", "kustomize-prod", "helm-default", "helm-prod", "helm-without-keda")


def _render(name: str) -> Rendering:
    if name.startswith("kustomize-"):
        return render_kustomize(name.removeprefix("kustomize-"))
    if name == "helm-default":
        return render_helm(name)
    if name == "helm-prod":
        return render_helm(name, load_values_file("ci/prod-values.yaml"), release="esp-prod", namespace="esp-prod")
    return render_helm(name, load_values_file("ci/no-keda-values.yaml"))


@pytest.fixture(scope="session")
def renderings() -> dict[str, Rendering]:
    """Every rendering, by name, rendered once per session."""
    return {name: _render(name) for name in RENDERINGS}


@pytest.fixture(params=RENDERINGS)
def rendering(request: pytest.FixtureRequest, renderings: dict[str, Rendering]) -> Rendering:
    """Each way of deploying ESP mesh in turn: the tests using it hold for all of them."""
    return renderings[request.param]
