#!/usr/bin/env bash
# Install Debian packages quietly (root, or sudo), refreshing the package lists only when the first try fails.
# Usage: scripts/apt-install.sh <who needs them> <package>...  (the callers check first whether they are missing).
set -euo pipefail
who="$1"
shift
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
if ! command -v apt-get >/dev/null; then
  echo "$who: $* missing and there is no apt-get here; install them with this system's package manager" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
