// What a peer server reads from callers before and after authenticating them: frame headers,
// the HELLO (with its token and trace context), requests, and the RDMA_SETUP address. The first
// input byte picks the frame. Contract: whatever decodes encodes back to the same bytes, and
// every bound the decoder promises holds.
#include "transport/rdma.hpp"
#include "wire.hpp"

#include <array>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace peer = drun::peer;
  if (size == 0) return 0;
  auto body = fuzz::bytes(data + 1, size - 1);
  switch (data[0] % 4) {
    case 0: {
      if (body.size() < peer::frame_header_size) return 0;
      auto head = body.first<peer::frame_header_size>();
      auto h = peer::decode_header(head);
      if (h) FUZZ_REQUIRE(peer::max_body(h->type) > 0 && h->length <= peer::max_body(h->type));
      fuzz::require_round_trip(h, head, [](peer::writer& w, const peer::frame_header& v) {
        w.u8(v.type).u32(v.length);
      });
      break;
    }
    case 1: {
      auto h = peer::decode_hello(body);
      if (h) {
        FUZZ_REQUIRE(h->version >= peer::oldest_protocol_version && h->version <= peer::protocol_version);
        FUZZ_REQUIRE(h->traceparent.empty() || h->traceparent.size() == peer::traceparent_size);
      } else {
        FUZZ_REQUIRE(h.error().code() == drun::errc::malformed_bundle || h.error().code() == drun::errc::unsupported);
      }
      fuzz::require_round_trip(h, body, [](peer::writer& w, const peer::hello& v) { peer::encode(w, v); });
      break;
    }
    case 2: {
      if (body.empty()) return 0;
      constexpr std::array types{peer::frame::get_bundle, peer::frame::get_have, peer::frame::get_piece};
      auto type = types[std::to_integer<std::size_t>(body[0]) % types.size()];
      auto rest = body.subspan(1);
      auto r = peer::decode_request(type, rest);
      if (r) FUZZ_REQUIRE(r->type == type && r->artifact.size() == 32);
      fuzz::require_round_trip(r, rest, [](peer::writer& w, const peer::request& v) { peer::encode(w, v); });
      break;
    }
    default: {
      auto a = drun::rdma::decode(body, true);
      if (a) FUZZ_REQUIRE(!a->qps.empty() && a->qps.size() <= drun::rdma::max_queue_pairs && body.size() <= drun::rdma::max_encoded_size(true));
      fuzz::require_round_trip(a, body, [](peer::writer& w, const drun::rdma::endpoint_address& v) {
        w.bytes(drun::rdma::encode(v, true));
      });
      break;
    }
  }
  return 0;
}
