#!/usr/bin/env bash
# Build the brain's image with podman from this working tree, on the local base image that
# deploy/podman/setup.sh made. The runtime-dependency layer is cached on pyproject.toml, so after
# the first build a code change rebuilds in seconds.
#
#   deploy/podman/build-image.sh [IMAGE]      (default $CNC_IMAGE, else localhost/cncbrain:dev)
#
# CNC_BASE_IMAGE picks the base (default localhost/cnc-python:3.11-bookworm).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}"
image="${1:-${CNC_IMAGE:-localhost/cncbrain:dev}}"
base="${CNC_BASE_IMAGE:-localhost/cnc-python:3.11-bookworm}"

if ! podman image exists "$base"; then
  echo "build-image: no base image $base; run deploy/podman/setup.sh first" >&2
  exit 1
fi
# Concurrent builds of one tag (two test runs) would untag each other's result.
exec 9>/run/lock/cnc-image-build.lock
flock 9
started=$SECONDS
old="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
podman build --quiet --layers \
  -f "$root/deploy/Containerfile" --ignorefile "$root/deploy/Containerfile.dockerignore" \
  --build-arg BASE_IMAGE="$base" -t "$image" "$root" >/dev/null
new="$(podman image inspect --format '{{.Id}}' "$image")"
# The image this tag named before, and the build stage's image of that build, are garbage now;
# the layers below the code (the runtime dependencies) stay cached as parents of the new image.
if [[ -n $old && $old != "$new" ]]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
podman image prune -f --filter label=io.cncbrain.image=1 >/dev/null 2>&1 || true
echo "build-image: $image (${new:0:12}) in $((SECONDS - started)) s" >&2
