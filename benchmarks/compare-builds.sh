#!/usr/bin/env bash
# Two builds of drun, run in pairs on one machine: `drun fetch` of the signed 2 GiB file from nginx
# over TLS 1.3 into a fresh store, old then new, three times; wall seconds and core-seconds (user +
# sys, /usr/bin/time) for each. How the README's "fetch path" table was measured.
#   benchmarks/compare-builds.sh OLD_DRUN NEW_DRUN [WORK_DIR] [-- extra fetch args, e.g. --out DIR]
# OLD_DRUN and NEW_DRUN are drun binaries; each is run with LD_LIBRARY_PATH set to its own
# directory, so a copy of an older build (drun and libdrun.so.0 side by side) runs its own library.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
old=$(realpath "$1") new=$(realpath "$2")
shift 2
work=$root/build/bench
if [ $# -gt 0 ] && [ "$1" != "--" ]; then work=$1; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
extra=("$@")
mkdir -p "$work"
source "$root/benchmarks/lib.sh"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
ensure_model "$work/model/weights.bin" 2048
[ -f "$work/key" ] || "$new" keygen --type ecdsa-p256 --out "$work/key" >/dev/null
[ -f "$work/node.key" ] || "$new" cache keygen --out "$work/node.key" >/dev/null
"$new" sign "$work/model" --key "$work/key" --signature "$work/model.sig" --threads 2 >/dev/null
make_pki "$work/pki"
port=$(free_port) tls_port=$(free_port)
start_nginx "$work/nginx" "$work/model" "$port" "$tls_port" "$work/pki/server.pem" "$work/pki/server.key"
trap 'kill $nginx_pid 2>/dev/null || true' EXIT
common=(--signature "$work/model.sig" --public-key "$work/key.pub" --store "$work/cmpstore" --key-source "file:$work/node.key"
        --ca-cert "$work/pki/ca.pem" --origin "https://127.0.0.1:$tls_port")
for _ in 1 2 3; do
  for v in old new; do
    bin=$old; [ $v = new ] && bin=$new
    rm -rf "$work/cmpstore" "$work/cmpout"; sync
    LD_LIBRARY_PATH=$(dirname "$bin") /usr/bin/time -f "%e %U %S" -o "$work/cmp.time" \
      "$bin" fetch "${common[@]}" "${extra[@]}" >/dev/null
    read -r e u s < "$work/cmp.time"
    echo "$v: wall $e s, $(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }') core-s (user $u, sys $s)"
  done
done
rm -rf "$work/cmpstore" "$work/cmpout" "$work/cmp.time"
