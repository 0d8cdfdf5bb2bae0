// Strict JSON parsing on top of nlohmann::json's SAX-style callback.
#include "detail/json.hpp"

#include <fmt/format.h>

#include <set>
#include <string>
#include <vector>

namespace drun::detail {

namespace {

// Thrown from the callback to end the parse at the first problem. Returning false only discards
// the value: nlohmann's parser then reads on to the end, and for every discarded child of a kept
// container it scans that container's kept children (a 64 MiB bundle of "[{},{},...]" past the
// value limit took 68 s of CPU that way). Stopping at once makes a refusal cost what it read.
struct stop_parsing {};

}  // namespace

result<json> parse_json_strict(std::string_view text, std::string_view what, std::size_t max_values) {
  std::vector<std::set<std::string>> keys;  // keys seen in each open object
  std::string problem;
  std::size_t values = 0;
  auto stop = [&](std::string why) -> bool {
    problem = std::move(why);
    throw stop_parsing{};
  };
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
    if (static_cast<std::size_t>(depth) > max_json_depth) return stop(fmt::format("nested deeper than {} levels", max_json_depth));
    if ((event == json::parse_event_t::value || event == json::parse_event_t::object_start ||
         event == json::parse_event_t::array_start) &&
        ++values > max_values)
      return stop(fmt::format("more than {} values", max_values));
    switch (event) {
      case json::parse_event_t::object_start: keys.emplace_back(); break;
      case json::parse_event_t::object_end: if (!keys.empty()) keys.pop_back(); break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          return stop(fmt::format("duplicate key \"{}\"", parsed.get<std::string>()));
        break;
      default: break;
    }
    return true;
  };
  json doc;
  try {
    doc = json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
  } catch (const stop_parsing&) {
    // problem says why
  } catch (const json::exception& e) {
    if (problem.empty()) problem = e.what();
  }
  if (!problem.empty() || doc.is_discarded())
    return error(errc::malformed_bundle,
                 fmt::format("{} is not valid JSON: {}", what, problem.empty() ? "rejected" : problem));
  return doc;
}

result<const json*> require_field(const json& obj, std::string_view key, json::value_t type,
                                  std::string_view where) {
  auto it = obj.find(key);
  if (it == obj.end())
    return error(errc::malformed_bundle, fmt::format("{} has no \"{}\"", where, key));
  bool ok = it->type() == type ||
            (type == json::value_t::number_unsigned && it->type() == json::value_t::number_integer &&
             it->get<std::int64_t>() >= 0);
  if (!ok)
    return error(errc::malformed_bundle,
                 fmt::format("{}.{} has the wrong type ({} expected, {} found)", where, key,
                             json(type).type_name(), it->type_name()));
  return &*it;
}

const json* optional_field(const json& obj, std::string_view key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

}  // namespace drun::detail
