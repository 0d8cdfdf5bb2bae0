// Strict, bounded JSON parsing for untrusted input (bundles, statements): size and depth limits,
// duplicate keys refused (two parsers reading one document differently is a classic bypass).
#pragma once

#include <drun/error.hpp>

#include <nlohmann/json.hpp>

#include <string_view>

namespace drun::detail {

using json = nlohmann::json;

inline constexpr std::size_t max_json_depth = 64;

// `what` names the document in errors ("bundle", "statement"). A document of more than max_values
// values (objects, arrays, scalars) is refused while it is parsed, before the tree grows: a DOM
// costs tens of bytes per value, so a small limit keeps memory near the text's own size for input
// nobody has authenticated yet. Errors: malformed_bundle.
result<json> parse_json_strict(std::string_view text, std::string_view what,
                               std::size_t max_values = std::size_t(-1));

// Typed field access with errors that name the field path. All return malformed_bundle.
result<const json*> require_field(const json& obj, std::string_view key, json::value_t type,
                                  std::string_view where);
const json* optional_field(const json& obj, std::string_view key);

}  // namespace drun::detail
