#!/usr/bin/env bash
# What `make bench` needs beyond the virtualenv: h2load (Debian's nghttp2-client), the C HTTP/2 load generator
# bench/ingest_bench.py drives SendEmail with, and every benchmark its gRPC floor (bench/floor.py).
set -euo pipefail
if command -v h2load >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
if ! command -v apt-get >/dev/null; then
  echo "bench-tools: h2load is missing and there is no apt-get here; install nghttp2's h2load" >&2
  exit 1
fi
$SUDO apt-get install -y --no-install-recommends nghttp2-client >/dev/null \
  || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends nghttp2-client >/dev/null; }
command -v h2load >/dev/null
