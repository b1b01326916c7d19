#!/usr/bin/env bash
# What the dashboard's browser test (tests/dashboard) drives: headless Chromium and its WebDriver, Debian's
# chromium and chromium-driver. Installed when missing, a no-op once they are there.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
bash "$(dirname "$0")/apt-install.sh" browser-tools chromium chromium-driver
test -x /usr/bin/chromium && test -x /usr/bin/chromedriver
