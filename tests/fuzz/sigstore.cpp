// What a keyless (Sigstore) bundle and its trust bring: the trusted root JSON (CAs, logs, TSAs)
// and a bundle's verificationMaterial (the Fulcio leaf, transparency log entries with inclusion
// proofs and checkpoints, RFC 3161 timestamps). The first input byte picks the parser.
// Contract: each parses the same way twice, errors are malformed input (never a crash or a
// throw), and what parses keeps the bounds the verifier relies on (32-byte log hashes).
#include "detail/json.hpp"
#include "fuzz.hpp"
#include "sigstore/keyless.hpp"
#include "sigstore/tlog.hpp"
#include "sigstore/trusted_root.hpp"

namespace {

namespace sig = drun::detail::sigstore;

void trusted_root(std::string_view text) {
  auto a = sig::parse_trusted_root(text);
  auto b = sig::parse_trusted_root(text);
  FUZZ_REQUIRE(a.has_value() == b.has_value());
  if (!a) {
    FUZZ_REQUIRE(a.error().detail() == b.error().detail());
    return;
  }
  FUZZ_REQUIRE(a->certificate_authorities.size() == b->certificate_authorities.size() &&
               a->tlogs.size() == b->tlogs.size() && a->ctlogs.size() == b->ctlogs.size());
  for (const auto& ca : a->certificate_authorities) FUZZ_REQUIRE(!ca.chain.empty());
  for (const auto& log : a->tlogs) FUZZ_REQUIRE(log.log_id.size() == 32);
}

void material(std::string_view text) {
  auto doc = drun::detail::parse_json_strict(text, "bundle");
  if (!doc || !doc->is_object()) return;
  const auto* vm = drun::detail::optional_field(*doc, "verificationMaterial");
  if (!vm) return;
  auto m = sig::parse_keyless_material(*vm);
  if (!m) {
    FUZZ_REQUIRE(m.error().code() == drun::errc::malformed_bundle);
    return;
  }
  FUZZ_REQUIRE(!m->leaf_der.empty());
  for (const auto& e : m->entries) {
    if (!e.proof) continue;
    FUZZ_REQUIRE(e.proof->root_hash.size() == 32);
    for (const auto& h : e.proof->hashes) FUZZ_REQUIRE(h.size() == 32);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto text = fuzz::text(data + 1, size - 1);
  if (data[0] % 2 == 0) trusted_root(text);
  else material(text);
  return 0;
}
