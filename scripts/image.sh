#!/usr/bin/env bash
# `make image`: builds the one ESP mesh image (Dockerfile) with buildah, then checks what it built.
#
# No Docker engine runs on the machines this project is built on and no registry but the package registries is
# reachable, so:
#   - buildah and debootstrap come from Debian's packages (installed when missing, as scripts/browser-tools.sh
#     installs Chromium); buildah runs with `--isolation chroot` and the vfs storage driver, which need neither a
#     daemon nor user namespaces nor overlayfs, its storage under .dev/image;
#   - the base (the Dockerfile's BASE) is debootstrapped from Debian's packages (bookworm, minbase) and imported
#     once as localhost/esp-base:bookworm, instead of pulling debian:bookworm-slim;
#   - the host's CA bundle is passed as the build secret pip-ca, for a TLS-intercepting proxy in front of PyPI.
# The image is tagged IMAGE:TAG (default ghcr.io/esp-mesh/esp:<the version in pyproject.toml>, the tag the chart
# and the prod overlay deploy) and written as an OCI archive to .dev/image/esp-<TAG>.oci.tar, for
# `skopeo copy oci-archive:... docker://...` or `podman load`.
#
# Then it checks the image itself: numeric non-root user, no compiler, buf, pip or dev tools, generated code
# present, entrypoint and bytecode in place, every service name starting its module. With CHECK_SERVERS=1 (and
# Postgres, Redis and NATS on their usual loopback ports) it also runs the migrations and starts the ledger inside
# the image and asks it for gRPC health; chroot isolation shares the host's network, so loopback reaches them.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-ghcr.io/esp-mesh/esp}
TAG=${TAG:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE=localhost/esp-base:$SUITE
WORK=$PWD/.dev/image
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)

say() { echo "image: $*" >&2; }

install_tools() {
  if command -v buildah >/dev/null && command -v debootstrap >/dev/null; then
    return
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  if ! command -v apt-get >/dev/null; then
    say "buildah and debootstrap are missing and there is no apt-get here; install them, or build the" \
        "Dockerfile with another builder"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local packages=(buildah debootstrap)
  $sudo apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq "${packages[@]}" >/dev/null; }
}

# Debian bookworm, minbase variant, as a one-layer image; made once, kept in .dev/image/storage.
build_base() {
  if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
    return
  fi
  say "debootstrapping $SUITE from $MIRROR for the base image"
  local started=$SECONDS
  local rootfs=$WORK/base/rootfs
  rm -rf "$WORK/base" && mkdir -p "$rootfs"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$WORK/base/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/base/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  tar --numeric-owner -C "$rootfs" -cf "$WORK/base/rootfs.tar" .
  rm -rf "$rootfs"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$WORK/base/Containerfile"
  "${BUILDAH[@]}" bud --quiet --isolation chroot -t "$BASE" "$WORK/base" >/dev/null
  rm -f "$WORK/base/rootfs.tar"
  say "base $BASE made in $((SECONDS - started)) s"
}

build_image() {
  say "building $IMAGE:$TAG"
  local secret=()
  if [ -f "$CA_BUNDLE" ]; then
    secret=(--secret "id=pip-ca,src=$CA_BUNDLE")
  fi
  local started=$SECONDS
  # No --layers: with the vfs driver every cached layer is a full copy of the file system, and the source steps
  # change with every commit anyway. The image a rebuild untags is removed with the build stage (--prune), so
  # .dev/image holds the base and one image.
  "${BUILDAH[@]}" bud --isolation chroot --layers=false --build-arg "BASE=$BASE" "${secret[@]}" \
    -t "$IMAGE:$TAG" -f Dockerfile . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; exit 1; }
  "${BUILDAH[@]}" rmi --prune >/dev/null
  say "built in $((SECONDS - started)) s (log: .dev/image/build.log)"
}

# Runs a command in a fresh container of the image as the image's own user and environment.
in_image() {
  "${BUILDAH[@]}" run --isolation chroot "${run_env[@]}" "$container" -- "$@"
}

check_image() {
  local started=$SECONDS
  local user
  user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE:$TAG")
  [ "$user" = "10001:10001" ] || { say "image user is '$user', not 10001:10001"; exit 1; }
  local entrypoint
  entrypoint=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE:$TAG")
  [ "$entrypoint" = '[esp-service]' ] || { say "entrypoint is $entrypoint"; exit 1; }

  container=$("${BUILDAH[@]}" from --quiet --pull-never "$IMAGE:$TAG")
  trap '"${BUILDAH[@]}" rm "$container" >/dev/null 2>&1 || true' EXIT
  run_env=(--user 10001:10001)
  [ "$(in_image id -u)" = 10001 ] || { say "the image does not run as UID 10001"; exit 1; }
  local tool
  for tool in gcc cc g++ make buf pip pip3 protoc; do
    if in_image sh -c "command -v $tool" >/dev/null 2>&1; then
      say "the final image has $tool"
      exit 1
    fi
  done
  in_image python -c '
import importlib.util, pathlib, sys
for absent in ("grpc_tools", "pytest", "ruff", "mypy", "pip", "setuptools", "numpy", "buf"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is in the image"
import esp.v1  # generated code, through the .pth file
assert pathlib.Path("/opt/esp/gen/esp.binpb").stat().st_size > 0
assert list(pathlib.Path("/opt/esp/gen/esp").rglob("__pycache__/*.pyc")), "generated code is not compiled"
assert sys.flags.dont_write_bytecode
'
  # Every service name imports its module and reaches its settings: with a port that is not a number each one
  # stops there, naming the variable, before it connects anywhere.
  local name
  for name in campaigns gateway ingest ledger reports router sender webhooks; do
    local output
    output=$("${BUILDAH[@]}" run --isolation chroot --user 10001:10001 --env ESP_GRPC_PORT=x \
      --env ESP_GATEWAY_PORT=x "$container" -- esp-service "$name" 2>&1 || true)
    if [[ "$output" != *"ESP_GRPC_PORT"* && "$output" != *"ESP_GATEWAY_PORT"* ]]; then
      say "esp-service $name did not stop at its settings:"
      echo "$output" | tail -20 >&2
      exit 1
    fi
  done
  if in_image esp-service no-such-service >/dev/null 2>&1; then
    say "esp-service accepted an unknown name"
    exit 1
  fi
  local migrate
  migrate=$(in_image esp-service migrate 2>&1 || true)
  [[ "$migrate" == *"usage: python -m dev.migrate"* ]] || { say "esp-service migrate did not start dev.migrate"; exit 1; }
  if [ "${CHECK_SERVERS:-0}" = 1 ]; then
    check_with_servers
  fi
  say "checked in $((SECONDS - started)) s: user 10001, no build tools, generated code, every service name"
}

check_with_servers() {
  local database="esp_image_check_$$"
  psql_admin "CREATE DATABASE $database"
  local dsn="postgresql://postgres@127.0.0.1:5432/$database"
  in_image env ESP_POSTGRES_DSN="$dsn" esp-service migrate | tail -1 >&2
  local port
  port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${BUILDAH[@]}" run --isolation chroot --user 10001:10001 --env ESP_POSTGRES_DSN="$dsn" \
    --env ESP_GRPC_PORT=$port --env ESP_NAMESPACE="image-check-$$" "$container" -- esp-service ledger \
    >"$WORK/ledger.log" 2>&1 &
  local ledger=$!
  local serving=0
  for _ in $(seq 60); do
    if .venv/bin/python -c "
import grpc, sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel('127.0.0.1:$port') as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
sys.exit(reply.status != health_pb2.HealthCheckResponse.SERVING)" 2>/dev/null; then
      serving=1
      break
    fi
    sleep 1
  done
  kill -TERM "$ledger" 2>/dev/null || true
  wait "$ledger" || true
  psql_admin "DROP DATABASE $database WITH (FORCE)"
  [ "$serving" = 1 ] || { say "the ledger in the image never served gRPC health:"; tail -20 "$WORK/ledger.log" >&2; exit 1; }
  say "the image's ledger served gRPC health on 127.0.0.1:$port"
}

psql_admin() {
  .venv/bin/python -c "
import sys, psycopg
with psycopg.connect('postgresql://postgres@127.0.0.1:5432/postgres', autocommit=True) as connection:
    connection.execute(sys.argv[1])" "$1"
}

export_image() {
  local archive=$WORK/esp-$TAG.oci.tar
  rm -f "$archive"
  "${BUILDAH[@]}" push --quiet "$IMAGE:$TAG" "oci-archive:$archive:$IMAGE:$TAG" >/dev/null
  local size
  size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE:$TAG")
  say "$IMAGE:$TAG: $size unpacked; $(du -h "$archive" | cut -f1) as $archive"
}

mkdir -p "$WORK"
install_tools
build_base
build_image
check_image
export_image
