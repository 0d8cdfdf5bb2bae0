// OCI references (internal): what parses, what is named when it does not.
#include "oci/registry.hpp"

#include "support.hpp"

using namespace drun;

TEST_CASE("OCI references: registry, repository, tag or digest") {
  auto r = oci::parse_reference("oci://registry.example:5000/models/llama-3_8b:v1.0");
  REQUIRE(r);
  CHECK(r->registry == "registry.example:5000");
  CHECK(r->repository == "models/llama-3_8b");
  CHECK(r->tag == "v1.0");
  CHECK(r->digest.empty());
  CHECK(r->base() == "https://registry.example:5000/v2/models/llama-3_8b");
  CHECK(r->text() == "oci://registry.example:5000/models/llama-3_8b:v1.0");

  const std::string d = "sha256:" + std::string(64, 'a');
  r = oci::parse_reference("oci://127.0.0.1:5000/a/b/c@" + d);
  REQUIRE(r);
  CHECK(r->repository == "a/b/c");
  CHECK(r->ref() == d);
  CHECK(r->tag.empty());

  r = oci::parse_reference("oci://[::1]:5000/repo");  // no tag: latest, as docker has it
  REQUIRE(r);
  CHECK(r->registry == "[::1]:5000");
  CHECK(r->tag == "latest");
}

TEST_CASE("OCI references that do not parse are invalid arguments that say why") {
  const std::pair<const char*, const char*> bad[] = {
      {"https://host/repo", "oci://"},
      {"oci://host", "no REGISTRY/REPOSITORY"},
      {"oci:///repo", "no REGISTRY/REPOSITORY"},
      {"oci://user:pw@host/repo", "host[:port]"},
      {"oci://host/Repo", "lower-case"},
      {"oci://host/repo//x", "lower-case"},
      {"oci://host/-repo", "lower-case"},
      {"oci://host/repo:", "tag"},
      {"oci://host/repo:.hidden", "tag"},
      {"oci://host/repo@sha256:abc", "64 lower-case hex"},
      {"oci://host/repo@sha512:00", "64 lower-case hex"},
      {"oci://host/repo@sha256:ABCDEF0000000000000000000000000000000000000000000000000000000000", "64 lower-case hex"},
  };
  for (auto [ref, why] : bad) {
    CAPTURE(ref);
    auto r = oci::parse_reference(ref);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::invalid_argument);
    CHECK(r.error().message().find(why) != std::string::npos);
  }
}
