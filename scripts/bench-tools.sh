#!/usr/bin/env bash
# What `make bench` needs beyond the virtualenv: h2load (Debian's nghttp2-client), the C HTTP/2 load generator
# bench/ingest_bench.py drives SendEmail with, and every benchmark its gRPC floor (bench/floor.py).
set -euo pipefail
if command -v h2load >/dev/null; then
  exit 0
fi
bash "$(dirname "$0")/apt-install.sh" bench-tools nghttp2-client
command -v h2load >/dev/null
