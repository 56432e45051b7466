#!/usr/bin/env bash
# Prepare rootful podman + podman-compose on a Debian bookworm host that reaches the Debian and PyPI
# package registries but no image registry (CI's machines). Idempotent; a second run takes about a
# second. What it does, each step only when it is not done yet:
#   1. apt-installs podman, podman-compose and the pieces they need;
#   2. checks deploy/podman/containers.conf (runc runtime, ulimits the host allows) — podman reads it
#      from $CONTAINERS_CONF, which the caller exports (the script prints the line);
#   3. builds a local base image with Python 3.11 from Debian packages (debootstrap + podman import),
#      because no public base image can be pulled here; it trusts the host's extra CAs (a proxy's);
#   4. runs a container from it to prove the engine works.
#
# Settings (environment):
#   CNC_BASE_IMAGE   name of the local base image   (default localhost/cnc-python:3.11-bookworm)
#   CNC_DEBIAN_MIRROR  mirror for debootstrap       (default: the first Debian URI of the host's apt sources)
#
# Then build and start the stack with the base image standing in for python:3.11-slim:
#   export CONTAINERS_CONF=$PWD/deploy/podman/containers.conf
#   podman build -f deploy/Containerfile --build-arg BASE_IMAGE=localhost/cnc-python:3.11-bookworm \
#       -t localhost/cncbrain:dev .
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
conf="${CONTAINERS_CONF:-$here/containers.conf}"
base_image="${CNC_BASE_IMAGE:-localhost/cnc-python:3.11-bookworm}"
host_mirror() {  # the mirror this host's apt already uses (deb822 or one-line sources)
  { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true
    grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' || true
  } | { grep -v -- '-security' || true; } | head -n 1
}
mirror="${CNC_DEBIAN_MIRROR:-$(host_mirror)}"
if [[ -z $mirror ]]; then
  printf 'podman-setup: no Debian mirror in /etc/apt/sources*; set CNC_DEBIAN_MIRROR\n' >&2
  exit 1
fi
# Bump when the base image's recipe changes: an image with another recipe label is rebuilt.
base_recipe="bookworm-minbase+python3,python3-venv,ca-certificates+host-cas/2"
packages=(podman podman-compose runc debootstrap uidmap slirp4netns fuse-overlayfs
  netavark aardvark-dns iptables)

started=$SECONDS
say() { printf 'podman-setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (rootful podman); try: sudo $0"
  exit 1
fi

# Two CI jobs or engineers running this at once would race on apt and on the image import.
exec 9>/run/lock/cnc-podman-setup.lock
flock 9

# 1. packages
"$here/../apt-ensure.sh" "${packages[@]}"

# 2. containers.conf
if [[ ! -f $conf ]] || ! grep -q '^runtime *= *"runc"' "$conf"; then
  say "$conf must exist and set runtime = \"runc\" (crun refuses this cgroup layout)"
  exit 1
fi
export CONTAINERS_CONF="$conf"

# 3. local base image
have_recipe="$(podman image inspect --format '{{ index .Labels "cnc.base.recipe" }}' "$base_image" 2>/dev/null || true)"
if [[ $have_recipe != "$base_recipe" ]]; then
  say "building $base_image with debootstrap (a few minutes)"
  old_id="$(podman image inspect --format '{{.Id}}' "$base_image" 2>/dev/null || true)"
  rootfs="$(mktemp -d /var/tmp/cnc-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
  # The host may reach the registries through a TLS-inspecting proxy whose CA only the host trusts;
  # the image trusts what the host trusts, and pip uses the system store rather than its own.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi
  # Like the official slim images: no package cache or lists in the image.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL cnc.base.recipe=$base_recipe" \
    - "$base_image" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  # The previous recipe's image is now untagged; images built on it keep it alive.
  [[ -n $old_id ]] && podman rmi "$old_id" >/dev/null 2>&1 || true
fi

# 4. prove it
if ! out="$(podman run --rm --network none "$base_image" python3 -c 'import sys; print(sys.version.split()[0])' 2>&1)"; then
  say "a container does not start:"
  printf '%s\n' "$out" >&2
  exit 1
fi
say "ready in $((SECONDS - started)) s: podman $(podman version --format '{{.Client.Version}}'), base image $base_image (Python $out)"
echo "export CONTAINERS_CONF=$conf"
