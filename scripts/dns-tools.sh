#!/usr/bin/env bash
# What the sending-domain tests serve their zones with, and make run its demo domain: NSD, an authoritative DNS
# server, Debian's nsd package. Installed when missing, a no-op once it is there. The package's own service is
# not started (no init system here); the tests run nsd on a loopback port of their own.
set -euo pipefail
if command -v nsd >/dev/null || [ -x /usr/sbin/nsd ]; then
  exit 0
fi
bash "$(dirname "$0")/apt-install.sh" dns-tools nsd
test -x /usr/sbin/nsd
