#!/usr/bin/env bash
# What metrics, JSON logs and the audit log cost on the data path: the fetch rows (from nginx,
# from a peer over mutual TLS) with all of it off, and with all of it on (--metrics-file,
# --log-format json --log-level info, --audit-log with --audit-key; the seed with
# --metrics-listen, a scraper reading it every second, JSON logs and its own audit log), measured
# in one run, alternating off and on (which goes first alternates too) so that drift hits both
# alike.
#   benchmarks/observability.sh [BUILD_DIR] [WORK_DIR] [SIZE_MIB] [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
work=${2:-$build/bench-obs}
size_mib=${3:-1024}
runs=${4:-5}
drun=$build/drun
mkdir -p "$work"
source "$root/benchmarks/lib.sh"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
file=$work/model/weights.bin
ensure_model "$file" "$size_mib"
[ -f "$work/key" ] || "$drun" keygen --type ecdsa-p256 --out "$work/key" >/dev/null
[ -f "$work/audit.key" ] || "$drun" keygen --type ed25519 --out "$work/audit.key" >/dev/null
[ -f "$work/node.key" ] || "$drun" cache keygen --out "$work/node.key" >/dev/null
"$drun" sign "$work/model" --key "$work/key" --signature "$work/model.sig" >/dev/null
pki=$work/pki
make_pki "$pki"

port=$(free_port)
start_nginx "$work/nginx" "$work/model" "$port"
rm -rf "$work/seed" "$work/audit" && mkdir -p "$work/audit"
"$drun" cache import "$work/model" --signature "$work/model.sig" --public-key "$work/key.pub" --store "$work/seed" \
  --key-source "file:$work/node.key" >/dev/null
plain_port=$(free_port)
obs_port=$(free_port)
metrics_port=$(free_port)
start_seed "$drun" "$work/seed" "$work/node.key" "$pki" "$plain_port"
plain_pid=$serve_pid
start_seed "$drun" "$work/seed" "$work/node.key" "$pki" "$obs_port" --metrics-listen "$metrics_port" \
  --log-format json --log-level info --audit-log "$work/audit/seed.log" --audit-key "$work/audit.key" \
  2>"$work/audit/seed.json"
obs_pid=$serve_pid
# A scraper more eager than Prometheus's default (1 min) or a usual setting (15 s): every second.
( while sleep 1; do curl -s -o /dev/null "http://127.0.0.1:$metrics_port/metrics" || true; done ) &
scraper_pid=$!
trap 'kill $nginx_pid $plain_pid $obs_pid $scraper_pid 2>/dev/null || true; rm -rf "${fstore:-}"' EXIT

# The leecher's store is on tmpfs when there is one: the disk's noise (writeback, fdatasync per
# piece) varies the rows by more than the few percent this measures.
fstore=$work/fstore
if [ -d /dev/shm ] && [ -w /dev/shm ]; then fstore=/dev/shm/drun-bench-obs-$$; fi
common=(--signature "$work/model.sig" --public-key "$work/key.pub" --store "$fstore"
        --key-source "file:$work/node.key")
observed=(--metrics-file "$work/audit/fetch.prom" --log-format json --log-level info
          --audit-log "$work/audit/fetch.log" --audit-key "$work/audit.key")
peer=(--ca-cert "$pki/ca.pem" --tls-cert "$pki/client.pem" --tls-key "$pki/client.key")

once() {  # once COMMAND...: wall seconds of one run into a fresh store
  rm -rf "$fstore"
  sync
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>>"$work/audit/fetch.json"; t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'
}
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }

o_off="" o_on="" p_off="" p_on=""
origin_off() { o_off=$(min "$o_off" "$(once "$drun" fetch "${common[@]}" --origin "http://127.0.0.1:$port")"); }
origin_on() { o_on=$(min "$o_on" "$(once "$drun" fetch "${common[@]}" --origin "http://127.0.0.1:$port" "${observed[@]}")"); }
peer_off() { p_off=$(min "$p_off" "$(once "$drun" fetch "${common[@]}" "${peer[@]}" --peer "127.0.0.1:$plain_port")"); }
peer_on() { p_on=$(min "$p_on" "$(once "$drun" fetch "${common[@]}" "${peer[@]}" --peer "127.0.0.1:$obs_port" "${observed[@]}")"); }
for i in $(seq "$runs"); do
  if [ $((i % 2)) -eq 1 ]; then
    origin_off; origin_on; peer_off; peer_on
  else
    origin_on; origin_off; peer_on; peer_off
  fi
done
rm -rf "$fstore"

mib() { awk -v t="$1" -v s="$size_mib" 'BEGIN { printf "%.0f", s / t }'; }
pct() { awk -v on="$1" -v off="$2" 'BEGIN { printf "%+.1f%%", (on / off - 1) * 100 }'; }
echo "== ${size_mib} MiB model, best of $runs, off and on alternating; leecher store in $(dirname "$fstore")"
echo "fetch from nginx, observability off : ${o_off} s  ($(mib "$o_off") MiB/s)"
echo "fetch from nginx, observability on  : ${o_on} s  ($(mib "$o_on") MiB/s, $(pct "$o_on" "$o_off") time)"
echo "fetch from a peer, off              : ${p_off} s  ($(mib "$p_off") MiB/s)"
echo "fetch from a peer, on               : ${p_on} s  ($(mib "$p_on") MiB/s, $(pct "$p_on" "$p_off") time)"
# What "on" produced, so that the comparison is known to have had it all.
kill $obs_pid
wait $obs_pid 2>/dev/null || true
echo "audit records: fetch $(wc -l < "$work/audit/fetch.log"), seed $(wc -l < "$work/audit/seed.log"); log lines: fetch $(wc -l < "$work/audit/fetch.json"), seed $(wc -l < "$work/audit/seed.json")"
"$drun" audit verify "$work/audit/fetch.log" --public-key "$work/audit.key.pub"
"$drun" audit verify "$work/audit/seed.log" --public-key "$work/audit.key.pub"
