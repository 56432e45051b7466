#!/usr/bin/env bash
# Wait until every container of a compose project is running and, where it has a health check,
# healthy; a one-shot container (label io.cncbrain.oneshot: the secrets, the enrollment) until it
# has ended with exit code 0. Podman runs health checks from systemd timers; on hosts without
# systemd nobody runs them, so this script runs each one itself (`podman healthcheck run`) until it
# passes.
#
#   deploy/podman/healthy.sh PROJECT [TIMEOUT_S]     (default 120 s)
#
# Exit 0 when all are healthy; 1 (naming the laggards and showing their last log lines) on timeout.
set -euo pipefail

project="${1:?usage: healthy.sh PROJECT [TIMEOUT_S]}"
timeout_s="${2:-120}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}"

deadline=$((SECONDS + timeout_s))
declare -A passed=()  # a check that passed once is not run again (each one starts a Python)
while :; do
  pending=()
  names="$(podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}')"
  if [[ -z $names ]]; then
    echo "healthy: no containers in project $project" >&2
    exit 1
  fi
  for name in $names; do
    read -r state code oneshot <<<"$(podman inspect --format \
      '{{.State.Status}} {{.State.ExitCode}} {{index .Config.Labels "io.cncbrain.oneshot"}}' "$name")"
    if [[ $oneshot == true ]]; then
      if [[ $state == exited && $code == 0 ]]; then
        continue
      fi
      [[ $state == exited ]] && state="exited with $code"
      pending+=("$name($state)")
      continue
    fi
    if [[ $state != running ]]; then
      unset "passed[$name]"
      pending+=("$name($state)")
      continue
    fi
    [[ -n ${passed[$name]:-} ]] && continue
    has_check="$(podman inspect --format '{{if .Config.Healthcheck}}yes{{end}}' "$name")"
    if [[ -n $has_check ]] && ! podman healthcheck run "$name" >/dev/null 2>&1; then
      pending+=("$name(unhealthy)")
    else
      passed[$name]=1
    fi
  done
  if ((${#pending[@]} == 0)); then
    echo "healthy: all of $project in $((SECONDS + timeout_s - deadline)) s" >&2
    exit 0
  fi
  if ((SECONDS >= deadline)); then
    echo "healthy: not healthy after ${timeout_s} s: ${pending[*]}" >&2
    for p in "${pending[@]}"; do
      echo "--- last log lines of ${p%%(*}" >&2
      podman logs --tail 20 "${p%%(*}" >&2 || true
    done
    exit 1
  fi
  sleep 1
done
