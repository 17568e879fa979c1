#!/usr/bin/env bash
# Installs Debian's Chromium and its driver for the browser tests, unless they are already present.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "The browser tests need Debian's chromium: run 'sudo apt-get install -y chromium chromium-driver'." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
