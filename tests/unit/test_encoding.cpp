// Strict codecs and strict JSON (internal).
#include "detail/encoding.hpp"
#include "detail/json.hpp"

#include "support.hpp"

#include <drun/hash.hpp>

using namespace drun;
using namespace drun::detail;

TEST_CASE("base64 RFC 4648 vectors") {
  const char* plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
  const char* coded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
  for (int i = 0; i < 7; ++i) {
    CHECK(base64_encode(as_bytes(plain[i])) == coded[i]);
    auto d = base64_decode(coded[i]);
    REQUIRE(d);
    CHECK(*d == plain[i]);
  }
}

TEST_CASE("base64 decoding is strict") {
  CHECK_FALSE(base64_decode("Zg="));        // length not a multiple of 4
  CHECK_FALSE(base64_decode("Zg=a"));       // data after padding
  CHECK_FALSE(base64_decode("Z==="));       // too much padding
  CHECK_FALSE(base64_decode("Zh=="));       // non-canonical: stray bits under the padding
  CHECK_FALSE(base64_decode("Zm9v\nYmFy")); // whitespace
  CHECK_FALSE(base64_decode("Zm9-"));       // URL alphabet
  CHECK_FALSE(base64_decode("Zg==Zg=="));   // padding in the middle
}

TEST_CASE("hex") {
  std::byte raw[] = {std::byte{0x00}, std::byte{0xab}, std::byte{0xff}};
  CHECK(hex_encode(raw) == "00abff");
  auto d = hex_decode("00ABff");
  REQUIRE(d);
  CHECK(d->size() == 3);
  CHECK((*d)[1] == std::byte{0xab});
  CHECK_FALSE(hex_decode("abc"));
  CHECK_FALSE(hex_decode("zz"));
}

TEST_CASE("strict JSON refuses duplicate keys, deep nesting and garbage") {
  CHECK(parse_json_strict(R"({"a":1,"b":{"a":2}})", "doc"));
  auto dup = parse_json_strict(R"({"a":1,"a":2})", "doc");
  REQUIRE_FALSE(dup);
  CHECK(dup.error().code() == errc::malformed_bundle);
  CHECK(dup.error().message().find("duplicate key \"a\"") != std::string::npos);
  std::string deep(100, '[');
  deep += std::string(100, ']');
  auto d = parse_json_strict(deep, "doc");
  REQUIRE_FALSE(d);
  CHECK(d.error().message().find("nested deeper") != std::string::npos);
  auto bad = parse_json_strict(R"({"a":)", "bundle");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message().find("bundle is not valid JSON") != std::string::npos);
  CHECK_FALSE(parse_json_strict("{\"a\":\"\xff\"}", "doc"));  // invalid UTF-8
}
