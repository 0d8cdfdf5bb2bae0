// Access policy files (drun serve --policy): roles, bindings to certificate subjects, SPIFFE IDs
// and token subjects, artifact ids and publishers. A publisher key in the scratch directory
// (publisher.pub, the test key) can be named. Contract: a policy that parses decides every
// request the same way on each of two parses, and a caller with no certificate and no token is
// never let in.
#include "fuzz.hpp"

#include <drun/policy.hpp>
#include <drun/token.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

std::filesystem::path scratch;
std::vector<drun::peer_identity> callers;
const std::vector<std::string> artifacts = {std::string(64, 'a'), std::string(64, '0'),
                                            "5e0c1b7e2fb5c8e0d07f0e4c58bb1f6c2b8d4b1ac3d0f5c6a7e8d9c0b1a2f3e4"};

drun::peer_identity caller(std::string subject, std::vector<std::string> uris, std::vector<std::string> dns,
                           std::optional<std::vector<std::string>> token_artifacts) {
  drun::peer_identity who;
  who.has_certificate = !subject.empty();
  who.subject = std::move(subject);
  who.uris = std::move(uris);
  who.dns = std::move(dns);
  if (token_artifacts) {
    drun::token_claims c;
    c.subject = "fuzz-job";
    c.audience = {"drun"};
    c.artifacts = *token_artifacts;
    who.token = c;
  }
  return who;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  scratch = fuzz::scratch_dir("policy");
  std::ofstream(scratch / "publisher.pub") << fuzz::test_public_pem;
  callers = {caller("CN=node-1,O=ml", {"spiffe://ml.example/node-1"}, {"node-1.ml.example"}, std::nullopt),
             caller("CN=trainer,O=ml", {}, {}, std::nullopt),
             caller("", {}, {}, std::vector<std::string>{"*"}),
             caller("CN=node-2,O=ml", {"spiffe://ml.example/node-2"}, {}, std::vector<std::string>{artifacts[0]}),
             caller("", {}, {}, std::nullopt)};
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto text = fuzz::text(data, size);
  auto a = drun::access_policy::parse(text, scratch);
  auto b = drun::access_policy::parse(text, scratch);
  FUZZ_REQUIRE(a.has_value() == b.has_value());
  if (!a) {
    FUZZ_REQUIRE(a.error().detail() == b.error().detail());
    return 0;
  }
  for (const auto& who : callers)
    for (const auto& id : artifacts) {
      auto x = a->authorize(who, id, {});
      auto y = b->authorize(who, id, {});
      auto again = a->authorize(who, id, {});
      FUZZ_REQUIRE(x.has_value() == y.has_value() && x.has_value() == again.has_value());
      if (!who.has_certificate && !who.token) FUZZ_REQUIRE(!x.has_value());
    }
  return 0;
}
