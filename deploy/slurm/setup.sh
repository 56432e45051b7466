#!/usr/bin/env bash
# Install the Debian packages of a local Slurm cluster (slurmctld, slurmd, slurm-client, munge) for
# tests/slurm and `cncbrain up --slurm-site`, through deploy/apt-ensure.sh (idempotent: with them
# installed it only asks dpkg). The packages' own services are not started (a policy-rc.d denies it
# for the install): the tests and `up` run their own munged, slurmctld and slurmd in a folder of theirs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
packages=(slurmctld slurmd slurm-client munge)
missing=0
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing=1
done
((missing)) || exit 0
policy=/usr/sbin/policy-rc.d
if [[ $(id -u) -eq 0 && ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
"$here/../apt-ensure.sh" "${packages[@]}"
printf 'slurm-setup: Slurm %s installed\n' "$(dpkg-query -W -f='${Version}' slurmctld)" >&2
