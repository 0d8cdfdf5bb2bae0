// Bearer tokens (JWT) as a peer server receives them in a HELLO, and the key sets (JWKS) that
// verify them. The first input byte picks the parser. Contract: a token that verifies is signed
// by the test key over its first two parts (checked with OpenSSL alone) and its claims meet the
// check (audience, expiry); a key set that parses does so the same way twice.
#include "detail/encoding.hpp"
#include "fuzz.hpp"

#include <drun/keys.hpp>
#include <drun/token.hpp>

#include <algorithm>
#include <optional>

namespace {

std::optional<drun::jwks> keys;
constexpr std::string_view audience = "drun-fuzz";

std::optional<std::string> base64url_decode(std::string_view text) {
  std::string b64(text);
  for (auto& c : b64) c = c == '-' ? '+' : c == '_' ? '/' : c;
  while (b64.size() % 4 != 0) b64 += '=';
  return drun::detail::base64_decode(b64);
}

void token(std::string_view text) {
  drun::token_check check;
  check.audience = std::string(audience);
  check.now = std::chrono::system_clock::time_point(std::chrono::seconds(fuzz::test_time));
  auto claims = drun::verify_token(text, *keys, check);
  if (!claims) {
    auto c = claims.error().code();
    FUZZ_REQUIRE(c == drun::errc::signature_invalid || c == drun::errc::malformed_bundle);
    // The message never repeats a token (it is a credential): anything JWT-shaped (two dots) and
    // not tiny, which the message's own words cannot be.
    if (text.size() >= 16 && std::count(text.begin(), text.end(), '.') >= 2)
      FUZZ_REQUIRE(claims.error().message().find(text) == std::string::npos);
    return;
  }
  auto dot = text.rfind('.');
  FUZZ_REQUIRE(dot != std::string_view::npos);
  auto sig = base64url_decode(text.substr(dot + 1));
  FUZZ_REQUIRE(sig && fuzz::signed_by_test_key(text.substr(0, dot), *sig));
  FUZZ_REQUIRE(!claims->subject.empty());
  FUZZ_REQUIRE(std::find(claims->audience.begin(), claims->audience.end(), audience) != claims->audience.end());
  FUZZ_REQUIRE(claims->expires + check.clock_skew >= check.now);
}

void key_set(std::string_view text) {
  auto a = drun::jwks::parse(text);
  auto b = drun::jwks::parse(text);
  FUZZ_REQUIRE(a.has_value() == b.has_value());
  if (!a) FUZZ_REQUIRE(a.error().code() == b.error().code() && a.error().detail() == b.error().detail());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  auto key = drun::public_key::from_pem(fuzz::test_public_pem);
  auto set = key ? drun::jwks_for(*key) : drun::result<std::string>(key.error());
  auto parsed = set ? drun::jwks::parse(*set) : drun::result<drun::jwks>(set.error());
  if (!parsed) std::abort();
  keys.emplace(std::move(*parsed));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto text = fuzz::text(data + 1, size - 1);
  if (data[0] % 2 == 0) token(text);
  else key_set(text);
  return 0;
}
