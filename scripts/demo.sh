#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build, and run the demo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
"$root/scripts/build.sh"
exec "$root/examples/demo.sh" "$root/build"
