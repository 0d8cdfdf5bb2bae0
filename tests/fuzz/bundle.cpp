// Bundles as a verifier receives them (a file, a URL, a peer), checked against a key trust store.
// Contract: verifying is deterministic; a bundle that verifies carries an Ed25519 signature by the
// test key over the DSSE pre-authentication encoding of its payload, checked here with OpenSSL
// directly; its artifact id is the SHA-256 of that payload; its pieces are the statement's.
#include "detail/encoding.hpp"
#include "detail/json.hpp"
#include "fuzz.hpp"

#include <drun/verify.hpp>

#include <fmt/format.h>

#include <optional>

namespace {

using drun::detail::json;

std::optional<drun::trust_store> trust;

void check_accepted(std::string_view input, const drun::verified_manifest& m) {
  auto doc = json::parse(input.begin(), input.end(), nullptr, false);
  FUZZ_REQUIRE(doc.is_object());
  const auto& env = doc.at("dsseEnvelope");
  auto payload = drun::detail::base64_decode(env.at("payload").get<std::string>());
  auto sig = drun::detail::base64_decode(env.at("signatures").at(0).at("sig").get<std::string>());
  FUZZ_REQUIRE(payload && sig);
  const auto type = env.at("payloadType").get<std::string>();
  FUZZ_REQUIRE(fuzz::signed_by_test_key(
      fmt::format("DSSEv1 {} {} {} {}", type.size(), type, payload->size(), *payload), *sig));
  FUZZ_REQUIRE(m.artifact_id() == drun::hash(drun::hash_algorithm::sha256, drun::as_bytes(*payload)).hex());
  auto statement = json::parse(*payload);
  FUZZ_REQUIRE(m.pieces().size() == statement.at("predicate").at("resources").size());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  auto key = drun::public_key::from_pem(fuzz::test_public_pem);
  if (!key) std::abort();
  trust.emplace(drun::trust_store::from_public_key(std::move(*key)));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto input = fuzz::text(data, size);
  auto first = drun::verify_bundle(input, *trust);
  auto second = drun::verify_bundle(input, *trust);
  FUZZ_REQUIRE(first.has_value() == second.has_value());
  if (!first) {
    FUZZ_REQUIRE(first.error().code() == second.error().code() && first.error().detail() == second.error().detail());
    return 0;
  }
  FUZZ_REQUIRE(first->artifact_id() == second->artifact_id());
  check_accepted(input, *first);
  return 0;
}
