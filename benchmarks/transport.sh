#!/usr/bin/env bash
# drun's peer transports next to what a user would measure instead, in one run:
#   drun-bench tcp (mutual TLS 1.3, the peer data path) vs iperf3 (plain TCP, no TLS) and curl over
#   HTTPS from nginx (needs 1 GiB in WORK_DIR), and, where an
#   RDMA device exists, drun-bench rdma vs perftest's ib_write_bw on the same device.
#   benchmarks/transport.sh [BUILD_DIR] [WORK_DIR]      (RDMA_DEVICE=mlx5_0 RDMA_GID_INDEX=3 to choose)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
work=${2:-$build/bench}
bench=$build/benchmarks/drun-bench
mkdir -p "$work"
source "$root/benchmarks/lib.sh"
make_pki "$work/pki"
tls=(--cert "$work/pki/server.pem" --key "$work/pki/server.key" --ca "$work/pki/ca.pem")
ctls=(--cert "$work/pki/client.pem" --key "$work/pki/client.key" --ca "$work/pki/ca.pem")
iters=${ITERS:-2000}

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(openssl version)"
json() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())$1)"; }

# drun_bench KIND SIZE [EXTRA...]: average MB/s (2^20 bytes) of one client run against a fresh server.
drun_bench() {
  local kind=$1 size=$2 port
  shift 2
  port=$(free_port)
  "$bench" "$kind" --server --port "$port" "${tls[@]}" "$@" 2>/dev/null &
  local pid=$!
  sleep 0.3  # it serves one client, as ib_write_bw does: no probing connection
  "$bench" "$kind" --client 127.0.0.1 --port "$port" --size "$size" --iters "$iters" --json "${ctls[@]}" "$@" | json '["bw_average"]'
  wait "$pid"
}

iperf_mb() {  # plain TCP over loopback, one stream, the same bytes in all (writes of at most 1 MiB: iperf3's limit)
  local size=$1 port
  port=$(free_port)
  iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  local pid=$!
  sleep 0.3
  iperf3 -c 127.0.0.1 -p "$port" -n $((size * iters)) -l $((size < 1048576 ? size : 1048576)) -J |
    json '["end"]["sum_received"]["bits_per_second"] / 8 / 1048576'
  wait "$pid" 2>/dev/null || true
}

# TLS 1.3 the way a user moves a file today: curl from nginx over HTTPS, 1 GiB from the page cache.
curl_tls_mb() {
  mkdir -p "$work/tls-doc"
  [ -f "$work/tls-doc/blob" ] || head -c $((1 << 30)) /dev/urandom > "$work/tls-doc/blob"
  cat "$work/tls-doc/blob" > /dev/null
  local port tls_port
  port=$(free_port)
  tls_port=$(free_port)
  start_nginx "$work/tls-nginx" "$work/tls-doc" "$port" "$tls_port" "$work/pki/server.pem" "$work/pki/server.key"
  local best=0
  for _ in 1 2 3; do
    local v
    v=$(curl -s --cacert "$work/pki/ca.pem" --tlsv1.3 -o /dev/null -w '%{speed_download}' "https://127.0.0.1:$tls_port/blob")
    best=$(awk -v a="$best" -v b="$v" 'BEGIN { print (b > a) ? b : a }')
  done
  kill "$nginx_pid" 2>/dev/null || true
  wait "$nginx_pid" 2>/dev/null || true
  awk -v b="$best" 'BEGIN { printf "%.1f", b / 1048576 }'
}

echo
echo "== TCP+TLS on loopback, MB/sec (2^20): drun-bench tcp (mTLS 1.3, one request per message) vs"
echo "   iperf3 (plain TCP, no encryption) and curl from nginx over HTTPS (TLS 1.3, one 1 GiB file)"
curl_mb=$(curl_tls_mb)
printf " %-10s %-14s %-14s %-8s %-16s %s\n" "#bytes" "drun tcp+tls" "iperf3 tcp" "ratio" "curl https" "ratio"
for size in 65536 1048576 4194304; do
  d=$(drun_bench tcp "$size")
  i=$(iperf_mb "$size")
  printf " %-10s %-14.1f %-14.1f %-8s %-16s %sx\n" "$size" "$d" "$i" "$(ratio "$d" "$i")x" "$curl_mb" "$(ratio "$d" "$curl_mb")"
done

echo
rdma_args=()
[ -n "${RDMA_DEVICE:-}" ] && rdma_args+=(--device "$RDMA_DEVICE")
[ -n "${RDMA_GID_INDEX:-}" ] && rdma_args+=(--gid-index "$RDMA_GID_INDEX")
if why=$("$bench" rdma --client 127.0.0.1 --port 1 "${ctls[@]}" "${rdma_args[@]}" 2>&1 >/dev/null; true) &&
   echo "$why" | grep -q "RDMA is not available"; then
  echo "== RDMA: skipped: ${why#drun-bench: }"
  exit 0
fi
echo "== RDMA: drun-bench rdma vs ib_write_bw on the same device (loopback through the NIC), MB/sec (2^20)"
perf_args=()
[ -n "${RDMA_DEVICE:-}" ] && perf_args+=(-d "$RDMA_DEVICE")
[ -n "${RDMA_GID_INDEX:-}" ] && perf_args+=(-x "$RDMA_GID_INDEX")
printf " %-10s %-14s %-14s %s\n" "#bytes" "drun rdma" "ib_write_bw" "ratio"
for size in 65536 1048576 4194304; do
  d=$(drun_bench rdma "$size" "${rdma_args[@]}")
  port=$(free_port)
  ib_write_bw "${perf_args[@]}" -p "$port" -s "$size" -n "$iters" >/dev/null 2>&1 &
  sleep 0.5
  p=$(ib_write_bw "${perf_args[@]}" -p "$port" -s "$size" -n "$iters" 127.0.0.1 | awk -v s="$size" '$1 == s { print $4 }')
  wait || true
  printf " %-10s %-14.1f %-14.1f %sx\n" "$size" "$d" "$p" "$(ratio "$d" "$p")"
done
