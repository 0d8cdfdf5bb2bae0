// The OMS in-toto statement parser (what a signature covers) and the piece plan drawn from it.
// The root digest that a signer computes is filled in by the harness before parsing, or the
// fuzzer would spend its time looking for SHA-256 collisions. Contract: an accepted statement
// prints (statement_json) to a statement that parses to the same manifest and prints the same
// again; every file's shards tile it as piece_ranges() would cut it.
#include "detail/encoding.hpp"
#include "detail/json.hpp"
#include "fuzz.hpp"
#include "manifest_data.hpp"

#include <drun/hash.hpp>
#include <drun/piece.hpp>

#include <map>

namespace {

using drun::detail::json;

// Sets subject[0].digest.sha256 to the digest of the listed resources' digests, when the
// document is shaped enough for that to mean anything.
std::string with_root_digest(std::string_view input) {
  auto doc = json::parse(input.begin(), input.end(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return std::string(input);
  auto subjects = doc.find("subject");
  auto predicate = doc.find("predicate");
  if (subjects == doc.end() || !subjects->is_array() || subjects->size() != 1 || !(*subjects)[0].is_object() ||
      predicate == doc.end() || !predicate->is_object() || !predicate->contains("resources") ||
      !(*predicate)["resources"].is_array())
    return std::string(input);
  drun::hasher h(drun::hash_algorithm::sha256);
  for (const auto& r : (*predicate)["resources"]) {
    if (!r.is_object() || !r.contains("digest") || !r["digest"].is_string()) return std::string(input);
    auto raw = drun::detail::hex_decode(r["digest"].get<std::string>());
    if (!raw) return std::string(input);
    h.update(*raw);
  }
  (*subjects)[0]["digest"] = {{"sha256", h.finish().hex()}};
  return doc.dump();
}

bool same(const drun::detail::manifest_data& a, const drun::detail::manifest_data& b) {
  if (a.subject_name != b.subject_name || a.method != b.method || a.hash != b.hash || a.shard_size != b.shard_size ||
      a.allow_symlinks != b.allow_symlinks || a.ignore_paths != b.ignore_paths || a.resources.size() != b.resources.size())
    return false;
  for (std::size_t i = 0; i < a.resources.size(); ++i) {
    const auto &x = a.resources[i], &y = b.resources[i];
    if (x.name != y.name || x.file != y.file || x.range != y.range || !(x.value == y.value)) return false;
  }
  return true;
}

void check(const drun::detail::manifest_data& m) {
  auto printed = drun::detail::statement_json(m);
  auto again = drun::detail::parse_statement(printed);
  FUZZ_REQUIRE(again.has_value());
  FUZZ_REQUIRE(same(m, *again));
  FUZZ_REQUIRE(drun::detail::statement_json(*again) == printed);
  if (m.method != drun::serialization_method::shards) return;
  std::map<std::string, std::vector<drun::byte_range>> by_file;
  for (const auto& r : m.resources) {
    FUZZ_REQUIRE(r.range.has_value());
    by_file[r.file].push_back(*r.range);
  }
  for (auto& [file, ranges] : by_file) {
    std::sort(ranges.begin(), ranges.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
    FUZZ_REQUIRE(drun::piece_ranges(ranges.back().end, m.shard_size) == ranges);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto input = fuzz::text(data, size);
  for (const auto& text : {std::string(input), with_root_digest(input)}) {
    auto m = drun::detail::parse_statement(text);
    if (m) check(*m);
    else FUZZ_REQUIRE(m.error().code() == drun::errc::malformed_bundle || m.error().code() == drun::errc::unsupported);
  }
  return 0;
}
