#!/usr/bin/env bash
# The demo: make a sample model (several files, one of 80 MiB), make a publisher key, sign,
# verify with the CLI and in-process with the library, import it into an encrypted store and
# export it back bit-identical, fetch it from an nginx origin into another store, fetch it from an
# embedded seed peer over mutual TLS into a third, fetch it again with --rdma (TCP+TLS where there
# is no RDMA device), measure the peer data path with drun-bench tcp, then flip one byte and show
# the refusal.
#   examples/demo.sh BUILD_DIR
set -euo pipefail
build=$(cd "${1:?usage: demo.sh BUILD_DIR}" && pwd)
drun=$build/drun
work=$build/demo
rm -rf "$work"
mkdir -p "$work/sample-model/tokenizer"
cd "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "a sample model: config, tokenizer, two weight shards (80 MiB + 12 MiB)"
printf '{"architectures": ["DemoForCausalLM"], "hidden_size": 4096}\n' > sample-model/config.json
printf '{"version": "1.0", "model": {"type": "BPE"}}\n' > sample-model/tokenizer/tokenizer.json
head -c $((80 << 20)) /dev/urandom > sample-model/model-00001-of-00002.safetensors
head -c $((12 << 20)) /dev/urandom > sample-model/model-00002-of-00002.safetensors
ls -l sample-model

step "a publisher key (ECDSA P-256, as OMS tools use)"
show "$drun" keygen --type ecdsa-p256 --out publisher.key

step "sign: every 4 MiB piece gets a signed SHA-256 (OMS v1.0 shards, Sigstore bundle)"
show "$drun" sign sample-model --key publisher.key

step "what the bundle covers"
show "$drun" manifest sample-model/model.sig

step "verify with the CLI"
show "$drun" verify sample-model --public-key publisher.key.pub

step "verify in-process with the library (examples/load_verified.cpp)"
show "$build/examples/load_verified" sample-model sample-model/model.sig publisher.key.pub

step "an encrypted store: import the model (every piece checked, then sealed with AES-256-GCM)"
show "$drun" cache keygen --out node.key
show "$drun" cache import sample-model --store store --key-source file:node.key --public-key publisher.key.pub
show "$drun" cache ls --store store --key-source file:node.key
artifact=$("$drun" cache ls --store store --key-source file:node.key --json | sed -n 's/.*"id": "\([0-9a-f]*\)".*/\1/p' | head -n1)
if grep -r -q -a DemoForCausalLM store; then
  echo "demo FAILED: model plaintext found in the store" >&2
  exit 1
fi
echo "no plaintext of the model anywhere under store/ (searched for a string from config.json)"

step "export it back and compare bit for bit"
show "$drun" cache export "$artifact" exported-model --store store --key-source file:node.key
diff -r sample-model exported-model --exclude model.sig
echo "exported-model/ is bit-identical to sample-model/"

step "fetch it from an origin: nginx on loopback serves the model, drun checks every piece"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p origin
cat > origin/nginx.conf <<NGINX
master_process off; daemon off; pid $work/origin/nginx.pid; error_log $work/origin/error.log;
events { worker_connections 64; }
http { client_body_temp_path $work/origin/body; proxy_temp_path $work/origin/proxy;
       fastcgi_temp_path $work/origin/fastcgi; uwsgi_temp_path $work/origin/uwsgi; scgi_temp_path $work/origin/scgi;
       access_log $work/origin/access.log; server { listen 127.0.0.1:$port; root $work/sample-model; } }
NGINX
nginx -c "$work/origin/nginx.conf" -p "$work/origin" &
nginx_pid=$!
trap 'kill $nginx_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/config.json" && break; sleep 0.1; done
"$drun" keygen --type ed25519 --out audit.key >/dev/null
show "$drun" fetch --signature sample-model/model.sig --public-key publisher.key.pub \
  --origin "http://127.0.0.1:$port" --store fetched-store --key-source file:node.key --out fetched-model \
  --metrics-file fetch.prom --audit-log audit.log --audit-key audit.key
diff -r sample-model fetched-model --exclude model.sig
echo "fetched-model/ is bit-identical to sample-model/"
kill $nginx_pid
wait $nginx_pid 2>/dev/null || true
trap - EXIT

step "what the fetch left for operators: its metrics (node_exporter textfile format) and audit records"
grep -E '^drun_fetch(es|_bytes)_total' fetch.prom
show "$drun" audit show audit.log
show "$drun" audit verify audit.log --public-key audit.key.pub

step "peers: a test CA and a certificate for this node (mutual TLS 1.3 between peers)"
mkdir -p pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=demo cluster CA" \
  -keyout pki/ca.key -out pki/ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=node-1" -keyout pki/node.key \
  -out pki/node.csr 2>/dev/null
echo "subjectAltName=IP:127.0.0.1,URI:spiffe://demo/ns/ml/sa/node-1" > pki/node.cnf
openssl x509 -req -in pki/node.csr -CA pki/ca.pem -CAkey pki/ca.key -CAcreateserial -days 1 \
  -extfile pki/node.cnf -out pki/node.pem 2>/dev/null
chmod 600 pki/node.key
echo "pki/ca.pem, pki/node.pem (SPIFFE ID spiffe://demo/ns/ml/sa/node-1)"

step "an embedded seed peer (examples/embedded_peer.cpp): serve one store in-process, fetch into another by artifact id"
show "$build/examples/embedded_peer" store peer-store file:node.key "$artifact" publisher.key.pub pki/ca.pem \
  pki/node.pem pki/node.key
show "$drun" cache export "$artifact" peer-model --store peer-store --key-source file:node.key
diff -r sample-model peer-model --exclude model.sig
echo "peer-model/ is bit-identical to sample-model/"

step "peers with --rdma: RDMA where this host has a device, TCP+TLS (said once) where it has none"
"$drun" serve --store store --key-source file:node.key --listen 127.0.0.1:0 --tls-cert pki/node.pem \
  --tls-key pki/node.key --client-ca pki/ca.pem --rdma > serve.out 2> serve.err &
serve_pid=$!
for _ in $(seq 100); do grep -q "on port" serve.out 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/.* on port \([0-9]*\).*/\1/p' serve.out)
show "$drun" fetch --artifact "$artifact" --public-key publisher.key.pub --peer "127.0.0.1:$port" --ca-cert pki/ca.pem \
  --tls-cert pki/node.pem --tls-key pki/node.key --store rdma-store --key-source file:node.key --rdma
kill "$serve_pid"
wait "$serve_pid" || true
sed 's/^/serve: /' serve.err serve.out

if [ -x "$build/benchmarks/drun-bench" ]; then
  step "drun-bench tcp: the peer data path in ib_write_bw's report format (4 MiB messages, loopback)"
  bench_port=$((20000 + RANDOM % 20000))
  "$build/benchmarks/drun-bench" tcp --server --port "$bench_port" --cert pki/node.pem --key pki/node.key \
    --ca pki/ca.pem 2>/dev/null &
  sleep 0.3
  show "$build/benchmarks/drun-bench" tcp --client 127.0.0.1 --port "$bench_port" --size 4M --iters 200 \
    --cert pki/node.pem --key pki/node.key --ca pki/ca.pem
  wait
fi

step "flip one byte at offset 50000000 of the first shard, and verify again"
shard=sample-model/model-00001-of-00002.safetensors
byte=$(od -An -tu1 -j 50000000 -N1 "$shard" | tr -d ' ')
printf "\\$(printf '%03o' $((byte ^ 1)))" | dd of="$shard" bs=1 seek=50000000 conv=notrunc status=none
set +e
"$drun" verify sample-model --public-key publisher.key.pub
status=$?
set -e
if [ "$status" -ne 1 ]; then
  echo "demo FAILED: a modified model was not refused (exit $status)" >&2
  exit 1
fi
printf '\nrefused with exit status 1, naming the file and the byte range: the demo worked.\n'
