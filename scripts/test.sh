#!/usr/bin/env bash
# Quick start, command 2: install what is missing, build, and run every test:
#   1. warnings-as-errors build; ctest (unit tests, CLI and interop tests, install + consumer);
#   2. an AddressSanitizer + UBSan build running the unit tests and the CLI tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc)
start=$SECONDS

"$root/scripts/bootstrap.sh"

echo "== build (warnings are errors)"
"$root/scripts/build.sh"
echo "== tests"
ctest --test-dir "$root/build" --output-on-failure -j "$jobs"

echo "== build with -fsanitize=address,undefined"
BUILD_DIR="$root/build-asan" BUILD_TYPE=Debug "$root/scripts/build.sh" -DDRUN_SANITIZE=ON -DDRUN_BUILD_BENCHMARKS=OFF \
  -DDRUN_BUILD_PYTHON=OFF  # an instrumented module would need libasan preloaded into python
echo "== tests under the sanitizers"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$root/build-asan" --output-on-failure -j "$jobs" -E consumer

echo "== all tests passed in $((SECONDS - start)) s"
