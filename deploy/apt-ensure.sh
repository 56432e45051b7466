#!/usr/bin/env bash
# apt-install each named Debian package that is not installed yet (root; one apt run at a time on the
# host). Idempotent: with everything present it only asks dpkg, well under a second.
#   deploy/apt-ensure.sh PACKAGE...
set -euo pipefail
say() { printf 'apt-ensure: %s\n' "$*" >&2; }
if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (apt-get)"
  exit 1
fi
exec 8>/run/lock/cnc-apt-ensure.lock
flock 8
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
