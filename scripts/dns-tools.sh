#!/usr/bin/env bash
# What the sending-domain tests (tests/common/test_domain_records.py) serve their zones with: NSD, an authoritative
# DNS server, Debian's nsd package. Installed when missing (quietly; root, or sudo), a no-op once it is there. The
# package's own service is not started (no init system here); the tests run nsd on a loopback port of their own.
set -euo pipefail
if command -v nsd >/dev/null || [ -x /usr/sbin/nsd ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
if ! command -v apt-get >/dev/null; then
  echo "dns-tools: nsd is missing and there is no apt-get here; install NSD (an authoritative DNS server)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq --no-install-recommends nsd >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends nsd >/dev/null; }
test -x /usr/sbin/nsd
