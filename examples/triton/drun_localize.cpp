// drun.json parsing and localize(): verify, fetch into the encrypted store, materialize.
#include "drun_localize.hpp"

#include <drun/fetch.hpp>
#include <drun/keys.hpp>
#include <drun/node_key.hpp>
#include <drun/peer.hpp>
#include <drun/source.hpp>
#include <drun/store.hpp>
#include <drun/trust.hpp>
#include <drun/verify.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iterator>
#include <memory>
#include <utility>

namespace drun_localize {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// drun.json is a few hundred bytes; anything near this is not a configuration.
constexpr std::uintmax_t max_config_size = std::uintmax_t{1} << 20;

constexpr std::array<std::string_view, 12> known_fields = {"signature",  "public_key", "ca_bundle",  "origins",
                                                           "peers",      "ca_cert",    "tls_cert",   "tls_key",
                                                           "token_file", "store",      "key_source", "connections"};

drun::error config_error(const std::string& origin, std::string detail) {
  return drun::error(drun::errc::invalid_argument, std::move(detail)).with_path(origin).with_operation("config");
}

// Names the step that failed, unless the library already did.
drun::error at_step(drun::error e, const char* step, const std::string& path = {}) {
  if (e.operation().empty()) e.with_operation(step);
  if (e.path().empty() && !path.empty()) e.with_path(path);
  return e;
}

std::string field_name(std::string_view field) { return "field \"" + std::string(field) + "\""; }

bool is_url(std::string_view s) { return s.starts_with("http://") || s.starts_with("https://"); }

fs::path resolve(const fs::path& base, const std::string& p) {
  fs::path path(p);
  return (path.is_absolute() ? path : base / path).lexically_normal();
}

// The typed views of drun.json's fields: each returns nullopt when the field is absent.
class fields {
 public:
  fields(const json& doc, const std::string& origin) : doc_(doc), origin_(origin) {}

  drun::result<std::optional<std::string>> string(std::string_view name) const {
    auto it = doc_.find(std::string(name));
    if (it == doc_.end()) return std::optional<std::string>{};
    if (auto e = check_string(*it, field_name(name))) return std::move(*e);
    return std::optional<std::string>(it->get<std::string>());
  }

  drun::result<std::optional<std::vector<std::string>>> string_list(std::string_view name) const {
    auto it = doc_.find(std::string(name));
    if (it == doc_.end()) return std::optional<std::vector<std::string>>{};
    if (!it->is_array())
      return config_error(origin_, field_name(name) + " must be a list of strings, not " + type_of(*it));
    std::vector<std::string> out;
    for (std::size_t i = 0; i < it->size(); ++i) {
      if (auto e = check_string((*it)[i], field_name(name) + "[" + std::to_string(i) + "]")) return std::move(*e);
      out.push_back((*it)[i].get<std::string>());
    }
    return std::optional<std::vector<std::string>>(std::move(out));
  }

  drun::result<std::optional<unsigned>> count(std::string_view name, unsigned low, unsigned high) const {
    auto it = doc_.find(std::string(name));
    if (it == doc_.end()) return std::optional<unsigned>{};
    auto range = std::to_string(low) + " to " + std::to_string(high);
    if (!it->is_number_integer())
      return config_error(origin_,
                          field_name(name) + " must be a whole number from " + range + ", not " + type_of(*it));
    if (it->is_number_unsigned()) {
      auto v = it->get<std::uint64_t>();
      if (v >= low && v <= high) return std::optional<unsigned>(static_cast<unsigned>(v));
    }
    return config_error(origin_, field_name(name) + " must be from " + range + ", not " + it->dump());
  }

 private:
  static std::string type_of(const json& v) {
    if (v.is_number()) return "a number";
    if (v.is_array()) return "a list";
    if (v.is_object()) return "an object";
    if (v.is_boolean()) return "a boolean";
    if (v.is_null()) return "null";
    return "a string";
  }

  std::optional<drun::error> check_string(const json& v, const std::string& what) const {
    if (!v.is_string()) return config_error(origin_, what + " must be a string, not " + type_of(v));
    const auto& s = v.get_ref<const std::string&>();
    if (s.empty()) return config_error(origin_, what + " must not be empty");
    // A NUL would silently cut the path or URL short in every C API it reaches.
    if (s.find('\0') != std::string::npos) return config_error(origin_, what + " must not contain a NUL character");
    return std::nullopt;
  }

  const json& doc_;
  const std::string& origin_;
};

// Parses JSON text, refusing a key repeated within an object: parsers disagree on which copy
// wins, so a repeated key is ambiguous rather than merely redundant.
drun::result<json> parse_json(std::string_view text, const std::string& origin) {
  std::vector<std::vector<std::string>> open_objects;
  std::optional<std::string> repeated;
  json::parser_callback_t callback = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == json::parse_event_t::key && !open_objects.empty()) {
      auto& keys = open_objects.back();
      const auto& key = parsed.get_ref<const std::string&>();
      if (std::find(keys.begin(), keys.end(), key) != keys.end()) {
        if (!repeated) repeated = key;
      } else {
        keys.push_back(key);
      }
    }
    return true;
  };
  try {
    json doc = json::parse(text.begin(), text.end(), callback);
    if (repeated) return config_error(origin, field_name(*repeated) + " appears more than once");
    return doc;
  } catch (const json::exception& e) {
    // "[json.exception.parse_error.101] parse error at line 2, column 3: ..." without the tag.
    std::string what = e.what();
    if (auto end = what.find("] "); what.starts_with("[json.exception") && end != std::string::npos)
      what = what.substr(end + 2);
    return config_error(origin, "not valid JSON: " + what);
  }
}

// A secret file (the peer token): readable by its owner only, like drun's CLI demands.
drun::result<std::string> read_token(const fs::path& file) {
  std::error_code ec;
  auto st = fs::status(file, ec);
  if (ec)
    return drun::error(drun::errc::key_error, "cannot read the token file")
        .with_path(file.string())
        .with_errno(ec.value());
  auto shared = st.permissions() & (fs::perms::group_all | fs::perms::others_all);
  if (shared != fs::perms::none)
    return drun::error(drun::errc::key_error,
                       "the token file is readable by others: it must be readable by its owner only")
        .with_path(file.string());
  auto text = drun::read_bundle_file(file);
  if (!text) return std::move(text).error().with_code(drun::errc::key_error);
  std::string token = text->substr(0, text->find_first_of("\r\n"));
  std::fill(text->begin(), text->end(), '\0');
  if (token.empty()) return drun::error(drun::errc::key_error, "the token file is empty").with_path(file.string());
  return token;
}

drun::result<void> check_destination(const fs::path& destination) {
  std::error_code ec;
  auto st = fs::symlink_status(destination, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    return drun::error(drun::errc::io_error, "cannot inspect the destination")
        .with_path(destination.string())
        .with_errno(ec.value());
  if (!fs::exists(st)) return {};
  if (!fs::is_directory(st))
    return drun::error(drun::errc::invalid_argument, "the destination exists and is not a directory")
        .with_path(destination.string());
  if (!fs::is_empty(destination, ec) || ec)
    return drun::error(drun::errc::invalid_argument, "the destination is not empty").with_path(destination.string());
  return {};
}

drun::result<std::filesystem::path> localize_checked(const config& cfg, const fs::path& destination) {
  if (auto ok = check_destination(destination); !ok) return at_step(std::move(ok).error(), "materialize");

  // 1. Trust, then the bundle: nothing is downloaded for a model whose signature does not check out.
  drun::result<drun::trust_store> trust = drun::error(drun::errc::invalid_argument, "no trust configured");
  if (!cfg.public_key.empty()) {
    auto key = drun::public_key::load(cfg.public_key);
    if (!key) return at_step(std::move(key).error(), "trust", cfg.public_key.string());
    trust = drun::trust_store::from_public_key(std::move(key).value());
  } else {
    trust = drun::trust_store::from_ca_bundle(cfg.ca_bundle);
  }
  if (!trust) return at_step(std::move(trust).error(), "trust", cfg.ca_bundle.string());

  drun::source_options so;
  so.ca_file = cfg.ca_cert.string();
  auto bundle = is_url(cfg.signature) ? drun::fetch_document(cfg.signature, drun::max_bundle_size, so)
                                      : drun::read_bundle_file(cfg.signature);
  if (!bundle) return at_step(std::move(bundle).error(), "signature", cfg.signature);
  auto manifest = drun::verify_bundle(*bundle, *trust);
  if (!manifest) return at_step(std::move(manifest).error(), "verify", cfg.signature);

  // 2. Sources: peers first (the fetch prefers them), then the origins.
  std::vector<std::unique_ptr<drun::source>> sources;
  if (!cfg.peers.empty()) {
    drun::peer_client_options po;
    po.ca_file = cfg.ca_cert.string();
    po.cert_file = cfg.tls_cert.string();
    po.key_file = cfg.tls_key.string();
    if (!cfg.token_file.empty()) {
      auto token = read_token(cfg.token_file);
      if (!token) return at_step(std::move(token).error(), "sources");
      po.token = std::move(token).value();
    }
    for (const auto& peer : cfg.peers) {
      auto src = drun::make_peer_source(peer, po);
      if (!src) {
        std::fill(po.token.begin(), po.token.end(), '\0');
        return at_step(std::move(src).error(), "sources", peer);
      }
      sources.push_back(std::move(src).value());
    }
    std::fill(po.token.begin(), po.token.end(), '\0');  // the sources keep their own copies
  }
  for (const auto& origin : cfg.origins) {
    auto src = drun::make_source(origin, so);
    if (!src) return at_step(std::move(src).error(), "sources", origin);
    sources.push_back(std::move(src).value());
  }

  // 3. Every missing piece into the encrypted store, each checked before it is sealed.
  auto key = drun::node_key::from_source(cfg.key_source);
  if (!key) return at_step(std::move(key).error(), "store");
  auto st = drun::store::open(cfg.store, std::move(key).value());
  if (!st) return at_step(std::move(st).error(), "store", cfg.store.string());
  drun::fetch_options fo;
  if (cfg.connections) fo.connections = *cfg.connections;
  auto report = drun::fetch(*st, *manifest, *bundle, sources, fo);
  if (!report) return at_step(std::move(report).error(), "fetch");

  // 4. The verified plaintext, for the server to read.
  if (auto ok = st->materialize(manifest->artifact_id(), destination); !ok)
    return at_step(std::move(ok).error(), "materialize", destination.string());
  return destination;
}

}  // namespace

drun::result<config> config::parse(std::string_view json_text, const std::filesystem::path& base_dir,
                                   const std::string& origin) {
  auto doc = parse_json(json_text, origin);
  if (!doc) return std::move(doc).error();
  if (!doc->is_object()) return config_error(origin, "drun.json must hold a JSON object");
  for (const auto& item : doc->items()) {
    if (std::find(known_fields.begin(), known_fields.end(), item.key()) == known_fields.end()) {
      std::string known;
      for (auto f : known_fields) known += (known.empty() ? "" : ", ") + std::string(f);
      return config_error(origin, "unknown " + field_name(item.key()) + " (the fields are " + known + ")");
    }
  }

  std::error_code ec;
  fs::path base = fs::absolute(base_dir, ec);
  if (ec)
    return drun::error(drun::errc::io_error, "cannot resolve the repository directory").with_path(base_dir.string());

  fields f(*doc, origin);
  config c;
  auto path_field = [&](std::string_view name, fs::path& out) -> std::optional<drun::error> {
    auto v = f.string(name);
    if (!v) return std::move(v).error();
    if (*v) out = resolve(base, **v);
    return std::nullopt;
  };
  const std::pair<std::string_view, fs::path*> path_fields[] = {
      {"public_key", &c.public_key}, {"ca_bundle", &c.ca_bundle},   {"ca_cert", &c.ca_cert}, {"tls_cert", &c.tls_cert},
      {"tls_key", &c.tls_key},       {"token_file", &c.token_file}, {"store", &c.store}};
  for (const auto& [name, out] : path_fields)
    if (auto e = path_field(name, *out)) return std::move(*e);

  auto sig = f.string("signature");
  if (!sig) return std::move(sig).error();
  if (!*sig) return config_error(origin, "missing " + field_name("signature") + " (the bundle's URL or path)");
  if (is_url(**sig)) {
    c.signature = **sig;
  } else if ((*sig)->find("://") != std::string::npos) {
    return config_error(origin,
                        field_name("signature") + " must be an http:// or https:// URL or a path, not " + **sig);
  } else {
    c.signature = resolve(base, **sig).string();
  }

  auto origin_list = f.string_list("origins");
  if (!origin_list) return std::move(origin_list).error();
  if (*origin_list) c.origins = std::move(**origin_list);
  auto peer_list = f.string_list("peers");
  if (!peer_list) return std::move(peer_list).error();
  if (*peer_list) c.peers = std::move(**peer_list);

  auto ks = f.string("key_source");
  if (!ks) return std::move(ks).error();
  if (*ks) {
    std::string_view spec = **ks;
    if (spec.starts_with("file:"))
      c.key_source = "file:" + resolve(base, std::string(spec.substr(5))).string();
    else if (spec.starts_with("env:") || spec.starts_with("cmd:"))
      c.key_source = spec;
    else
      return config_error(origin, field_name("key_source") + " must be file:PATH, env:NAME or cmd:COMMAND");
  }

  auto conns = f.count("connections", 1, 256);
  if (!conns) return std::move(conns).error();
  c.connections = *conns;

  // What must be there, and what goes together.
  if (c.public_key.empty() == c.ca_bundle.empty())
    return config_error(origin, "give exactly one of " + field_name("public_key") + " and " + field_name("ca_bundle"));
  if (c.origins.empty() && c.peers.empty())
    return config_error(origin, "no source: give a non-empty " + field_name("origins") + " or " + field_name("peers"));
  if (c.store.empty())
    return config_error(origin, "missing " + field_name("store") + " (the encrypted store directory)");
  if (c.key_source.empty())
    return config_error(origin, "missing " + field_name("key_source") + " (the store's node key)");
  if (c.tls_cert.empty() != c.tls_key.empty())
    return config_error(origin, field_name("tls_cert") + " and " + field_name("tls_key") + " go together");
  if (!c.peers.empty() && c.ca_cert.empty())
    return config_error(
        origin, field_name("peers") + " needs " + field_name("ca_cert") + " (the roots of the peers' certificates)");
  if (!c.peers.empty() && c.tls_cert.empty() && c.token_file.empty())
    return config_error(origin, field_name("peers") + " needs " + field_name("tls_cert") + " and " +
                                    field_name("tls_key") + ", or " + field_name("token_file"));
  return c;
}

drun::result<config> config::load(const std::filesystem::path& repository_dir) {
  fs::path file = repository_dir / config_file_name;
  std::error_code ec;
  auto st = fs::status(file, ec);
  if (!fs::exists(st))
    return drun::error(drun::errc::not_found, "the model's repository directory has no drun.json")
        .with_path(file.string())
        .with_operation("config");
  if (!fs::is_regular_file(st))
    return drun::error(drun::errc::invalid_argument, "not a regular file")
        .with_path(file.string())
        .with_operation("config");
  auto size = fs::file_size(file, ec);
  if (ec)
    return drun::error(drun::errc::io_error, "cannot read")
        .with_path(file.string())
        .with_errno(ec.value())
        .with_operation("config");
  if (size > max_config_size)
    return drun::error(drun::errc::invalid_argument, "larger than 1 MiB: not a drun.json")
        .with_path(file.string())
        .with_operation("config");
  std::ifstream in(file, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof())
    return drun::error(drun::errc::io_error, "cannot read").with_path(file.string()).with_operation("config");
  return parse(text, repository_dir, file.string());
}

drun::result<std::filesystem::path> localize(const config& cfg, const std::filesystem::path& destination) {
  try {
    return localize_checked(cfg, destination);
  } catch (const std::exception& e) {  // allocation or filesystem failures: still an error, not a crash
    return drun::error(drun::errc::io_error, e.what()).with_path(destination.string()).with_operation("localize");
  }
}

drun::result<std::filesystem::path> localize(const std::filesystem::path& repository_dir,
                                             const std::filesystem::path& destination) {
  try {
    auto cfg = config::load(repository_dir);
    if (!cfg) return std::move(cfg).error();
    return localize(*cfg, destination);
  } catch (const std::exception& e) {
    return drun::error(drun::errc::io_error, e.what()).with_path(repository_dir.string()).with_operation("config");
  }
}

}  // namespace drun_localize
