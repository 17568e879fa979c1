#!/usr/bin/env bash
# Installs Debian's Chromium and its driver for the browser tests, unless they are already present: as root, or
# through sudo when it needs no password prompt.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "The browser tests need Debian's chromium: run 'sudo apt-get install -y chromium chromium-driver'," >&2
  echo "then 'make test' again." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver >/dev/null
