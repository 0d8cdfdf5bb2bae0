#!/usr/bin/env bash
# Builds the drun image from deploy/Containerfile with podman, then runs it as the image's own
# user to check that it is complete: every library drun links is there, and it signs and
# verifies a model.
#   deploy/build-image.sh [TAG]            (default localhost/drun:dev; root, Debian 12)
# The base is $DEBIAN_IMAGE when given (docker.io/library/debian:bookworm-slim, say). Otherwise it
# is a minimal bookworm made here with debootstrap from Debian's archive, for hosts that reach
# Debian's mirror but no container registry (this project's build machines).
# Builds and checks run with buildah's chroot isolation, which needs neither cgroups nor raised
# rlimits: it works inside containers and VMs where `podman run` cannot start one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-localhost/drun:dev}

need=()
for p in podman buildah debootstrap; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-image: installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

base=${DEBIAN_IMAGE:-}
if [ -z "$base" ]; then
  base=localhost/debian:bookworm-minbase
  if ! podman image exists "$base"; then
    work=$(mktemp -d /var/tmp/drun-rootfs.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    echo "build-image: debootstrap bookworm (minbase) into $work" >&2
    debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/log" 2>&1 ||
      { tail -20 "$work/log" >&2; exit 1; }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null
    rm -rf "$work"
    trap - EXIT
  fi
fi

echo "build-image: podman build $tag (base $base)" >&2
podman build --isolation=chroot -f "$root/deploy/Containerfile" --build-arg DEBIAN="$base" -t "$tag" "$root"

echo "build-image: checking $tag" >&2
c=$(buildah from "$tag")
trap 'buildah rm "$c" >/dev/null 2>&1 || true' EXIT
in_image() { buildah run --isolation=chroot --user 10001:10001 "$c" -- "$@"; }
[ "$(in_image id -u)" = 10001 ] || { echo "build-image: the image does not run as uid 10001" >&2; exit 1; }
if in_image sh -c 'ldd /opt/drun/bin/drun | grep "not found"'; then
  echo "build-image: the image lacks libraries drun links" >&2
  exit 1
fi
in_image sh -ec '
  cd /tmp && mkdir -p m && head -c 3000000 /dev/urandom > m/weights.bin
  drun keygen --type ed25519 --out key >/dev/null
  drun sign m --key key >/dev/null
  drun verify m --public-key key.pub'
echo "build-image: $tag ($(podman image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')) is complete"
