#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz, clang, ASan + UBSan on harness and library) and runs
# each for SECONDS_PER_TARGET (default 60), as many at once as there are cores:
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Prints each target's executions, speed and coverage. Exits non-zero on a crash, a leak, a
# timeout, a sanitizer report or a broken contract, leaving the reproducer in
# build-fuzz/artifacts/TARGET/ (rerun it: build-fuzz/tests/fuzz/fuzz_TARGET FILE). Each target's
# corpus grows in build-fuzz/corpus/TARGET, seeded from tests/fuzz/corpus/TARGET. FUZZ_RUNS=N
# also stops a target after N executions (the long run: FUZZ_RUNS=10000000 scripts/fuzz.sh 3600).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}

"$root/scripts/bootstrap.sh"
CC=clang CXX=clang++ BUILD_DIR="$build" BUILD_TYPE=RelWithDebInfo "$root/scripts/build.sh" -DDRUN_FUZZ=ON \
  -DDRUN_BUILD_CLI=OFF -DDRUN_BUILD_TESTS=OFF -DDRUN_BUILD_PYTHON=OFF -DDRUN_BUILD_BENCHMARKS=OFF \
  -DDRUN_BUILD_EXAMPLES=OFF -DDRUN_INSTALL=OFF

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$build"/tests/fuzz/fuzz_*; do targets+=("$(basename "$f" | sed 's/^fuzz_//')"); done
fi

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
logs="$build/logs"
mkdir -p "$logs"

run_one() {
  local t=$1 work="$build/corpus/$1" art="$build/artifacts/$1"
  mkdir -p "$work" "$art"
  local dict=() runs=()
  [ -n "${FUZZ_RUNS:-}" ] && runs=(-runs="$FUZZ_RUNS")
  [ -f "$root/tests/fuzz/dict/$t.dict" ] && dict=(-dict="$root/tests/fuzz/dict/$t.dict")
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a parser that balloons is a bug.
  rm -f "$logs/$t.rc"
  "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$art/" "${runs[@]}" "${dict[@]}" "$work" "$root/tests/fuzz/corpus/$t" >"$logs/$t.log" 2>&1
  echo $? >"$logs/$t.rc"
}

jobs=${FUZZ_JOBS:-$(nproc)}  # targets at once
for t in "${targets[@]}"; do
  [ -x "$build/tests/fuzz/fuzz_$t" ] || { echo "fuzz.sh: no harness $t" >&2; exit 2; }
  (set +e; run_one "$t") &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
done
wait
failed=()
for t in "${targets[@]}"; do
  [ "$(cat "$logs/$t.rc" 2>/dev/null)" = 0 ] || failed+=("$t")
done

printf '%-14s %12s %9s %7s %7s %8s\n' target executions exec/s cov ft corpus
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  printf '%-14s %12s %9s %7s %7s %8s\n' "$t" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}"
done

if [ ${#failed[@]} -gt 0 ]; then
  for t in "${failed[@]}"; do
    echo "== fuzz_$t FAILED; its log ($logs/$t.log) ends:"
    grep -v -E '^#[0-9]+' "$logs/$t.log" | tail -40
    echo "   reproducer: $(ls -t "$build/artifacts/$t"/* 2>/dev/null | head -1)"
  done
  exit 1
fi
echo "== no harness found anything (${seconds} s each${FUZZ_RUNS:+, or $FUZZ_RUNS executions})"
