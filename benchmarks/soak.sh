#!/usr/bin/env bash
# A 10-minute soak of `drun serve` (tests/python/soak.py): 64 leechers fetching and verifying in
# loops while hostile clients (slow readers, half-open TLS, garbage frames, expired tokens,
# oversized lengths, reconnect storms) hit the same server. Prints the server's baseline, peak
# and settled RSS, descriptors and threads, and the counts.
#   benchmarks/soak.sh [SECONDS] [LEECHERS]     (defaults: 600, 64; needs build/drun)
# EMBEDDED=1: the server is a drun.PeerServer in a Python host that keeps working (needs the
# binding in build/bindings/python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
extra=()
if [ -n "${EMBEDDED:-}" ]; then
  extra=(--embedded)
  export PYTHONPATH="$root/build/bindings/python${PYTHONPATH:+:$PYTHONPATH}"
fi
exec /usr/bin/python3 "$root/tests/python/soak.py" --drun "${DRUN_BIN:-$root/build/drun}" \
  --seconds "${1:-600}" --leechers "${2:-64}" --work "${TMPDIR:-/tmp}/drun-soak-$$" "${extra[@]}"
