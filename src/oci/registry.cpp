// OCI registries as origins: references, manifests, the registry's authentication, the origin
// and the bundle lookups (see oci.hpp).
#include "oci/registry.hpp"

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/json.hpp"

#include <drun/hash.hpp>

#include <curl/curl.h>
#include <fmt/format.h>
#include <sodium.h>

#include <cctype>
#include <map>
#include <mutex>
#include <regex>

namespace drun::oci {
namespace {

using detail::json;

bool is_digest(std::string_view d) {
  if (d.rfind("sha256:", 0) != 0 || d.size() != 7 + 64) return false;
  for (char ch : d.substr(7))
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
  return true;
}

std::string sha256_of(std::string_view bytes) { return "sha256:" + hash(hash_algorithm::sha256, as_bytes(bytes)).hex(); }

error bad_manifest(const std::string& where, std::string why) {
  return error(errc::malformed_bundle, fmt::format("{}: the registry's manifest {}", where, why));
}

// One auth-param list of a WWW-Authenticate challenge: SCHEME k="v", k=v, ... (RFC 9110 11.6.1).
struct challenge {
  std::string scheme;  // lower-case
  std::map<std::string, std::string> params;
};
challenge parse_challenge(std::string_view v) {
  challenge c;
  std::size_t i = 0;
  while (i < v.size() && v[i] != ' ') c.scheme += static_cast<char>(std::tolower(static_cast<unsigned char>(v[i++])));
  while (i < v.size()) {
    while (i < v.size() && (v[i] == ' ' || v[i] == ',')) ++i;
    std::string key;
    while (i < v.size() && v[i] != '=' && v[i] != ',' && v[i] != ' ')
      key += static_cast<char>(std::tolower(static_cast<unsigned char>(v[i++])));
    if (i >= v.size() || v[i] != '=') continue;
    ++i;
    std::string value;
    if (i < v.size() && v[i] == '"') {
      for (++i; i < v.size() && v[i] != '"'; ++i) {
        if (v[i] == '\\' && i + 1 < v.size()) ++i;
        value += v[i];
      }
      ++i;
    } else {
      while (i < v.size() && v[i] != ',') value += v[i++];
    }
    if (!key.empty()) c.params.emplace(std::move(key), std::move(value));
  }
  return c;
}

std::string query_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    auto u = static_cast<unsigned char>(ch);
    if (std::isalnum(u) || ch == '-' || ch == '.' || ch == '_' || ch == '~') out += ch;
    else out += fmt::format("%{:02X}", u);
  }
  return out;
}

// The "auths" entry for host in a Docker config.json / containers auth.json: keys are
// "host[:port]", optionally with a scheme and a path ("https://index.docker.io/v1/").
result<std::string> credentials_from_file(const std::string& path, const std::string& host) {
  auto text = detail::read_owner_only(path, "registry auth file", 1 << 20);
  if (!text) return std::move(text).error();
  auto doc = detail::parse_json_strict(*text, "registry auth file");
  sodium_memzero(text->data(), text->size());
  if (!doc) return std::move(doc).error().with_code(errc::key_error).with_path(path);
  const json* auths = detail::optional_field(*doc, "auths");
  if (!auths || !auths->is_object()) return std::string();
  for (const auto& [key, entry] : auths->items()) {
    std::string k = key;
    if (auto s = k.find("://"); s != std::string::npos) k = k.substr(s + 3);
    k = k.substr(0, k.find('/'));
    if (k != host || !entry.is_object()) continue;
    if (const json* a = detail::optional_field(entry, "auth"); a && a->is_string()) {
      auto decoded = detail::base64_decode(a->get<std::string>());
      if (!decoded || decoded->find(':') == std::string::npos)
        return error(errc::key_error, fmt::format("the auth entry for {} is not base64 of user:password", host))
            .with_path(path);
      return *decoded;
    }
    const json* u = detail::optional_field(entry, "username");
    const json* p = detail::optional_field(entry, "password");
    if (u && p && u->is_string() && p->is_string()) return u->get<std::string>() + ":" + p->get<std::string>();
  }
  return std::string();
}

}  // namespace

result<reference> parse_reference(std::string_view url) {
  auto bad = [&](std::string why) {
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an OCI reference: {}", url, why));
  };
  if (url.rfind("oci://", 0) != 0) return bad("it does not start with oci://");
  auto rest = url.substr(6);
  auto slash = rest.find('/');
  if (slash == std::string_view::npos || slash == 0) return bad("no REGISTRY/REPOSITORY");
  reference r;
  r.registry = std::string(rest.substr(0, slash));
  static const std::regex host(R"(^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$)");
  if (!std::regex_match(r.registry, host)) return bad("the registry is not host[:port]");
  std::string name(rest.substr(slash + 1));
  if (auto at = name.find('@'); at != std::string::npos) {
    r.digest = name.substr(at + 1);
    name.resize(at);
    if (!is_digest(r.digest)) return bad("the digest is not sha256: and 64 lower-case hex digits");
  } else if (auto colon = name.rfind(':'); colon != std::string::npos && name.find('/', colon) == std::string::npos) {
    r.tag = name.substr(colon + 1);
    name.resize(colon);
    static const std::regex tag(R"(^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$)");
    if (!std::regex_match(r.tag, tag)) return bad("the tag is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
  } else {
    r.tag = "latest";
  }
  static const std::regex repo(R"(^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$)");
  if (name.size() > 255 || !std::regex_match(name, repo))
    return bad("the repository is not lower-case path components ([a-z0-9] separated by . _ __ or -)");
  r.repository = std::move(name);
  return r;
}

const layer* image::titled(std::string_view name) const {
  for (const auto& l : layers)
    if (l.title == name) return &l;
  return nullptr;
}

registry::registry(reference ref, const source_options& options, std::string actions)
    : ref_(std::move(ref)), options_(options), actions_(std::move(actions)), client_(ref_.base(), options) {
  client_.on_unauthorized = [this](const http::response& r) { return authenticate(r); };
}

registry::~registry() {
  for (auto* s : {&options_.registry_credentials, &options_.proxy_credentials}) sodium_memzero(s->data(), s->size());
  for (auto& h : options_.headers) sodium_memzero(h.data(), h.size());
}

result<std::string> registry::credentials() {
  if (!options_.registry_credentials.empty()) return options_.registry_credentials;
  if (!options_.registry_auth_file.empty()) return credentials_from_file(options_.registry_auth_file, ref_.registry);
  return std::string();
}

// A 401 from the registry: Basic with the credentials given, or a bearer token from the service
// the challenge names, for this repository and these actions only. The credentials go to that
// service only over https (Docker's clients send them there too: the registry delegated its
// authentication to it).
result<bool> registry::authenticate(const http::response& answer) {
  const std::string* header = answer.header("www-authenticate");
  if (!header)
    return error(errc::permission_denied, fmt::format("{} answered 401 without a WWW-Authenticate challenge", ref_.registry));
  auto c = parse_challenge(*header);
  auto creds = credentials();
  if (!creds) return std::move(creds).error();
  struct wipe {
    std::string& s;
    ~wipe() { sodium_memzero(s.data(), s.size()); }
  } wiped{*creds};
  if (c.scheme == "basic") {
    if (creds->empty())
      return error(errc::permission_denied, fmt::format("{} asks for credentials (Basic) and none were given "
                                                        "(--registry-auth, or DRUN_REGISTRY_CREDENTIALS)",
                                                        ref_.registry));
    client_.set_authorization("Authorization: Basic " + detail::base64_encode(as_bytes(*creds)));
    return true;
  }
  if (c.scheme != "bearer")
    return error(errc::permission_denied, fmt::format("{} asks for \"{}\" authentication, which drun does not speak",
                                                      ref_.registry, c.scheme));
  const std::string realm = c.params.count("realm") ? c.params["realm"] : "";
  if (realm.rfind("https://", 0) != 0)
    return error(errc::permission_denied,
                 fmt::format("{} names a token service that is not an https URL (\"{}\"): no credentials or token "
                             "requests go there",
                             ref_.registry, realm.substr(0, 200)));
  std::string scope = "repository:" + ref_.repository + ":" + actions_;
  std::string url = realm + (realm.find('?') == std::string::npos ? "?" : "&") + "scope=" + query_escape(scope);
  if (c.params.count("service")) url += "&service=" + query_escape(c.params["service"]);
  source_options to_realm = options_;
  to_realm.headers.clear();
  to_realm.credentials_origin.clear();
  if (!creds->empty()) to_realm.headers.push_back("Authorization: Basic " + detail::base64_encode(as_bytes(*creds)));
  http::client realm_client(url, std::move(to_realm));
  auto body = http::get_document(realm_client, url, 1 << 20, "token answer");
  if (!body) {
    // The service answered, and refused: a denial. It could not be reached: a network failure.
    errc code = body.error().code() == errc::io_error ? errc::io_error : errc::permission_denied;
    return std::move(body).error().with_code(code).with_operation("registry token");
  }
  auto doc = detail::parse_json_strict(*body, "token answer", 1000);
  sodium_memzero(body->data(), body->size());
  if (!doc) return std::move(doc).error().with_code(errc::permission_denied).with_operation("registry token");
  std::string token;
  for (const char* key : {"token", "access_token"})
    if (const json* t = detail::optional_field(*doc, key); t && t->is_string() && token.empty()) token = t->get<std::string>();
  for (auto& v : doc->items())
    if (v.value().is_string()) {
      auto& s = v.value().get_ref<std::string&>();
      sodium_memzero(s.data(), s.size());
    }
  if (token.empty() || token.find_first_of("\r\n") != std::string::npos)
    return error(errc::permission_denied, fmt::format("the token service of {} answered without a usable token", ref_.registry));
  client_.set_authorization("Authorization: Bearer " + token);
  sodium_memzero(token.data(), token.size());
  return true;
}

result<image> registry::resolve(const std::string& ref) {
  const std::string where = ref_.registry + "/" + ref_.repository + (is_digest(ref) ? "@" : ":") + ref;
  image out;
  std::string want = is_digest(ref) ? ref : std::string();
  std::string url = ref_.base() + "/manifests/" + ref;
  for (int depth = 0; depth < 2; ++depth) {
    http::response answer;
    auto body = http::get_document(
        client_, url, max_manifest_size, "manifest",
        {fmt::format("Accept: {}, {}, {}, {}", manifest_type, index_type, docker_manifest_type, docker_list_type)}, &answer);
    if (!body) return std::move(body).error().with_path(where);
    auto digest = sha256_of(*body);
    if (!want.empty() && digest != want)
      return error(errc::digest_mismatch, fmt::format("{}: the registry's manifest hashes to {}, not {}", where, digest, want));
    if (const std::string* said = answer.header("docker-content-digest");
        said && said->rfind("sha256:", 0) == 0 && *said != digest)
      return error(errc::digest_mismatch,
                   fmt::format("{}: the registry's manifest hashes to {}, not to its Docker-Content-Digest {}", where,
                               digest, *said));
    auto doc = detail::parse_json_strict(*body, "manifest", 1 << 16);
    if (!doc) return std::move(doc).error().with_path(where);
    if (!doc->is_object()) return bad_manifest(where, "is not a JSON object");
    std::string type;
    if (const json* t = detail::optional_field(*doc, "mediaType"); t && t->is_string()) type = t->get<std::string>();
    else if (const std::string* ct = answer.header("content-type")) type = ct->substr(0, ct->find(';'));
    if (type == index_type || type == docker_list_type) {
      const json* list = detail::optional_field(*doc, "manifests");
      if (!list || !list->is_array()) return bad_manifest(where, "is an index without a manifests list");
      want.clear();
      for (const auto& m : *list) {
        const json* mt = m.is_object() ? detail::optional_field(m, "mediaType") : nullptr;
        const json* d = m.is_object() ? detail::optional_field(m, "digest") : nullptr;
        if (mt && d && mt->is_string() && d->is_string() && is_digest(d->get<std::string>()) &&
            (mt->get<std::string>() == manifest_type || mt->get<std::string>() == docker_manifest_type)) {
          want = d->get<std::string>();
          break;
        }
      }
      if (want.empty()) return bad_manifest(where, "is an index that lists no image manifest");
      url = ref_.base() + "/manifests/" + want;
      continue;
    }
    if (type != manifest_type && type != docker_manifest_type)
      return error(errc::unsupported, fmt::format("{}: the registry's manifest is of type \"{}\", not an OCI or Docker "
                                                  "v2 image manifest",
                                                  where, type.substr(0, 100)));
    out.digest = digest;
    out.media_type = type;
    if (const json* a = detail::optional_field(*doc, "artifactType"); a && a->is_string()) out.artifact_type = a->get<std::string>();
    const json* layers = detail::optional_field(*doc, "layers");
    if (!layers || !layers->is_array()) return bad_manifest(where, "has no layers list");
    for (const auto& l : *layers) {
      const json* mt = l.is_object() ? detail::optional_field(l, "mediaType") : nullptr;
      const json* d = l.is_object() ? detail::optional_field(l, "digest") : nullptr;
      const json* size = l.is_object() ? detail::optional_field(l, "size") : nullptr;
      if (!mt || !d || !size || !mt->is_string() || !d->is_string() || !size->is_number_unsigned())
        return bad_manifest(where, "has a layer without a mediaType, digest and size");
      layer x{mt->get<std::string>(), d->get<std::string>(), size->get<std::uint64_t>(), {}};
      if (!is_digest(x.digest)) return bad_manifest(where, fmt::format("has a layer digest \"{}\" that is not sha256", x.digest.substr(0, 80)));
      if (const json* ann = detail::optional_field(l, "annotations"); ann && ann->is_object()) {
        for (const char* key : {title_annotation.data(), "org.cncf.model.filepath"})
          if (const json* t = detail::optional_field(*ann, key); t && t->is_string() && x.title.empty()) x.title = t->get<std::string>();
      }
      if (!x.title.empty() && out.titled(x.title))
        return bad_manifest(where, fmt::format("has two layers titled \"{}\"", x.title));
      out.layers.push_back(std::move(x));
    }
    return out;
  }
  return bad_manifest(where, "is an index of an index");
}

result<std::string> registry::blob(const layer& l, std::size_t max_size) {
  if (l.size > max_size)
    return error(errc::malformed_bundle, fmt::format("{}: the layer {} is {} bytes, more than {}", ref_.text(), l.digest,
                                                     l.size, max_size));
  auto body = http::get_document(client_, ref_.base() + "/blobs/" + l.digest, max_size, "blob");
  if (!body) return std::move(body).error();
  if (sha256_of(*body) != l.digest)
    return error(errc::digest_mismatch, fmt::format("{}: the blob {} does not hash to its digest", ref_.text(), l.digest));
  return body;
}

namespace {

// A model in a registry: each file is the layer titled with its name, read by Range requests on
// its blob (through the registry's redirects to its storage). The manifest is resolved once, at
// the first piece; blobs are then fetched by digest, so a tag moved meanwhile changes nothing.
class oci_source final : public http::origin_source {
 public:
  oci_source(reference ref, const source_options& options)
      : origin_source(ref.base(), options), text_(ref.text()), registry_(std::move(ref), options, "pull") {}
  const std::string& name() const noexcept override { return text_; }
  http::client& client() override { return registry_.client(); }

 protected:
  result<std::string> url_of(const piece_request& piece, const std::atomic<bool>*) override {
    auto img = resolved();
    if (!img) return std::move(img).error();
    const std::string file(piece.file);
    const layer* l = (*img)->titled(file);
    if (!l && file == ".") {  // a single-file model: the one layer that is not a bundle
      for (const auto& x : (*img)->layers)
        if (x.media_type.rfind("application/vnd.dev.sigstore.bundle", 0) != 0) l = l ? nullptr : &x;
    }
    if (!l) return error(errc::not_found, fmt::format("{}: no layer is titled \"{}\"", text_, file));
    if (piece.range.end > l->size)
      return error(errc::not_found, fmt::format("{}: the layer titled \"{}\" has {} bytes; the signed manifest reads up "
                                                "to byte {}",
                                                text_, file, l->size, piece.range.end));
    // Compressed or archived layers hold other bytes than the file's: drun reads raw ones.
    for (std::string_view packed : {"+gzip", "+zstd", ".tar", "tar+"})
      if (l->media_type.find(packed) != std::string::npos)
        return error(errc::unsupported, fmt::format("{}: the layer titled \"{}\" is {} (archived or compressed); drun "
                                                    "reads files stored as raw layers",
                                                    text_, file, l->media_type));
    // The layer's digest is the registry's claim about its bytes. Where the bundle signs the whole
    // file with SHA-256 the two must agree, so a manifest naming other bytes is refused before any
    // is transferred; otherwise the piece digests decide, as for any origin.
    if (const digest* signed_digest = piece.file_digest;
        signed_digest && signed_digest->algorithm() == hash_algorithm::sha256 &&
        l->digest != "sha256:" + signed_digest->hex())
      return error(errc::digest_mismatch,
                   fmt::format("{}: the layer titled \"{}\" is {}, but the signed file hashes to sha256:{}: the "
                               "registry's manifest names other bytes than the bundle signs",
                               text_, file, l->digest, signed_digest->hex()));
    return base_ + "/blobs/" + l->digest;
  }

 private:
  result<const image*> resolved() {
    std::lock_guard lock(mutex_);
    if (!image_) {
      auto img = registry_.resolve(registry_.ref().ref());
      if (!img) return std::move(img).error();
      image_ = std::move(img).value();
    }
    return &*image_;
  }

  std::string text_;
  registry registry_;
  std::mutex mutex_;
  std::optional<image> image_;
};

}  // namespace

result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options) {
  auto ref = parse_reference(url);
  if (!ref) return std::move(ref).error();
  return std::unique_ptr<source>(new oci_source(std::move(ref).value(), options));
}

result<std::string> fetch_bundle(std::string_view url, std::size_t max_size, const source_options& options) {
  auto ref = parse_reference(url);
  if (!ref) return std::move(ref).error();
  registry reg(*ref, options, "pull");
  auto img = reg.resolve(ref->ref());
  if (!img) return std::move(img).error();
  auto is_bundle = [](const layer& l) {
    return l.title == "model.sig" || l.media_type.rfind("application/vnd.dev.sigstore.bundle", 0) == 0;
  };
  for (const auto& l : img->layers)
    if (is_bundle(l)) return reg.blob(l, max_size);
  // OCI 1.1 referrers: the API, else the sha256-<hex> tag that registries without it keep.
  std::string hex = img->digest.substr(7);
  http::response answer;
  auto index = http::get_document(reg.client(), ref->base() + "/referrers/" + img->digest, max_manifest_size,
                                  "referrers index", {fmt::format("Accept: {}", index_type)}, &answer);
  auto none = [&] {
    return error(errc::not_found,
                 fmt::format("{}: no layer is titled model.sig and no referrer holds a Sigstore bundle", ref->text()));
  };
  const std::string* ct = index ? answer.header("content-type") : nullptr;
  std::string listed;
  if (index && ct && ct->rfind(index_type, 0) == 0) {
    listed = std::move(index).value();
  } else if (!index && index.error().code() != errc::not_found) {
    return std::move(index).error();
  } else {
    auto tagged = http::get_document(reg.client(), ref->base() + "/manifests/sha256-" + hex, max_manifest_size,
                                     "referrers tag", {fmt::format("Accept: {}", index_type)});
    if (!tagged) return tagged.error().code() == errc::not_found ? none() : std::move(tagged).error();
    listed = std::move(tagged).value();
  }
  auto doc = detail::parse_json_strict(listed, "referrers index", 1 << 16);
  if (!doc) return std::move(doc).error().with_path(ref->text());
  const json* list = doc->is_object() ? detail::optional_field(*doc, "manifests") : nullptr;
  if (list && list->is_array()) {
    for (const auto& m : *list) {
      const json* at = m.is_object() ? detail::optional_field(m, "artifactType") : nullptr;
      const json* d = m.is_object() ? detail::optional_field(m, "digest") : nullptr;
      if (!at || !d || !at->is_string() || !d->is_string() || !is_digest(d->get<std::string>())) continue;
      if (at->get<std::string>().rfind("application/vnd.dev.sigstore.bundle", 0) != 0) continue;
      auto referrer = reg.resolve(d->get<std::string>());
      if (!referrer) return std::move(referrer).error();
      for (const auto& l : referrer->layers)
        if (is_bundle(l) || referrer->layers.size() == 1) return reg.blob(l, max_size);
    }
  }
  return none();
}

}  // namespace drun::oci
