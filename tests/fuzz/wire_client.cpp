// What a fetching peer reads from the peers it asks: WELCOME, BODY (an answer's length), ERROR,
// the holdings bitfield, and the RDMA_READY address. The first input byte picks the frame.
// Contract: whatever decodes encodes back to the same bytes.
#include "transport/rdma.hpp"
#include "wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace peer = drun::peer;
  if (size == 0) return 0;
  auto body = fuzz::bytes(data + 1, size - 1);
  switch (data[0] % 5) {
    case 0:
      fuzz::require_round_trip(peer::decode_welcome(body), body,
                               [](peer::writer& w, const peer::welcome& v) { peer::encode(w, v); });
      break;
    case 1:
      fuzz::require_round_trip(peer::decode_answer_length(body), body,
                               [](peer::writer& w, std::uint64_t v) { peer::encode_answer_length(w, v); });
      break;
    case 2: {
      auto e = peer::decode_error(body);
      if (e) FUZZ_REQUIRE(e->message.size() <= peer::max_error_message);
      fuzz::require_round_trip(e, body, [](peer::writer& w, const peer::error_frame& v) { peer::encode(w, v); });
      break;
    }
    case 3: {
      // The piece count the caller's manifest has: what the answer's own count must equal.
      std::size_t pieces = 0;
      if (body.size() >= 4)
        for (std::size_t i = 0; i < 4; ++i) pieces = (pieces << 8) | std::to_integer<std::size_t>(body[i]);
      if (pieces > (std::size_t{1} << 20)) return 0;  // a manifest has at most this many in practice
      auto have = peer::decode_holdings(body, pieces);
      if (have) FUZZ_REQUIRE(have->size() == pieces);
      fuzz::require_round_trip(have, body, [](peer::writer& w, const std::vector<bool>& v) { peer::encode_holdings(w, v); });
      break;
    }
    default: {
      auto a = drun::rdma::decode(body, false);
      fuzz::require_round_trip(a, body, [](peer::writer& w, const drun::rdma::endpoint_address& v) {
        w.bytes(drun::rdma::encode(v, false));
      });
      break;
    }
  }
  return 0;
}
