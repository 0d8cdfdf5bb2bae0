#!/usr/bin/env bash
# Installs, from Debian 12's own archive, whatever drun needs to build, test and benchmark that
# is not already installed. Idempotent: when everything is present it only runs dpkg-query.
set -euo pipefail

packages=(
  g++ cmake make pkg-config        # toolchain
  libssl-dev                       # OpenSSL 3: SHA-256, ECDSA, X.509, PEM
  libsodium-dev                    # Ed25519, BLAKE2b, guarded memory for secrets
  librust-blake3-dev               # BLAKE3's own C sources (SIMD, runtime dispatch), built privately
  b3sum                            # the independent BLAKE3 check in the tests, the benchmark baseline
  libfmt-dev                       # formatting
  libsqlite3-dev                   # the store's metadata index (WAL)
  libcurl4-openssl-dev             # HTTP(S) origins
  nginx-light                      # a real origin for the fetch tests (started by the tests)
  tinyproxy                        # a real forward proxy for the fetch tests
  nlohmann-json3-dev               # JSON (strict parsing layered on top, see src/detail/json.cpp)
  doctest-dev                      # unit tests
  openssl                          # the CLI: benchmark baseline and interop checks
  python3 python3-pytest python3-cryptography python3-jwt   # CLI and interop tests, independent OMS checker
  python3-pytest-xdist             # the CLI tests run on every core (scripts/test.sh)
  docker-registry skopeo           # a real OCI registry and another tool that writes to it (test_registry.py)
  python3-dev pybind11-dev python3-numpy   # the Python binding
  python3-torch                    # load_safetensors(framework="torch") and the TorchServe example
  time                             # /usr/bin/time: peak memory in the benchmark
  curl aria2                       # the baselines of the fetch benchmark
  libibverbs-dev                   # RDMA: headers only at build time (libibverbs is dlopen()ed)
  iperf3 perftest                  # the baselines of drun-bench tcp (iperf3) and rdma (ib_write_bw)
  prometheus                       # the metrics tests: a real Prometheus scrapes drun; promtool lints
  clang libclang-rt-14-dev         # scripts/fuzz.sh: libFuzzer and the sanitizer runtimes for clang
  iproute2 nftables                # the swarm in network namespaces: links (ip, tc), packet loss (nft)
)
# sigstore-js, the independent verifier of the keyless tests, runs on Node.js. A Node.js from
# elsewhere (its own npm included) is used as it is; otherwise Debian's.
if ! command -v npm >/dev/null 2>&1; then packages+=(nodejs npm); fi

root=$(cd "$(dirname "$0")/.." && pwd)
# Test-only npm packages, pinned by their lock files: tests/sigstore-js (sigstore-js,
# @sigstore/tuf's seeds) and tests/k8s (the Kubernetes API schemas that check deploy/kubernetes).
# Each is reinstalled when its lock file is newer than its install.
install_npm_tools() {
  local dir
  for dir in "$root/tests/sigstore-js" "$root/tests/k8s"; do
    if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
      echo "bootstrap: npm ci in ${dir#"$root"/}" >&2
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
  done
}

missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != "installed" ]; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  install_npm_tools
  exit 0
fi

echo "bootstrap: installing ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  sudo=sudo
else
  sudo=
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
install_npm_tools
