#!/usr/bin/env bash
# Install the operations tools the tests drive (Debian packages), each only when missing; a second
# run takes well under a second:
#   prometheus                 the real Prometheus server, scraping a running brain (tests/integration/test_operations.py)
#   chromium, chromium-driver  headless Chromium, loading the brain's web page (tests/integration/test_web_page.py)
# Exits non-zero when a package cannot be had; the tests that need it then skip with the reason.
set -euo pipefail
packages=(prometheus chromium chromium-driver)
say() { printf 'ops-setup: %s\n' "$*" >&2; }
if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (apt-get)"
  exit 1
fi
exec 9>/run/lock/cnc-ops-setup.lock
flock 9
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
