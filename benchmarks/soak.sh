#!/usr/bin/env bash
# A 10-minute soak of `drun serve` (tests/python/soak.py): 64 leechers fetching and verifying in
# loops while hostile clients (slow readers, half-open TLS, garbage frames, expired tokens,
# oversized lengths, reconnect storms) hit the same server. Prints the server's baseline, peak
# and settled RSS, descriptors and threads, and the counts.
#   benchmarks/soak.sh [SECONDS] [LEECHERS]     (defaults: 600, 64; needs build/drun)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
exec /usr/bin/python3 "$root/tests/python/soak.py" --drun "${DRUN_BIN:-$root/build/drun}" \
  --seconds "${1:-600}" --leechers "${2:-64}" --work "${TMPDIR:-/tmp}/drun-soak-$$"
