#!/usr/bin/env bash
# Quick start, command 2: install what is missing, build, and run every test:
#   1. warnings-as-errors build; ctest (unit tests, CLI and interop tests, install + consumer);
#   2. an AddressSanitizer + UBSan build running the unit tests and the CLI tests;
#   3. a ThreadSanitizer build running the unit tests (the fetch session's workers, the store's
#      concurrent readers, writers, GC and rotation, the peer server's threads, the thread pool,
#      the RDMA fake fabric);
#   4. every libFuzzer harness for FUZZ_SECONDS (default 10) each (scripts/fuzz.sh).
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

echo "== build with -fsanitize=thread"
# Debug (-O0) compiles in about half the time, and hides no access from the sanitizer.
BUILD_DIR="$root/build-tsan" BUILD_TYPE=Debug BUILD_TARGETS=drun_unit_tests "$root/scripts/build.sh" -DDRUN_SANITIZE_THREAD=ON \
  -DDRUN_BUILD_CLI=OFF -DDRUN_BUILD_PYTHON=OFF -DDRUN_BUILD_BENCHMARKS=OFF -DDRUN_BUILD_EXAMPLES=OFF -DDRUN_INSTALL=OFF
echo "== unit tests under ThreadSanitizer"
# No suppressions: a report fails the run.
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:exitcode=66 "$root/build-tsan/tests/drun_unit_tests"

echo "== fuzzing"
"$root/scripts/fuzz.sh" "${FUZZ_SECONDS:-10}"

echo "== all tests passed in $((SECONDS - start)) s"
