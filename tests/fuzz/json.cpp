// The strict JSON parser every bundle, statement, policy, key set and trusted root goes through.
// Contract: what it accepts is plain JSON nlohmann reads the same way (no duplicate keys, depth
// bounded), and printing the tree and parsing it again gives the same tree; the value bound holds.
#include "detail/json.hpp"
#include "fuzz.hpp"

namespace {

std::size_t depth_of(const drun::detail::json& j) {
  std::size_t d = 0;
  if (j.is_structured())
    for (const auto& v : j) d = std::max(d, depth_of(v));
  return j.is_structured() ? d + 1 : d;
}

std::size_t values_of(const drun::detail::json& j) {
  std::size_t n = 1;
  if (j.is_structured())
    for (const auto& v : j) n += values_of(v);
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using drun::detail::parse_json_strict;
  auto input = fuzz::text(data, size);
  auto doc = parse_json_strict(input, "input");
  constexpr std::size_t bound = 64;
  auto bounded = parse_json_strict(input, "input", bound);
  if (!doc) {
    FUZZ_REQUIRE(doc.error().code() == drun::errc::malformed_bundle);
    FUZZ_REQUIRE(!bounded);
    return 0;
  }
  FUZZ_REQUIRE(depth_of(*doc) <= drun::detail::max_json_depth + 1);
  FUZZ_REQUIRE(bounded.has_value() == (values_of(*doc) <= bound));
  if (bounded) FUZZ_REQUIRE(*bounded == *doc);
  // Whatever the strict parser accepts, the permissive one reads identically.
  auto loose = drun::detail::json::parse(input.begin(), input.end(), nullptr, false);
  FUZZ_REQUIRE(!loose.is_discarded() && loose == *doc);
  auto again = parse_json_strict(doc->dump(), "printed");
  FUZZ_REQUIRE(again && *again == *doc);
  return 0;
}
