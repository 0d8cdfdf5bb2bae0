#!/usr/bin/env bash
# Installs drun from BUILD_DIR into WORK/prefix, then builds tests/consumer against it twice:
# with CMake's find_package(drun) and with pkg-config (drun.pc).
set -euo pipefail
build=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null

cmake -S "$here" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/cmake" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib" "$work/cmake/consumer"

libdir=$(ls -d "$work"/prefix/lib*/pkgconfig | head -n1)
export PKG_CONFIG_PATH=$libdir
# shellcheck disable=SC2046
g++ -o "$work/consumer-pc" "$here/main.cpp" $(pkg-config --cflags --libs drun)
LD_LIBRARY_PATH="$(dirname "$libdir")" "$work/consumer-pc"

# No third-party header may leak into the installed public headers.
if grep -rE '#include <(openssl|sodium|nlohmann|fmt|curl|infiniband|sqlite)' "$work/prefix/include/drun"; then
  echo "a public header includes a third-party header" >&2
  exit 1
fi
echo "consumer: find_package and pkg-config both work"
