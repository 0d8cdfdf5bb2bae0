#!/usr/bin/env bash
# A swarm in network namespaces: N nodes, each behind a link shaped by tc to RATE in both
# directions, and an origin (nginx) behind a link of the same rate, all on one bridge. Every node
# runs `drun serve` on its store and `drun fetch` from the origin and every other node, started
# together. Prints each node's completion time against the ideal (artifact size / link rate) and
# the origin's egress in artifact sizes (from nginx's access log). Needs root.
#   benchmarks/swarm.sh [BUILD_DIR] [NODES] [RATE_MBIT] [SIZE_MIB] [PIECE_SIZE]
# PIECE_SIZE (for example 1M) overrides drun's piece plan (4 MiB for 256 MiB).
# CHAOS=MODE adds a fault during the transfer (loss, cut, seed-kill, origin-restart, disk-full,
# liar: tests/python/netswarm.py says what each does) and checks that every honest node ends with
# the artifact verified; CHAOS=all runs the plain swarm and then each fault in turn.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
nodes=${2:-8}
rate=${3:-200}
size_mib=${4:-256}
piece=${5:-}
[ "$(id -u)" -eq 0 ] || { echo "swarm.sh needs root (network namespaces)" >&2; exit 2; }
modes=${CHAOS:-none}
[ "$modes" = all ] && modes="none loss cut seed-kill origin-restart disk-full liar"
status=0
for mode in $modes; do
  /usr/bin/python3 "$root/tests/python/netswarm.py" "$build/drun" "$build/swarm" --nodes "$nodes" --rate "$rate" \
    --size-mib "$size_mib" ${piece:+--piece-size "$piece"} --chaos "$mode" || status=1
done
exit $status
