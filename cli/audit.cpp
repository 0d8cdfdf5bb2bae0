// `drun audit verify|show`, and the options that turn the audit log on for a command
// (--audit-log FILE [--audit-key KEY] [--audit-checkpoint-every N]).
#include "common.hpp"

#include <fmt/chrono.h>
#include <nlohmann/json.hpp>

#include <fstream>

namespace drun::cli {
namespace {

using ojson = nlohmann::ordered_json;

int audit_verify_command(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, {{"public-key", true}, {"json", false}});
  if (args.positional.size() != 1) throw usage_error{"usage: drun audit verify FILE --public-key PUB [--json]"};
  if (!args.has("public-key")) throw usage_error{"--public-key PUB is required (the audit key's public half)"};
  const std::string file = args.positional[0];
  auto key = drun::public_key::load(*args.get("public-key"));
  if (!key) return fail("audit verify", key.error());
  auto rep = drun::audit_verify(file, *key);
  if (!rep) return fail("audit verify", rep.error());
  if (args.has("json")) {
    ojson out = {{"file", file},           {"records", rep->records},   {"checkpoints", rep->checkpoints},
                 {"last_checkpoint", rep->last_checkpoint}, {"unsealed", rep->unsealed},
                 {"torn_lines", rep->torn_lines}, {"torn_tail", rep->torn_tail}};
    fmt::print("{}\n", out.dump(2));
  } else {
    fmt::print("{}: {} record{} chain intact, {} checkpoint{} verif{}", file, rep->records, rep->records == 1 ? "" : "s",
               rep->checkpoints, rep->checkpoints == 1 ? "" : "s", rep->checkpoints == 1 ? "ies" : "y");
    if (rep->last_checkpoint)
      fmt::print("; the last covers records 1 to {}{}\n", rep->last_checkpoint - 1,
                 rep->unsealed ? fmt::format(", {} after it are not covered by a checkpoint yet", rep->unsealed) : "");
    else
      fmt::print("; no checkpoint yet: the chain alone does not show a rewrite by someone who can write the file\n");
  }
  for (auto line : rep->torn_lines)
    diag(drun::log_level::warning, "audit verify",
         fmt::format("line {} is a torn record (a writer was killed while appending it){}", line,
                     rep->torn_tail && line == rep->torn_lines.back() ? "" : "; the chain continues after it"));
  return exit_ok;
}

// --since: an RFC 3339 UTC time (2026-12-07T10:00:00Z) or an age (90s, 30m, 12h, 7d), as the
// records' own time format, so that the two compare as strings.
std::string since_bound(const std::string& text) {
  if (!text.empty() && std::isdigit(static_cast<unsigned char>(text[0])) && text.find('-') == std::string::npos) {
    char unit = text.back();
    auto n = parse_size(text.substr(0, text.size() - 1), "--since");
    long long seconds = unit == 's' ? 1 : unit == 'm' ? 60 : unit == 'h' ? 3600 : unit == 'd' ? 86400 : 0;
    if (!seconds) throw usage_error{"--since takes a time (2026-12-07T10:00:00Z) or an age (90s, 30m, 12h, 7d)"};
    auto t = std::chrono::floor<std::chrono::seconds>(std::chrono::system_clock::now()) -
             std::chrono::seconds(static_cast<long long>(n) * seconds);
    return fmt::format("{:%Y-%m-%dT%H:%M:%S}.000Z", fmt::gmtime(std::chrono::system_clock::to_time_t(t)));
  }
  // YYYY-MM-DDTHH:MM:SS[.fff]Z
  if (text.size() < 20 || text.back() != 'Z' || text[10] != 'T')
    throw usage_error{"--since takes a time (2026-12-07T10:00:00Z) or an age (90s, 30m, 12h, 7d)"};
  std::string t = text.substr(0, text.size() - 1);
  if (t.size() == 19) t += ".000";
  return t + "Z";
}

int audit_show_command(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, {{"json", false}, {"artifact", true}, {"since", true}});
  if (args.positional.size() != 1)
    throw usage_error{"usage: drun audit show FILE [--json] [--artifact ID] [--since TIME|AGE]"};
  const std::string file = args.positional[0];
  std::optional<std::string> since;
  if (auto s = args.get("since")) since = since_bound(*s);
  auto artifact = args.get("artifact");
  std::ifstream in(file, std::ios::binary);
  if (!in) return fail("audit show", drun::error(drun::errc::not_found, "cannot read the audit log").with_path(file));
  diag(drun::log_level::warning, "audit show", "note: this shows what the log says; drun audit verify checks it");
  std::string line;
  std::size_t line_no = 0;
  // What a line says is printed for a person: control characters (a terminal's escapes) are not.
  auto printable = [](std::string s) {
    for (auto& ch : s)
      if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
    return s;
  };
  while (std::getline(in, line)) {
    ++line_no;
    auto j = ojson::parse(line, nullptr, false);
    bool record = !j.is_discarded() && j.is_object() && j.contains("data") && j["data"].is_object() &&
                  j.contains("seq") && j["seq"].is_number_unsigned() && j.contains("time") && j["time"].is_string() &&
                  j.contains("event") && j["event"].is_string() && (!j.contains("host") || j["host"].is_string()) &&
                  (!j.contains("pid") || j["pid"].is_number_integer()) &&
                  (!j.contains("trace_id") || j["trace_id"].is_string());
    if (!record) {
      diag(drun::log_level::warning, "audit show", fmt::format("line {} is not a record", line_no));
      continue;
    }
    const auto& data = j["data"];
    if (artifact) {
      auto a = data.find("artifact");
      if (a == data.end() || !a->is_string() || a->get<std::string>().rfind(*artifact, 0) != 0) continue;
    }
    std::string time = j["time"].get<std::string>();
    if (since && time < *since) continue;
    if (args.has("json")) {
      fmt::print("{}\n", line);
      continue;
    }
    std::string fields;
    for (const auto& [k, v] : data.items()) {
      if (v.is_string() && v.get<std::string>().empty()) continue;
      fields += fmt::format(" {}={}", k, v.is_string() ? v.get<std::string>() : v.dump());
    }
    if (j.contains("trace_id")) fields += " trace=" + j["trace_id"].get<std::string>();
    std::string who = j.contains("host") ? fmt::format("{}[{}]", j["host"].get<std::string>(),
                                                       j.contains("pid") ? j["pid"].get<long long>() : 0)
                                         : std::string();
    fmt::print("{}  {:>6}  {:<20} {}{}\n", printable(time), j["seq"].get<std::uint64_t>(),
               printable(j["event"].get<std::string>()), printable(who), printable(fields));
  }
  return exit_ok;
}

}  // namespace

int cmd_audit(int argc, char** argv) {
  std::string sub = argc > 2 ? argv[2] : "";
  if (sub == "verify") return audit_verify_command(argc, argv);
  if (sub == "show") return audit_show_command(argc, argv);
  throw usage_error{"usage: drun audit verify FILE --public-key PUB [--json] | drun audit show FILE [--json] "
                    "[--artifact ID] [--since TIME|AGE]"};
}

// --log-format, --log-level (every command) and --audit-log, --audit-key,
// --audit-checkpoint-every (the commands that make security decisions), taken out of argv.
global_options take_global_options(int& argc, char** argv) {
  global_options g;
  std::vector<char*> rest;
  std::map<std::string, std::string> seen;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      for (; i < argc; ++i) rest.push_back(argv[i]);
      break;
    }
    std::string name = a, value;
    bool inline_value = false;
    if (auto eq = a.find('='); eq != std::string::npos && a.rfind("--", 0) == 0) {
      name = a.substr(0, eq), value = a.substr(eq + 1), inline_value = true;
    }
    if (name != "--log-format" && name != "--log-level" && name != "--audit-log" && name != "--audit-key" &&
        name != "--audit-checkpoint-every") {
      rest.push_back(argv[i]);
      continue;
    }
    if (!inline_value) {
      if (i + 1 >= argc) throw usage_error{fmt::format("{} needs a value", name)};
      value = argv[++i];
    }
    if (!seen.emplace(name, value).second) throw usage_error{fmt::format("{} given twice", name)};
  }
  for (std::size_t i = 0; i < rest.size(); ++i) argv[i] = rest[i];
  argc = static_cast<int>(rest.size());

  if (auto f = seen.find("--log-format"); f != seen.end()) {
    if (f->second == "json") g.log.format = drun::log_format::json;
    else if (f->second != "text") throw usage_error{"--log-format is text or json"};
  }
  g.log.level = drun::log_level::warning;
  if (auto l = seen.find("--log-level"); l != seen.end()) {
    const std::string& v = l->second;
    if (v == "debug") g.log.level = drun::log_level::debug;
    else if (v == "info") g.log.level = drun::log_level::info;
    else if (v == "warning") g.log.level = drun::log_level::warning;
    else if (v == "error") g.log.level = drun::log_level::error;
    else throw usage_error{"--log-level is debug, info, warning or error"};
  }
  if (auto a = seen.find("--audit-log"); a != seen.end()) {
    if (a->second.empty()) throw usage_error{"--audit-log needs a file name"};
    g.audit.file = a->second;
  }
  if (auto k = seen.find("--audit-key"); k != seen.end()) g.audit_key = k->second;
  if (auto n = seen.find("--audit-checkpoint-every"); n != seen.end()) {
    auto v = parse_size(n->second, "--audit-checkpoint-every");
    if (v == 0 || v > 1000000) throw usage_error{"--audit-checkpoint-every must be between 1 and 1000000"};
    g.audit.checkpoint_every = static_cast<std::size_t>(v);
  }
  if ((g.audit_key || seen.count("--audit-checkpoint-every")) && g.audit.file.empty())
    throw usage_error{"--audit-key and --audit-checkpoint-every are about --audit-log FILE: give it too"};
  return g;
}

result<std::shared_ptr<drun::audit_log>> open_audit_log(global_options& g) {
  if (g.audit_key) {
    auto key = drun::private_key::load(*g.audit_key);
    if (!key) return std::move(key).error();
    g.audit.key = std::make_shared<const drun::private_key>(std::move(key).value());
  }
  return drun::audit_log::open(g.audit);
}

}  // namespace drun::cli
