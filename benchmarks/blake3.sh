#!/usr/bin/env bash
# BLAKE3 against SHA-256 on every path drun hashes, next to the tools a user would run instead
# (b3sum, openssl dgst, curl, cp && sync), measured in one run, best of 3; and the core-seconds
# per GiB of fetching from an origin and from a peer next to the floor of the same work.
#   benchmarks/blake3.sh [BUILD_DIR] [WORK_DIR] [SIZE_MIB]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
work=${2:-$build/bench-b3}
size_mib=${3:-2048}
drun=$build/drun
mkdir -p "$work"
source "$root/benchmarks/lib.sh"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -o -w -e sha_ni -e avx512f -e avx2 /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "openssl: $(openssl version); b3sum: $(b3sum --version)"
file=$work/model/weights.bin
ensure_model "$file" "$size_mib"
[ -f "$work/key" ] || "$drun" keygen --type ecdsa-p256 --out "$work/key" >/dev/null
[ -f "$work/node.key" ] || "$drun" cache keygen --out "$work/node.key" >/dev/null
secs() { awk -v t="$1" -v s="$size_mib" 'BEGIN { printf "%.3f s (%.0f MiB/s)", t, s / t }'; }

echo
echo "== hashing and signing one ${size_mib} MiB file (page cache warm)"
t_b3_1=$(best_of_3 b3sum --num-threads 1 "$file")
t_b3_2=$(best_of_3 b3sum --num-threads 2 "$file")
t_ossl=$(best_of_3 openssl dgst -sha256 "$file")
t_sign_b3=$(best_of_3 "$drun" sign "$work/model" --key "$work/key" --hash blake3 --signature "$work/b3.sig" --threads 2)
t_sign_sha=$(best_of_3 "$drun" sign "$work/model" --key "$work/key" --signature "$work/sha.sig" --threads 2)
t_sign_b3_1=$(best_of_3 "$drun" sign "$work/model" --key "$work/key" --hash blake3 --signature "$work/b3.sig" --threads 1)
echo "b3sum --num-threads 1          : $(secs "$t_b3_1")"
echo "b3sum --num-threads 2          : $(secs "$t_b3_2")"
echo "openssl dgst -sha256           : $(secs "$t_ossl")"
echo "drun sign --hash blake3 -t 1   : $(secs "$t_sign_b3_1")  ($(ratio "$t_sign_b3_1" "$t_b3_1")x b3sum -t 1)"
echo "drun sign --hash blake3 -t 2   : $(secs "$t_sign_b3")  ($(ratio "$t_sign_b3" "$t_b3_2")x b3sum -t 2)"
echo "drun sign (sha256) -t 2        : $(secs "$t_sign_sha")  ($(ratio "$t_sign_sha" "$t_ossl")x openssl dgst)"
t_verify_b3=$(best_of_3 "$drun" verify "$work/model" --signature "$work/b3.sig" --public-key "$work/key.pub" --threads 2)
t_verify_sha=$(best_of_3 "$drun" verify "$work/model" --signature "$work/sha.sig" --public-key "$work/key.pub" --threads 2)
echo "drun verify, blake3 bundle     : $(secs "$t_verify_b3")"
echo "drun verify, sha256 bundle     : $(secs "$t_verify_sha")  ($(ratio "$t_verify_sha" "$t_verify_b3")x blake3's time)"

echo
echo "== importing into an encrypted store (verify + seal + write + fdatasync, 2 threads)"
t_cp_sync=$(best_fresh "$work/copy" bash -c "cp -r '$work/model' '$work/copy' && sync")
import_cmd() { "$drun" cache import "$work/model" --signature "$1" --public-key "$work/key.pub" --store "$work/store" --key-source "file:$work/node.key" --threads 2; }
t_imp_b3=$(best_fresh "$work/store" import_cmd "$work/b3.sig")
t_imp_sha=$(best_fresh "$work/store" import_cmd "$work/sha.sig")
rm -rf "$work/copy" "$work/store"
echo "cp -r && sync                  : $(secs "$t_cp_sync")"
echo "drun cache import, blake3      : $(secs "$t_imp_b3")  ($(ratio "$t_imp_b3" "$t_cp_sync")x cp+sync)"
echo "drun cache import, sha256      : $(secs "$t_imp_sha")  ($(ratio "$t_imp_sha" "$t_cp_sync")x cp+sync)"

echo
echo "== fetching from nginx on loopback (verify + seal + store)"
port=$(free_port)
start_nginx "$work/nginx" "$work/model" "$port"
trap 'kill $nginx_pid 2>/dev/null || true' EXIT
# Spelt out as arrays too: /usr/bin/time (least_cpu) runs programs, not shell functions.
from_origin=(--public-key "$work/key.pub" --origin "http://127.0.0.1:$port" --store "$work/fstore" --key-source "file:$work/node.key")
fetch() { local sig=$1; shift; "$drun" fetch --signature "$sig" "${from_origin[@]}" "$@"; }
t_curl=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s -o '$work/dl/w' 'http://127.0.0.1:$port/weights.bin'")
t_f_b3=$(best_fresh "$work/fstore" fetch "$work/b3.sig")
t_f_sha=$(best_fresh "$work/fstore" fetch "$work/sha.sig")
# --out: the same fetch, each verified piece also written into a destination as it arrives.
fetch_out() { rm -rf "$work/fout" && fetch "$1" --out "$work/fout"; }
t_fo_b3=$(best_fresh "$work/fstore" fetch_out "$work/b3.sig")
# Core-seconds (user + sys) of a command, the least of 3 runs into a fresh DIR: one slow run
# (writeback) says little.
least_cpu() {
  local dir=$1 best=""
  shift
  for _ in 1 2 3; do
    rm -rf "$dir"
    sync
    local c
    c=$( { /usr/bin/time -f '%U %S' "$@" >/dev/null; } 2>&1 | tail -1 | awk '{ print $1 + $2 }')
    best=$(awk -v a="$best" -v b="$c" 'BEGIN { print (a == "" || b < a) ? b : a }')
  done
  echo "$best"
}
cpu_b3=$(least_cpu "$work/fstore" "$drun" fetch --signature "$work/b3.sig" "${from_origin[@]}")
cpu_sha=$(least_cpu "$work/fstore" "$drun" fetch --signature "$work/sha.sig" "${from_origin[@]}")
cpu_curl=$(least_cpu "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s -o '$work/dl/w' 'http://127.0.0.1:$port/weights.bin'")
rm -rf "$work/fstore" "$work/dl" "$work/fout"
echo "curl -o                        : $(secs "$t_curl")  ($cpu_curl core-seconds)"
echo "drun fetch, blake3 bundle      : $(secs "$t_f_b3")  ($(ratio "$t_f_b3" "$t_curl")x curl; $cpu_b3 core-seconds)"
echo "drun fetch, sha256 bundle      : $(secs "$t_f_sha")  ($(ratio "$t_f_sha" "$t_curl")x curl; $cpu_sha core-seconds)"
echo "drun fetch --out, blake3       : $(secs "$t_fo_b3")  ($(ratio "$t_fo_b3" "$t_f_b3")x the fetch without --out)"

echo
echo "== fetching from a drun peer over mutual TLS 1.3 on loopback (the leecher's figures)"
pki=$work/pki
make_pki "$pki"
for sig in b3 sha; do
  "$drun" cache import "$work/model" --signature "$work/$sig.sig" --public-key "$work/key.pub" --store "$work/seed" \
    --key-source "file:$work/node.key" >/dev/null
done
peer_port=$(free_port)
start_seed "$drun" "$work/seed" "$work/node.key" "$pki" "$peer_port"
trap 'kill $nginx_pid $serve_pid 2>/dev/null || true' EXIT
from_peer=(--public-key "$work/key.pub" --peer "127.0.0.1:$peer_port" --ca-cert "$pki/ca.pem" --tls-cert "$pki/client.pem"
           --tls-key "$pki/client.key" --store "$work/pstore" --key-source "file:$work/node.key")
peer() { "$drun" fetch --signature "$1" "${from_peer[@]}"; }
t_p_b3=$(best_fresh "$work/pstore" peer "$work/b3.sig")
t_p_sha=$(best_fresh "$work/pstore" peer "$work/sha.sig")
cpu_p_b3=$(least_cpu "$work/pstore" "$drun" fetch --signature "$work/b3.sig" "${from_peer[@]}")
cpu_p_sha=$(least_cpu "$work/pstore" "$drun" fetch --signature "$work/sha.sig" "${from_peer[@]}")
rm -rf "$work/pstore" "$work/seed"
echo "drun fetch --peer, blake3      : $(secs "$t_p_b3")  ($cpu_p_b3 core-seconds)"
echo "drun fetch --peer, sha256      : $(secs "$t_p_sha")  ($cpu_p_sha core-seconds)"

echo
echo "== core-seconds per GiB against the floor of the same work (this run's figures)"
# The floor: hashing each byte once (b3sum -t 1, or openssl dgst -sha256), sealing it once
# (openssl speed -evp aes-256-gcm, 16 KiB blocks), and, for the origin, curl's own cost of
# receiving and writing it; for a peer, decrypting TLS (another AES-GCM pass) instead of curl.
gcm_mbps=$(openssl speed -evp aes-256-gcm -bytes 16384 -seconds 2 2>/dev/null | awk '/^AES-256-GCM/ { sub("k", "", $NF); print $NF / 1000 }')
per_gib() { awk -v c="$1" -v s="$size_mib" 'BEGIN { printf "%.2f", c * 1024 / s }'; }
seal=$(awk -v m="$gcm_mbps" 'BEGIN { printf "%.3f", 1073.741824 / m }')
h_b3=$(per_gib "$t_b3_1")
h_sha=$(per_gib "$t_ossl")
c_curl=$(per_gib "$cpu_curl")
floor() { awk -v a="$1" -v b="$2" -v c="$3" 'BEGIN { printf "%.2f", a + b + c }'; }
echo "AES-256-GCM (openssl speed)    : $gcm_mbps MB/s, $seal core-s/GiB; hash: blake3 $h_b3, sha256 $h_sha core-s/GiB; curl $c_curl core-s/GiB"
echo "fetch, blake3 : $(per_gib "$cpu_b3") core-s/GiB; floor $(floor "$h_b3" "$seal" "$c_curl")"
echo "fetch, sha256 : $(per_gib "$cpu_sha") core-s/GiB; floor $(floor "$h_sha" "$seal" "$c_curl")"
echo "peer, blake3  : $(per_gib "$cpu_p_b3") core-s/GiB; floor $(floor "$h_b3" "$seal" "$seal")"
echo "peer, sha256  : $(per_gib "$cpu_p_sha") core-s/GiB; floor $(floor "$h_sha" "$seal" "$seal")"
