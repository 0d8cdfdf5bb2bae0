#!/usr/bin/env bash
# drun's hashing and signing speed next to what a user would run instead, measured in one run.
#   benchmarks/run.sh [BUILD_DIR] [WORK_DIR]
# Needs ~2.2 GiB free in WORK_DIR (default: BUILD_DIR/bench) and memory to keep it cached.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
work=${2:-$build/bench}
drun=$build/drun
bench=$build/benchmarks/bench_hash
bench_seal=$build/benchmarks/bench_seal
mkdir -p "$work"

source "$root/benchmarks/lib.sh"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -o -w sha_ni /proc/cpuinfo | head -1 || echo no) SHA extensions"
echo "openssl: $(openssl version)"
echo

echo "== per-core SHA-256 (MB/s, 10^6 bytes)"
openssl_speed=$(openssl speed -evp sha256 -bytes 16384 -seconds 3 2>/dev/null | awk '/^sha256/ { sub("k", "", $NF); print $NF / 1000 }')
drun_memory=$("$bench" memory 3 | awk '{ print $2 }')
echo "openssl speed -evp sha256, 16 KiB blocks : $openssl_speed"
echo "drun piece hashing, from memory          : $drun_memory  ($(ratio "$drun_memory" "$openssl_speed")x openssl)"

file=$work/model/weights.bin
ensure_model "$file" 2048
drun_manifest=$("$bench" manifest "$work/model" | awk '{ print $2 }')
echo "drun piece hashing, pread + hash, 1 thread: $drun_manifest  ($(ratio "$drun_manifest" "$openssl_speed")x openssl)"
echo

echo "== hashing or signing one 2 GiB file (best of 3, page cache warm)"
[ -f "$work/key" ] || "$drun" keygen --type ecdsa-p256 --out "$work/key" >/dev/null
t_openssl=$(best_of_3 openssl dgst -sha256 "$file")
t_sha256sum=$(best_of_3 sha256sum "$file")
t_drun=$(best_of_3 "$drun" sign "$work/model" --key "$work/key" --signature "$work/model.sig" --threads 2)
peak_kib=$( { /usr/bin/time -f '%M' "$drun" sign "$work/model" --key "$work/key" --signature "$work/model.sig" --threads 2 >/dev/null; } 2>&1 | tail -1)
echo "openssl dgst -sha256        : ${t_openssl} s"
echo "sha256sum                   : ${t_sha256sum} s  ($(ratio "$t_sha256sum" "$t_openssl")x openssl)"
echo "drun sign --threads 2       : ${t_drun} s  ($(ratio "$t_drun" "$t_openssl")x openssl's time)"
echo "drun sign peak memory (RSS) : $((peak_kib / 1024)) MiB for a 2048 MiB file"
echo
# The fair single-core comparison for reading a file: openssl dgst also copies out of the page cache.
openssl_file=$(awk -v t="$t_openssl" 'BEGIN { printf "%.1f", 2147.483648 / t }')
echo "single core, file in page cache: openssl dgst $openssl_file MB/s, drun $drun_manifest MB/s ($(ratio "$drun_manifest" "$openssl_file")x)"

echo
echo "== encrypted store: AES-256-GCM per core (MB/s, 10^6 bytes)"
openssl_gcm=$(openssl speed -evp aes-256-gcm -bytes 16384 -seconds 3 2>/dev/null | awk '/^AES-256-GCM/ { sub("k", "", $NF); print $NF / 1000 }')
seal_open=$("$bench_seal" 3)
drun_seal=$(echo "$seal_open" | awk '/^seal/ { print $2 }')
drun_open=$(echo "$seal_open" | awk '/^open/ { print $2 }')
echo "openssl speed -evp aes-256-gcm, 16 KiB blocks : $openssl_gcm"
echo "drun seal, 8 MiB pieces                       : $drun_seal  ($(ratio "$drun_seal" "$openssl_gcm")x openssl)"
echo "drun open (tag checked), 8 MiB pieces         : $drun_open  ($(ratio "$drun_open" "$openssl_gcm")x openssl)"
echo

echo "== importing the 2 GiB model into an encrypted store (verify + seal + write + fdatasync, 2 threads; best of 3)"
[ -f "$work/node.key" ] || "$drun" cache keygen --out "$work/node.key" >/dev/null
import_cmd=("$drun" cache import "$work/model" --signature "$work/model.sig" --public-key "$work/key.pub"
            --store "$work/store" --key-source "file:$work/node.key" --threads 2)
t_cp=$(best_fresh "$work/copy" cp -r "$work/model" "$work/copy")
t_cp_sync=$(best_fresh "$work/copy" bash -c "cp -r '$work/model' '$work/copy' && sync")
t_import=$(best_fresh "$work/store" "${import_cmd[@]}")
rm -rf "$work/store"
import_kib=$( { /usr/bin/time -f '%M' "${import_cmd[@]}" >/dev/null; } 2>&1 | tail -1)
rm -rf "$work/store" "$work/copy"
echo "cp -r (no fsync)            : ${t_cp} s"
echo "cp -r && sync (durable)     : ${t_cp_sync} s"
echo "openssl dgst -sha256        : ${t_openssl} s"
echo "drun cache import           : ${t_import} s  ($(ratio "$t_import" "$t_cp")x cp, $(ratio "$t_import" "$t_cp_sync")x cp+sync, $(ratio "$t_import" "$t_openssl")x openssl dgst)"
echo "drun cache import peak RSS  : $((import_kib / 1024)) MiB"

echo
echo "== fetching the 2 GiB model from nginx on loopback (best of 3; nothing verified by curl or aria2c)"
# A test PKI for HTTPS and the peers: a CA, a server certificate for 127.0.0.1, a client one.
pki=$work/pki
make_pki "$pki"
port=$(free_port)
tls_port=$(free_port)
start_nginx "$work/nginx" "$work/model" "$port" "$tls_port" "$pki/server.pem" "$pki/server.key"
trap 'kill $nginx_pid 2>/dev/null || true' EXIT
url=http://127.0.0.1:$port/weights.bin
fetch_cmd=("$drun" fetch --signature "$work/model.sig" --public-key "$work/key.pub" --origin "http://127.0.0.1:$port"
           --store "$work/fstore" --key-source "file:$work/node.key")
t_curl=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s -o '$work/dl/w' '$url'")
t_curl_dgst=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s -o '$work/dl/w' '$url' && openssl dgst -sha256 '$work/dl/w'")
t_aria=$(best_fresh "$work/dl" aria2c -q -x8 -s8 -d "$work/dl" -o w "$url")
t_fetch=$(best_fresh "$work/fstore" "${fetch_cmd[@]}")
t_fetch_out=$(best_fresh "$work/fstore" bash -c "rm -rf '$work/fout' && $(printf '%q ' "${fetch_cmd[@]}") --out '$work/fout'")
rm -rf "$work/fstore"
fetch_kib=$( { /usr/bin/time -f '%M' "${fetch_cmd[@]}" >/dev/null; } 2>&1 | tail -1)
rm -rf "$work/fstore" "$work/fout" "$work/dl"
echo "curl -o                      : ${t_curl} s"
echo "curl -o && openssl dgst      : ${t_curl_dgst} s"
echo "aria2c -x8                   : ${t_aria} s"
echo "drun fetch (verify + seal)   : ${t_fetch} s  ($(ratio "$t_fetch" "$t_curl")x curl, $(ratio "$t_fetch" "$t_curl_dgst")x curl+dgst, $(ratio "$t_fetch" "$t_aria")x aria2c)"
echo "drun fetch --out             : ${t_fetch_out} s  ($(ratio "$t_fetch_out" "$t_curl")x curl)"
echo "drun fetch peak RSS          : $((fetch_kib / 1024)) MiB"

echo
echo "== peer to peer on loopback: the 2 GiB model over mutual TLS 1.3 (best of 3)"
"$drun" cache import "$work/model" --signature "$work/model.sig" --public-key "$work/key.pub" --store "$work/seed" \
  --key-source "file:$work/node.key" >/dev/null
peer_port=$(free_port)
start_seed "$drun" "$work/seed" "$work/node.key" "$pki" "$peer_port"
trap 'kill $nginx_pid $serve_pid 2>/dev/null || true' EXIT
tls_url=https://127.0.0.1:$tls_port/weights.bin
peer_cmd=("$drun" fetch --signature "$work/model.sig" --public-key "$work/key.pub" --peer "127.0.0.1:$peer_port"
          --ca-cert "$pki/ca.pem" --tls-cert "$pki/client.pem" --tls-key "$pki/client.key" --store "$work/pstore"
          --key-source "file:$work/node.key")
t_curl_tls=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s --cacert '$pki/ca.pem' -o '$work/dl/w' '$tls_url'")
t_peer=$(best_fresh "$work/pstore" "${peer_cmd[@]}")
rm -rf "$work/pstore"
peer_kib=$( { /usr/bin/time -f '%M' "${peer_cmd[@]}" >/dev/null; } 2>&1 | tail -1)
rm -rf "$work/pstore" "$work/dl" "$work/seed"
echo "curl -o over HTTPS from nginx (TLS 1.3, nothing verified)  : ${t_curl_tls} s  ($(awk -v t="$t_curl_tls" 'BEGIN { printf "%.0f", 2048 / t }') MiB/s)"
echo "drun fetch --peer (mTLS + verify + seal)                   : ${t_peer} s  ($(awk -v t="$t_peer" 'BEGIN { printf "%.0f", 2048 / t }') MiB/s, $(ratio "$t_curl_tls" "$t_peer")x curl's throughput)"
echo "drun fetch --peer peak RSS                                 : $((peer_kib / 1024)) MiB"

echo
echo "== loading a 1 GiB .safetensors file into numpy arrays (best of 3, page cache warm)"
PYTHONPATH="$build/bindings/python" /usr/bin/python3 "$root/benchmarks/bench_safetensors.py" "$build" "$work" 1024
