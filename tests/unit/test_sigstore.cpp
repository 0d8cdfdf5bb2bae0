// Keyless verification internals: RFC 6962 inclusion proofs against the RFC's own recursive
// definitions, RFC 3339 times, trusted-root parsing errors. End-to-end keyless bundles (real and
// from the test Sigstore instance) are checked by the CLI tests (tests/python/test_keyless.py).
#include <doctest/doctest.h>

#include <drun/hash.hpp>
#include <drun/trust.hpp>

#include "sigstore/tlog.hpp"
#include "sigstore/trusted_root.hpp"

#include <string>
#include <vector>

using namespace drun;
using namespace drun::detail::sigstore;

namespace {

std::string sha(std::string_view s) {
  auto d = hash(hash_algorithm::sha256, as_bytes(s));
  return std::string(reinterpret_cast<const char*>(d.bytes().data()), d.size());
}
std::string leaf_hash(const std::string& e) { return sha(std::string(1, '\0') + e); }
std::string node(const std::string& l, const std::string& r) { return sha(std::string(1, '\1') + l + r); }

// RFC 6962 2.1: MTH(D[n]) with k the largest power of two smaller than n.
std::size_t split(std::size_t n) {
  std::size_t k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}
std::string mth(const std::vector<std::string>& d, std::size_t b, std::size_t e) {
  if (e - b == 1) return leaf_hash(d[b]);
  std::size_t k = split(e - b);
  return node(mth(d, b, b + k), mth(d, b + k, e));
}
// RFC 6962 2.1.1: PATH(m, D[n]).
std::vector<std::string> path(std::size_t m, const std::vector<std::string>& d, std::size_t b, std::size_t e) {
  if (e - b == 1) return {};
  std::size_t k = split(e - b);
  std::vector<std::string> p;
  if (m < k) {
    p = path(m, d, b, b + k);
    p.push_back(mth(d, b + k, e));
  } else {
    p = path(m - k, d, b + k, e);
    p.push_back(mth(d, b, b + k));
  }
  return p;
}

}  // namespace

TEST_CASE("inclusion proofs verify exactly for every leaf of trees up to 33 entries") {
  std::vector<std::string> entries;
  for (int i = 0; i < 33; ++i) entries.push_back("entry " + std::to_string(i));
  for (std::size_t n = 1; n <= entries.size(); ++n) {
    std::string root = mth(entries, 0, n);
    for (std::size_t m = 0; m < n; ++m) {
      auto p = path(m, entries, 0, n);
      auto lh = leaf_hash(entries[m]);
      CAPTURE(n);
      CAPTURE(m);
      CHECK(merkle_inclusion_holds(m, n, as_bytes(lh), p, as_bytes(root)));
      // Another leaf, another index, a tree that needs a longer path, a flipped path hash, a
      // shortened or lengthened path: each must fail. (A size that shares the path's shape, such
      // as n + 1 for a leaf of a full left subtree, passes by design: the checkpoint signs the
      // size together with the root.)
      auto other = leaf_hash(entries[(m + 1) % n]);
      if (n > 1) CHECK_FALSE(merkle_inclusion_holds(m, n, as_bytes(other), p, as_bytes(root)));
      if (n > 1) CHECK_FALSE(merkle_inclusion_holds((m + 1) % n, n, as_bytes(lh), p, as_bytes(root)));
      CHECK_FALSE(merkle_inclusion_holds(m, 2 * n + 1, as_bytes(lh), p, as_bytes(root)));
      CHECK_FALSE(merkle_inclusion_holds(n, n, as_bytes(lh), p, as_bytes(root)));
      if (!p.empty()) {
        auto flipped = p;
        flipped.back()[5] ^= 1;
        CHECK_FALSE(merkle_inclusion_holds(m, n, as_bytes(lh), flipped, as_bytes(root)));
        auto shorter = p;
        shorter.pop_back();
        CHECK_FALSE(merkle_inclusion_holds(m, n, as_bytes(lh), shorter, as_bytes(root)));
      }
      auto longer = p;
      longer.push_back(std::string(32, 'x'));
      CHECK_FALSE(merkle_inclusion_holds(m, n, as_bytes(lh), longer, as_bytes(root)));
    }
  }
}

TEST_CASE("Rekor entries: an inclusion proof's hashes are SHA-256 nodes or the entry is malformed") {
  // Found by tests/fuzz/sigstore.cpp: such a proof used to parse and then fail to hold, which
  // reads as a log that did not record the entry rather than a broken bundle.
  const std::string h32 = "wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0=", h21 = "zxGZFVvd0FEmjR8WrFwMdcAJ9vtc";
  auto entry = [&](const std::string& root, const std::string& hash) {
    return drun::detail::json::parse(R"({"logIndex": "7", "logId": {"keyId": ")" + h32 + R"("},
      "kindVersion": {"kind": "dsse", "version": "0.0.1"}, "canonicalizedBody": "e30=",
      "inclusionProof": {"logIndex": "7", "treeSize": "9", "rootHash": ")" + root + R"(",
                         "hashes": [")" + h32 + R"(", ")" + hash + R"("]}})");
  };
  auto good = parse_tlog_entry(entry(h32, h32), "tlogEntries[0]");
  REQUIRE_MESSAGE(good, good.error().detail());
  REQUIRE(good->proof);
  CHECK(good->proof->hashes.size() == 2);
  auto bad = parse_tlog_entry(entry(h32, h21), "tlogEntries[0]");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code() == errc::malformed_bundle);
  CHECK(bad.error().detail().find("tlogEntries[0].inclusionProof.hashes holds a hash of 21 bytes, not 32") !=
        std::string::npos);
  auto bad_root = parse_tlog_entry(entry(h21, h32), "tlogEntries[0]");
  REQUIRE_FALSE(bad_root);
  CHECK(bad_root.error().detail().find("tlogEntries[0].inclusionProof.rootHash is 21 bytes, not 32") !=
        std::string::npos);
}

TEST_CASE("RFC 3339 times as trusted roots write them") {
  CHECK(parse_rfc3339("1970-01-01T00:00:00Z") == 0);
  CHECK(parse_rfc3339("2021-03-07T03:20:29Z") == 1615087229000);
  CHECK(parse_rfc3339("2022-12-31T23:59:59.999Z") == 1672531199999);
  CHECK(parse_rfc3339("2022-12-31T23:59:59.5Z") == 1672531199500);
  CHECK(parse_rfc3339("2022-12-31T23:59:59.123456789Z") == 1672531199123);
  CHECK(format_time(1615087229000) == "2021-03-07T03:20:29Z");
  for (const char* bad : {"", "2021-03-07", "2021-03-07T03:20:29", "2021-03-07T03:20:29+01:00", "2021-13-07T03:20:29Z",
                          "2021-03-07T03:20:29.Z", "2021-03-07 03:20:29Z", "x021-03-07T03:20:29Z"})
    CHECK_MESSAGE(!parse_rfc3339(bad), bad);
}

TEST_CASE("trusted roots: malformed ones are key errors naming the field") {
  auto fails = [](std::string_view text, std::string_view fragment) {
    auto t = trust_store::from_sigstore_json(text, {"a@example.com", "https://issuer.example.com"});
    REQUIRE_FALSE(t);
    CHECK(t.error().code() == errc::key_error);
    CHECK_MESSAGE(t.error().detail().find(fragment) != std::string::npos, t.error().detail());
  };
  fails("not json", "not valid JSON");
  fails("[]", "not a JSON object");
  fails(R"({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"})", "is not a Sigstore TrustedRoot");
  std::string mt = R"("mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1")";
  fails("{" + mt + R"(, "tlogs": [{"publicKey": {"rawBytes": "AAAA"}}]})", "tlogs[0].publicKey.rawBytes is not a DER");
  fails("{" + mt + R"(, "certificateAuthorities": [{"certChain": {"certificates": [{"rawBytes": "MIIB"}]}}]})",
        "certificateAuthorities[0].certChain.certificates[0].rawBytes");
  fails("{" + mt + R"(, "certificateAuthorities": [{"certChain": {"certificates": []}}]})", "has 0 certificates");
  fails("{" + mt + ", " + mt + "}", "duplicate key");
  // A log id of another length than a SHA-256 (found by tests/fuzz/sigstore.cpp).
  auto log_with_id = [&](std::string_view key_id) {
    return "{" + mt + R"(, "tlogs": [{"baseUrl": "https://rekor.example.com", "hashAlgorithm": "SHA2_256",
      "publicKey": {"rawBytes": "MCowBQYDK2VwAyEASm2ePOkBer6DqUIj6SyWTk088gTx4InLjkGnjyrN20U=",
                    "keyDetails": "PKIX_ED25519", "validFor": {"start": "2020-01-01T00:00:00Z"}},
      "logId": {"keyId": ")" + std::string(key_id) + R"("}}]})";
  };
  fails(log_with_id("zxGZFVvd0FEmjR8WrFwMdcAJ9vtc"), "tlogs[0].logId.keyId is 21 bytes, not a 32-byte SHA-256");
  CHECK(trust_store::from_sigstore_json(log_with_id("wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0="),
                                        {"a@example.com", "https://issuer.example.com"}));
  // An identity policy is not optional.
  auto t = trust_store::from_sigstore_json("{" + mt + "}", {"", "https://issuer.example.com"});
  REQUIRE_FALSE(t);
  CHECK(t.error().code() == errc::invalid_argument);
  // A well-formed root without CAs or logs loads; bundles checked against it fail at the step
  // that needs them (tests/python/test_keyless.py).
  CHECK(trust_store::from_sigstore_json("{" + mt + "}", {"a@example.com", "https://issuer.example.com"}));
}
