// libsodium must be initialized once before its allocator or RNG is used.
#pragma once

#include <sodium.h>

#include <cstdlib>

namespace drun::detail {

inline void ensure_sodium() {
  // Thread-safe once (magic static); sodium_init() is itself idempotent.
  static const bool ready = sodium_init() >= 0;
  if (!ready) std::abort();  // no usable entropy source: nothing secure can be done
}

}  // namespace drun::detail
