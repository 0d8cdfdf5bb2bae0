#!/usr/bin/env bash
# Configures and builds drun in BUILD_DIR (default build/) with warnings as errors.
# Extra arguments go to cmake's configure step (e.g. -DDRUN_SANITIZE=ON); BUILD_TARGETS (names,
# space-separated) builds only those.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} -DDRUN_WERROR=ON "$@" >/dev/null
targets=()
for t in ${BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build" -j "$(nproc)" "${targets[@]}"
