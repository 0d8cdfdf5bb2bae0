#!/usr/bin/env bash
# Proves the README's two commands on a fresh Debian 12: debootstraps a minimal bookworm into
# WORK (default /tmp/drun-fresh-debian), copies HEAD into it, and runs scripts/test.sh and
# scripts/demo.sh inside a chroot, where nothing but the base system is installed.
# Needs root and Debian's mirror (deb.debian.org). Takes a few minutes; not part of CI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/drun-fresh-debian}
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

rm -rf "$work"
debootstrap --variant=minbase bookworm "$work" http://deb.debian.org/debian >/dev/null
cp /etc/resolv.conf "$work/etc/resolv.conf"
# debootstrap leaves /etc/hosts out; every installed Debian has one (localhost resolves).
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$work/etc/hosts"
mount -t proc proc "$work/proc"
mount --rbind /dev "$work/dev"
mount -t sysfs sys "$work/sys"
trap 'umount -R "$work/dev"; umount "$work/proc" "$work/sys"' EXIT

mkdir -p "$work/root/drun"
git -C "$root" archive HEAD | tar -x -C "$work/root/drun"
chroot "$work" /bin/bash -c 'cd /root/drun && CI=true ./scripts/test.sh'
chroot "$work" /bin/bash -c 'cd /root/drun && rm -rf build build-asan && ./scripts/demo.sh'
echo "fresh Debian 12: both Quick start commands passed"
