#!/usr/bin/env bash
# A swarm in network namespaces: N nodes, each behind a link shaped by tc to RATE in both
# directions, and an origin (nginx) behind a link of the same rate, all on one bridge. Every node
# runs `drun serve` on its store and `drun fetch` from the origin and every other node, started
# together. Prints each node's completion time against the ideal (artifact size / link rate) and
# the origin's egress in artifact sizes (from nginx's access log). Needs root.
#   benchmarks/swarm.sh [BUILD_DIR] [NODES] [RATE_MBIT] [SIZE_MIB] [PIECE_SIZE]
# PIECE_SIZE (for example 1M) overrides drun's piece plan (4 MiB for 256 MiB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
nodes=${2:-8}
rate=${3:-200}
size_mib=${4:-256}
piece=${5:-}
drun=$build/drun
work=$build/swarm
[ "$(id -u)" -eq 0 ] || { echo "swarm.sh needs root (network namespaces)" >&2; exit 2; }
source "$root/benchmarks/lib.sh"

cleanup() {
  set +e
  for p in $(jobs -p); do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for ns in $(ip netns list | awk '/^drun-/ { print $1 }'); do ip netns del "$ns"; done
  ip link del drun-br 2>/dev/null
}
trap cleanup EXIT
cleanup
rm -rf "$work"
mkdir -p "$work/model" "$work/pki"
cd "$work"

echo "== swarm: $nodes nodes + origin, each link ${rate} Mbit/s both ways (tc tbf), artifact ${size_mib} MiB${piece:+, pieces of $piece}"
head -c $((size_mib << 20)) /dev/urandom > model/weights.bin
"$drun" keygen --type ed25519 --out publisher.key >/dev/null
"$drun" sign model --key publisher.key --signature model.sig ${piece:+--piece-size "$piece"} >/dev/null
"$drun" cache keygen --out node.key >/dev/null
mk() { openssl "$@" >/dev/null 2>&1; }
mk req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=swarm-ca -keyout pki/ca.key -out pki/ca.pem

ip link add drun-br type bridge
ip addr add 10.77.0.1/24 dev drun-br
ip link set drun-br up
# attach NAME IP: a namespace on the bridge, its link shaped both ways.
attach() {
  local ns=$1 ip=$2 i=$3
  ip netns add "$ns"
  ip link add "dv$i" type veth peer name eth0 netns "$ns"
  ip link set "dv$i" master drun-br up
  ip netns exec "$ns" ip addr add "$ip/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "${rate}mbit" burst 256kb latency 50ms
  tc qdisc add dev "dv$i" root tbf rate "${rate}mbit" burst 256kb latency 50ms
}
attach drun-origin 10.77.0.2 o
members=()
for i in $(seq 0 $((nodes - 1))); do
  ip=10.77.0.$((10 + i))
  attach "drun-n$i" "$ip" "$i"
  members+=("$ip:7070")
  mk req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=node-$i" -keyout "pki/n$i.key" -out "pki/n$i.csr"
  echo "subjectAltName=IP:$ip" > "pki/n$i.cnf"
  mk x509 -req -in "pki/n$i.csr" -CA pki/ca.pem -CAkey pki/ca.key -CAcreateserial -days 1 -extfile "pki/n$i.cnf" -out "pki/n$i.pem"
  chmod 600 "pki/n$i.key"
done

mkdir -p origin
cat > origin/nginx.conf <<NGINX
master_process off; daemon off; pid $work/origin/nginx.pid; error_log $work/origin/error.log;
events { worker_connections 256; }
http {
  client_body_temp_path $work/origin/body; proxy_temp_path $work/origin/proxy; fastcgi_temp_path $work/origin/fastcgi;
  uwsgi_temp_path $work/origin/uwsgi; scgi_temp_path $work/origin/scgi; sendfile on;
  log_format bytes '\$body_bytes_sent'; access_log $work/origin/access.log bytes;
  server { listen 10.77.0.2:80; root $work/model; }
}
NGINX
ip netns exec drun-origin nginx -c "$work/origin/nginx.conf" -p "$work/origin" &
peers=()
for m in "${members[@]}"; do peers+=(--peer "$m"); done
for i in $(seq 0 $((nodes - 1))); do
  ip netns exec "drun-n$i" "$drun" serve --store "n$i" --key-source file:node.key --listen "10.77.0.$((10 + i)):7070" \
    --tls-cert "pki/n$i.pem" --tls-key "pki/n$i.key" --client-ca pki/ca.pem >/dev/null &
done
sleep 1

start=$(date +%s.%N)
for i in $(seq 0 $((nodes - 1))); do
  ( ip netns exec "drun-n$i" "$drun" fetch --signature model.sig --public-key publisher.key.pub \
      --origin http://10.77.0.2 "${peers[@]}" --swarm-self "10.77.0.$((10 + i)):7070" --ca-cert pki/ca.pem \
      --tls-cert "pki/n$i.pem" --tls-key "pki/n$i.key" --store "n$i" --key-source file:node.key > "fetch$i.log" 2>&1
    echo "$? $(date +%s.%N)" > "done$i" ) &
done
for i in $(seq 0 $((nodes - 1))); do
  while [ ! -s "done$i" ]; do sleep 0.2; done
done

ideal=$(awk -v s="$size_mib" -v r="$rate" 'BEGIN { print s * 8 * 1.048576 / r }')
last=0
for i in $(seq 0 $((nodes - 1))); do
  read -r rc t < "done$i"
  [ "$rc" -eq 0 ] || { echo "node $i failed:"; cat "fetch$i.log"; exit 1; }
  d=$(awk -v a="$start" -v b="$t" 'BEGIN { print b - a }')
  last=$(awk -v a="$last" -v b="$d" 'BEGIN { print (b > a) ? b : a }')
  from_origin=$(awk '/http:\/\/10.77.0.2/ { print $2 }' "fetch$i.log")
  printf 'node %d: %6.2f s, %s pieces from the origin\n' "$i" "$d" "${from_origin:-0}"
done
egress=$(awk '{ s += $1 } END { print s }' origin/access.log)
echo "ideal (artifact / link rate)          : $(printf '%.2f' "$ideal") s"
echo "last node done                         : $(printf '%.2f' "$last") s  ($(ratio "$last" "$ideal")x the ideal)"
echo "origin egress                          : $(ratio "$egress" $((size_mib << 20)))x the artifact ($egress bytes)"
