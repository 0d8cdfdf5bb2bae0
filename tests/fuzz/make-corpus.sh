#!/usr/bin/env bash
# Regenerates tests/fuzz/corpus (the harnesses' seeds) with drun's own code (seeds.cpp), plus a
# real Sigstore bundle (model-transparency's, in tests/data) and the public-good trusted root that
# sigstore-js ships. Regression inputs (regression-*) are kept. Needs scripts/fuzz.sh's build.
#   tests/fuzz/make-corpus.sh [BUILD_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build-fuzz}
out="$here/corpus"
find "$out" -type f ! -name 'regression-*' -delete 2>/dev/null || true
"$build/tests/fuzz/drun_fuzz_seeds" "$out"
mkdir -p "$out/sigstore"
# The first byte picks the harness's parser: 0 a trusted root, 1 a bundle's verification material.
{ printf '\001'; cat "$root/tests/data/model-transparency/v1.1.0-sigstore/model.sig"; } >"$out/sigstore/model-transparency"
python3 - "$root/tests/sigstore-js/node_modules/@sigstore/tuf/seeds.json" "$out/sigstore/public-good-root" <<'PY'
import base64, json, sys
seeds = json.load(open(sys.argv[1]))
root = seeds["https://tuf-repo-cdn.sigstore.dev"]["targets"]["trusted_root.json"]
open(sys.argv[2], "wb").write(b"\0" + base64.b64decode(root))
PY
echo "make-corpus: $(find "$out" -type f | wc -l) seeds in $out"
