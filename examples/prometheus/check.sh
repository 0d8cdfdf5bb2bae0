#!/usr/bin/env bash
# Checks this example with promtool (Debian: apt-get install prometheus): the scrape config (which
# also loads rules.yml), the rules themselves, and their unit tests in rules_test.yml.
# PROMTOOL=/path/to/promtool overrides the one on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "check.sh: promtool not found (install Debian's prometheus package, or set PROMTOOL)" >&2
  exit 2
fi
"$promtool" check config prometheus.yml
"$promtool" check rules rules.yml
"$promtool" test rules rules_test.yml
