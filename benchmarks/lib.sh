# Helpers shared by the benchmark scripts (sourced, not run).

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# Best (lowest) wall time of 3 runs of a command, in seconds.
best_of_3() {
  local best=""
  for _ in 1 2 3; do
    local t0 t1 dt
    t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    best=$(awk -v a="$best" -v b="$dt" 'BEGIN { print (a == "" || b < a) ? b : a }')
  done
  echo "$best"
}

best_fresh() {  # best_fresh DIR_TO_CLEAR command...: best of 3 wall times, DIR removed before each run
  local dir=$1 best=""
  shift
  for _ in 1 2 3; do
    rm -rf "$dir"
    sync
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    best=$(awk -v a="$best" -v t0="$t0" -v t1="$t1" 'BEGIN { d = t1 - t0; print (a == "" || d < a) ? d : a }')
  done
  echo "$best"
}

# make_pki DIR: a throwaway CA and certificates "server" and "client" for 127.0.0.1 (keys 0600).
make_pki() {
  local pki=$1
  [ -f "$pki/client.pem" ] && return 0
  mkdir -p "$pki"
  mk() { openssl "$@" >/dev/null 2>&1; }
  mk req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=bench-ca -keyout "$pki/ca.key" -out "$pki/ca.pem"
  for n in server client; do
    mk req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$n" -keyout "$pki/$n.key" -out "$pki/$n.csr"
    echo "subjectAltName=IP:127.0.0.1" > "$pki/$n.cnf"
    mk x509 -req -in "$pki/$n.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial -days 30 -extfile "$pki/$n.cnf" -out "$pki/$n.pem"
    chmod 600 "$pki/$n.key"
  done
}

# ensure_model FILE MIB: a random file of that size (kept between runs), read into the page cache
# so that every tool measured reads it from memory.
ensure_model() {
  local file=$1 mib=$2
  if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -ne $((mib << 20)) ]; then
    mkdir -p "$(dirname "$file")"
    head -c $((mib << 20)) /dev/urandom > "$file"
  fi
  cat "$file" > /dev/null
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (5 s at most).
wait_port() {
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

# start_seed DRUN STORE NODE_KEY PKI PORT [ARGS...]: `drun serve` of STORE on 127.0.0.1:PORT with
# PKI's server certificate (make_pki), in the background until it listens; sets serve_pid.
start_seed() {
  local drun=$1 store=$2 key=$3 pki=$4 port=$5
  shift 5
  "$drun" serve --store "$store" --key-source "file:$key" --listen "127.0.0.1:$port" --tls-cert "$pki/server.pem" \
    --tls-key "$pki/server.key" --client-ca "$pki/ca.pem" "$@" >/dev/null &
  serve_pid=$!
  wait_port "$port"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_nginx DIR ROOT PORT [TLS_PORT CERT KEY]: nginx in the foreground serving ROOT; sets nginx_pid.
start_nginx() {
  local ngx=$1 docroot=$2 port=$3 tls=""
  if [ $# -ge 6 ]; then
    tls="server { listen 127.0.0.1:$4 ssl http2; root $docroot; ssl_certificate $5; ssl_certificate_key $6; ssl_protocols TLSv1.3; }"
  fi
  mkdir -p "$ngx"
  cat > "$ngx/nginx.conf" <<NGINX
master_process off; daemon off; pid $ngx/nginx.pid; error_log $ngx/error.log;
events { worker_connections 256; }
http {
  client_body_temp_path $ngx/body; proxy_temp_path $ngx/proxy; fastcgi_temp_path $ngx/fastcgi;
  uwsgi_temp_path $ngx/uwsgi; scgi_temp_path $ngx/scgi; access_log off; sendfile on;
  server { listen 127.0.0.1:$port; root $docroot; }
  $tls
}
NGINX
  nginx -c "$ngx/nginx.conf" -p "$ngx" &
  nginx_pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
}
