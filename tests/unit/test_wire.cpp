// The peer protocol's frame bodies (src/peer/wire.hpp): each decoder accepts what its encoder
// writes and refuses every other spelling; tests/fuzz/wire_*.cpp check the same round trip on
// inputs a fuzzer makes.
#include "peer/wire.hpp"

#include <drun/hash.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <string>

using namespace drun;
namespace wire = drun::peer;

namespace {

std::vector<std::byte> raw(std::initializer_list<unsigned> v) {
  std::vector<std::byte> out;
  for (auto b : v) out.push_back(static_cast<std::byte>(b));
  return out;
}

std::vector<std::byte> written(const wire::writer& w) { return {w.view().begin(), w.view().end()}; }

}  // namespace

TEST_CASE("wire: a HELLO round-trips in both versions; another version is unsupported, not malformed") {
  std::string token = "a.b.c", tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  for (std::uint16_t version : {std::uint16_t{1}, std::uint16_t{2}}) {
    wire::writer w;
    wire::encode(w, wire::hello{version, drun::as_bytes(token), version == 2 ? drun::as_bytes(tp) : std::span<const std::byte>()});
    auto body = written(w);
    auto h = wire::decode_hello(body);
    REQUIRE(h);
    CHECK(h->version == version);
    CHECK(std::string(reinterpret_cast<const char*>(h->token.data()), h->token.size()) == token);
    CHECK(h->traceparent.size() == (version == 2 ? tp.size() : 0));
    body.push_back(std::byte{0});  // a trailing byte
    CHECK(wire::decode_hello(body).error().code() == errc::malformed_bundle);
  }
  auto v3 = raw({'D', 'R', 'U', 'N', 0, 3, 0, 0});
  auto h = wire::decode_hello(v3);
  REQUIRE(!h);
  CHECK(h.error().code() == errc::unsupported);
  CHECK(h.error().detail().find("versions 1 to 2, not 3") != std::string::npos);
  CHECK(wire::decode_hello(raw({'D', 'R', 'U', 'X', 0, 2, 0, 0, 0})).error().code() == errc::malformed_bundle);
  // A traceparent length other than 0 or 55, and a token longer than the body.
  CHECK(!wire::decode_hello(raw({'D', 'R', 'U', 'N', 0, 2, 0, 0, 1, '0'})));
  CHECK(!wire::decode_hello(raw({'D', 'R', 'U', 'N', 0, 2, 0, 9, 'x'})));
}

TEST_CASE("wire: requests carry exactly an artifact id, and GET_PIECE its two indexes") {
  std::vector<std::byte> id(32, std::byte{0xab});
  wire::writer w;
  wire::encode(w, wire::request{wire::frame::get_piece, id, 3, 70000});
  auto body = written(w);
  auto r = wire::decode_request(wire::frame::get_piece, body);
  REQUIRE(r);
  CHECK(r->file == 3);
  CHECK(r->piece == 70000);
  CHECK(!wire::decode_request(wire::frame::get_bundle, body));  // the indexes are trailing bytes there
  CHECK(wire::decode_request(wire::frame::get_have, id));
  CHECK(!wire::decode_request(wire::frame::get_have, std::span(id).first(31)));
  CHECK(!wire::decode_request(wire::frame::welcome, id));  // not a request
}

TEST_CASE("wire: holdings refuse another piece count and set padding bits") {
  std::vector<bool> have{true, false, true, true, false, false, true, true, true, false, true};
  wire::writer w;
  wire::encode_holdings(w, have);
  auto body = written(w);
  CHECK(body == raw({0, 0, 0, 11, 0xb3, 0xa0}));
  CHECK(wire::decode_holdings(body, 11) == have);
  CHECK(!wire::decode_holdings(body, 12));
  body.back() |= std::byte{0x01};  // a bit past piece 10
  CHECK(!wire::decode_holdings(body, 11));
  CHECK(wire::decode_holdings(raw({0, 0, 0, 0}), 0) == std::vector<bool>{});
}

TEST_CASE("wire: WELCOME, BODY and ERROR bodies have one spelling each") {
  CHECK(wire::decode_welcome(raw({0, 2, 0, 1}))->features == 1);
  CHECK(!wire::decode_welcome(raw({0, 2, 0})));
  CHECK(wire::decode_answer_length(raw({0, 0, 0, 0, 0, 0x40, 0, 0})) == 0x400000);
  CHECK(!wire::decode_answer_length(raw({0, 0, 0, 0, 0, 0x40, 0, 0, 0})));
  auto body = raw({0, 4, 'n', 'o'});  // the message is a view into it
  auto e = wire::decode_error(body);
  REQUIRE(e);
  CHECK(e->code == 4);
  CHECK(e->message == "no");
  CHECK(!wire::decode_error(raw({4})));
  wire::writer w;
  wire::encode(w, wire::error_frame{7, std::string(5000, 'x')});
  CHECK(w.view().size() == 2 + wire::max_error_message);  // cut at the bound
  auto head = raw({0x04, 0, 0, 0, 41});
  CHECK(wire::decode_header(std::span<const std::byte, 5>(head.data(), 5)).error().detail().find("at most 40") !=
        std::string::npos);
  auto unknown = raw({0x7f, 0, 0, 0, 0});
  CHECK(!wire::decode_header(std::span<const std::byte, 5>(unknown.data(), 5)));
}
