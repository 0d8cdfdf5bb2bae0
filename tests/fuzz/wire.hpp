// The peer protocol's frame bodies, for the server-side and client-side wire harnesses: each
// decoder's contract is that whatever it accepts encodes back to exactly the bytes it read.
#pragma once

#include "fuzz.hpp"
#include "peer/wire.hpp"

#include <algorithm>
#include <span>

namespace fuzz {

inline bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

// decoded: the decoder's result (optional or result); encode(writer&, value) prints it.
template <class Decoded, class Encode>
void require_round_trip(const Decoded& decoded, std::span<const std::byte> body, Encode encode) {
  if (!decoded) return;
  drun::peer::writer w;
  encode(w, *decoded);
  FUZZ_REQUIRE(same_bytes(w.view(), body));
}

}  // namespace fuzz
