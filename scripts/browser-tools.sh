#!/usr/bin/env bash
# What the dashboard's browser test (tests/dashboard) drives: headless Chromium and its WebDriver, Debian's
# chromium and chromium-driver. Installed when missing (quietly; root, or sudo), a no-op once they are there.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
if ! command -v apt-get >/dev/null; then
  echo "browser-tools: chromium and chromedriver are missing and there is no apt-get here;" \
       "install Chromium and its chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
packages=(chromium chromium-driver)
$SUDO apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null; }
test -x /usr/bin/chromium && test -x /usr/bin/chromedriver
