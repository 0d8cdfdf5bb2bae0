#!/usr/bin/env bash
# drun fetch from an OCI registry (Debian's docker-registry, the CNCF distribution registry, over
# TLS on loopback) next to the same fetch from nginx over TLS, measured in one run; and drun push
# next to skopeo copying the same file into the same registry.
#   benchmarks/registry.sh [BUILD_DIR] [WORK_DIR]
# Needs ~6.5 GiB free in WORK_DIR (the model, the registry's copy, the stores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
work=${2:-$build/bench}
drun=$build/drun
mkdir -p "$work"
source "$root/benchmarks/lib.sh"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(docker-registry --version | awk '{ print $NF }'), $(skopeo --version)"
file=$work/model/weights.bin
ensure_model "$file" 2048
[ -f "$work/key" ] || "$drun" keygen --type ecdsa-p256 --out "$work/key" >/dev/null
[ -f "$work/node.key" ] || "$drun" cache keygen --out "$work/node.key" >/dev/null
"$drun" sign "$work/model" --key "$work/key" --signature "$work/model.sig" --threads 2 >/dev/null
pki=$work/pki
make_pki "$pki"

port=$(free_port) tls_port=$(free_port) reg_port=$(free_port)
start_nginx "$work/nginx" "$work/model" "$port" "$tls_port" "$pki/server.pem" "$pki/server.key"
rm -rf "$work/registry"
mkdir -p "$work/registry"
# Storage as Debian's /etc/docker/registry/config.yml has it (blob descriptors cached in memory).
cat > "$work/registry/config.yml" <<CONF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {cache: {blobdescriptor: inmemory}, filesystem: {rootdirectory: $work/registry/data}}
http: {addr: 127.0.0.1:$reg_port, tls: {certificate: $pki/server.pem, key: $pki/server.key}}
CONF
docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
reg_pid=$!
trap 'kill $nginx_pid $reg_pid 2>/dev/null || true' EXIT
wait_port "$reg_port"

echo
echo "== pushing the 2 GiB model (signed, one file) into the registry"
t0=$(date +%s.%N)
"$drun" push "$work/model" "oci://127.0.0.1:$reg_port/bench/model:v1" --signature "$work/model.sig" --ca-cert "$pki/ca.pem" >/dev/null 2>&1
t_push=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
# skopeo: the same file as the one layer of an OCI layout, copied into another repository.
lay=$work/layout
rm -rf "$lay" && mkdir -p "$lay/blobs/sha256"
d=$(sha256sum "$file" | cut -d' ' -f1)
ln -f "$file" "$lay/blobs/sha256/$d" 2>/dev/null || cp "$file" "$lay/blobs/sha256/$d"
printf '{}' > "$lay/blobs/sha256/44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/octet-stream","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.title":"weights.bin"}}]}' \
  "$d" "$(stat -c %s "$file")" > "$lay/m.json"
md=$(sha256sum "$lay/m.json" | cut -d' ' -f1)
mv "$lay/m.json" "$lay/blobs/sha256/$md"
printf '{"imageLayoutVersion":"1.0.0"}' > "$lay/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
  "$md" "$(stat -c %s "$lay/blobs/sha256/$md")" > "$lay/index.json"
mkdir -p "$work/skopeo-certs" && cp "$pki/ca.pem" "$work/skopeo-certs/ca.crt"
t0=$(date +%s.%N)
skopeo copy -q --dest-cert-dir "$work/skopeo-certs" "oci:$lay:v1" "docker://127.0.0.1:$reg_port/bench/skopeo:v1" >/dev/null
t_skopeo=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
echo "skopeo copy (OCI layout -> registry)        : ${t_skopeo} s"
echo "drun push (hash, HEAD, chunked upload, PUT) : ${t_push} s  ($(ratio "$t_push" "$t_skopeo")x skopeo)"

echo
echo "== fetching it (verify + seal into a fresh store, best of 3, page cache warm)"
common=(--signature "$work/model.sig" --public-key "$work/key.pub" --store "$work/rstore" --key-source "file:$work/node.key" --ca-cert "$pki/ca.pem")
t_curl=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s --cacert '$pki/ca.pem' -o '$work/dl/w' 'https://127.0.0.1:$tls_port/weights.bin'")
blob="https://127.0.0.1:$reg_port/v2/bench/model/blobs/sha256:$d"
t_curl_reg=$(best_fresh "$work/dl" bash -c "mkdir -p '$work/dl' && curl -s --cacert '$pki/ca.pem' -o '$work/dl/w' '$blob'")
t_nginx=$(best_fresh "$work/rstore" "$drun" fetch "${common[@]}" --origin "https://127.0.0.1:$tls_port")
t_reg=$(best_fresh "$work/rstore" "$drun" fetch "${common[@]}" --origin "oci://127.0.0.1:$reg_port/bench/model:v1")
t_reg_sig=$(best_fresh "$work/rstore" "$drun" fetch --signature "oci://127.0.0.1:$reg_port/bench/model:v1" "${common[@]:2}" --origin "oci://127.0.0.1:$reg_port/bench/model:v1")
echo "curl -o over HTTPS from nginx                   : ${t_curl} s"
echo "curl -o of the blob from the registry           : ${t_curl_reg} s  ($(ratio "$t_curl_reg" "$t_curl")x curl from nginx: the registry's own cost)"
echo "drun fetch from nginx (HTTPS)                   : ${t_nginx} s  ($(ratio "$t_nginx" "$t_curl")x curl)"
echo "drun fetch from the registry (oci://, HTTPS)    : ${t_reg} s  ($(ratio "$t_reg" "$t_nginx")x the nginx fetch; goal <= 1.1)"
echo "  ... with the bundle from the registry too     : ${t_reg_sig} s  ($(ratio "$t_reg_sig" "$t_nginx")x)"

# Where the time goes: the core-seconds of drun and of the server, for one more fetch from each
# (all of them share the two cores, so a server's own cost lengthens the fetch).
ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$s"; }
nginx_pids=("$nginx_pid" $(pgrep -P "$nginx_pid" || true))
hz=$(getconf CLK_TCK)
for o in nginx registry; do
  if [ $o = nginx ]; then url="https://127.0.0.1:$tls_port" pids=("${nginx_pids[@]}"); else url="oci://127.0.0.1:$reg_port/bench/model:v1" pids=("$reg_pid"); fi
  rm -rf "$work/rstore" && sync
  a=$(ticks "${pids[@]}")
  /usr/bin/time -f "%U %S" -o "$work/cpu" "$drun" fetch "${common[@]}" --origin "$url" >/dev/null
  b=$(ticks "${pids[@]}")
  printf "core-seconds, fetch from %-8s : drun %.1f, the server %.1f\n" $o "$(awk '{ print $1 + $2 }' "$work/cpu")" \
    "$(awk -v t=$((b - a)) -v hz="$hz" 'BEGIN { print t / hz }')"
done

# As if the servers ran on other machines, the way a registry does: the servers on the last core,
# drun on the others, and the same two fetches again.
if [ "$(nproc)" -ge 2 ]; then
  last=$(($(nproc) - 1))
  for p in "${nginx_pids[@]}" "$reg_pid"; do taskset -a -p -c "$last" "$p" >/dev/null; done
  pin=(taskset -c "0-$((last - 1))")
  t_nginx_pin=$(best_fresh "$work/rstore" "${pin[@]}" "$drun" fetch "${common[@]}" --origin "https://127.0.0.1:$tls_port")
  t_reg_pin=$(best_fresh "$work/rstore" "${pin[@]}" "$drun" fetch "${common[@]}" --origin "oci://127.0.0.1:$reg_port/bench/model:v1")
  echo "servers on core $last, drun on the rest:"
  echo "drun fetch from nginx (HTTPS)                   : ${t_nginx_pin} s"
  echo "drun fetch from the registry (oci://, HTTPS)    : ${t_reg_pin} s  ($(ratio "$t_reg_pin" "$t_nginx_pin")x the nginx fetch; goal <= 1.1)"
fi
rm -rf "$work/rstore" "$work/dl" "$work/registry" "$lay" "$work/cpu"
