// Access policies for the peer server: parsing (strict: every unknown field is an error) and the
// authorization decision (the token's issuer and binding, roles from certificate and token
// bindings combined by intersection or union, narrowed by a token's drun_artifacts claim).
#include <drun/policy.hpp>
#include <drun/verify.hpp>

#include "detail/file.hpp"
#include "detail/json.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace drun {
namespace {

using detail::json;

constexpr std::size_t max_policy_size = 4 << 20;
// Publisher checks are cached per (publisher, artifact); the map is dropped whole when it grows
// past this, which bounds memory at the cost of re-verifying bundles now and then.
constexpr std::size_t max_cache_entries = 1 << 16;

error bad_policy(std::string detail) { return error(errc::malformed_bundle, "policy " + std::move(detail)); }

bool is_artifact_id(std::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// An identifier from a caller, made safe to print: printable ASCII, bounded.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 80)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  if (s.size() > 80) out += "...";
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

// Refuses any member of obj not in `allowed`, naming it: a typo must never change access silently.
result<void> only_fields(const json& obj, std::initializer_list<std::string_view> allowed, std::string_view where) {
  for (const auto& [key, value] : obj.items())
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
      return bad_policy(fmt::format("{}: unknown field \"{}\"", where, printable(key)));
  return {};
}

result<const json*> member(const json& obj, std::string_view key, json::value_t type, std::string_view where) {
  auto f = detail::require_field(obj, key, type, where);
  if (!f) return error(errc::malformed_bundle, "policy " + f.error().detail());
  return *f;
}

result<std::string> string_member(const json& obj, std::string_view key, std::string_view where) {
  auto f = member(obj, key, json::value_t::string, where);
  if (!f) return std::move(f).error();
  auto s = (*f)->get<std::string>();
  if (s.empty()) return bad_policy(fmt::format("{}.{} is empty", where, key));
  return s;
}

// The value a token claim must have: strings as they are, numbers and booleans in the text
// verify_token() gives them, so {"level": 3} matches a token whose "level" is 3.
std::optional<std::string> claim_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number()) return v.dump();
  return std::nullopt;
}

struct publisher {
  trust_store trust;
};

struct role_def {
  bool all = false;
  std::set<std::string> artifacts;
  std::vector<std::size_t> publishers;  // indexes into impl::publishers
};

struct certificate_match {
  std::optional<std::string> subject, uri, uri_prefix, dns;
};

struct token_match {
  std::optional<std::string> subject;
  std::vector<std::pair<std::string, std::string>> claims;
};

struct binding {
  std::optional<certificate_match> certificate;
  std::optional<token_match> token;
  std::vector<std::string> roles;
};

bool matches(const certificate_match& m, const peer_identity& who) {
  auto any = [](const std::vector<std::string>& v, auto pred) { return std::any_of(v.begin(), v.end(), pred); };
  if (m.subject && who.subject != *m.subject) return false;
  if (m.uri && !any(who.uris, [&](const std::string& u) { return u == *m.uri; })) return false;
  if (m.uri_prefix && !any(who.uris, [&](const std::string& u) { return u.starts_with(*m.uri_prefix); })) return false;
  // DNS names compare without regard to case (RFC 4343).
  if (m.dns && !any(who.dns, [&](const std::string& d) { return iequals(d, *m.dns); })) return false;
  return true;
}

bool matches(const token_match& m, const token_claims& t) {
  if (m.subject && t.subject != *m.subject) return false;
  for (const auto& [name, value] : m.claims) {
    auto it = t.claims.find(name);
    if (it == t.claims.end() || std::find(it->second.begin(), it->second.end(), value) == it->second.end())
      return false;
  }
  return true;
}

// Whether a token carries a drun_artifacts claim. The claims map is consulted too, so a claim
// that is present but empty counts (and then grants nothing: it fails closed).
bool has_grant_claim(const token_claims& t) { return !t.artifacts.empty() || t.claims.count("drun_artifacts") != 0; }

// Whether a token's drun_artifacts claim includes `id` (or "*").
bool token_grants(const token_claims& t, const std::string& id) {
  const std::vector<std::string>* list = &t.artifacts;
  if (list->empty())
    if (auto it = t.claims.find("drun_artifacts"); it != t.claims.end()) list = &it->second;
  return std::find(list->begin(), list->end(), "*") != list->end() ||
         std::find(list->begin(), list->end(), id) != list->end();
}

std::string join(const std::set<std::string>& s) {
  std::string out;
  for (const auto& x : s) out += (out.empty() ? "" : ", ") + x;
  return out;
}

}  // namespace

struct access_policy::impl {
  bool authenticated_callers = false;
  bool union_roles = false;      // "combine": "union"; else intersection
  std::string token_issuer;      // "tokens.issuer"; empty: not checked here
  bool require_binding = false;  // "tokens.require_binding" (its default follows "combine")
  std::map<std::string, role_def> roles;
  std::vector<binding> bindings;
  std::vector<publisher> publishers;

  mutable std::mutex cache_mutex;
  mutable std::map<std::pair<std::size_t, std::string>, bool> signed_by;  // (publisher, artifact id)

  bool published_by(std::size_t p, const std::string& id, std::string_view bundle_json) const;
};

// Verification runs outside the lock, so one slow bundle does not stall other callers; two
// threads may both verify the same pair once, which is harmless. No bundle (the server asks
// about an artifact it does not hold yet) is a "no" that is not remembered: once the artifact
// is imported, its bundle is checked. Other answers are kept for the policy's lifetime: the id
// is the hash of the signed payload, so a "yes" stays true; a "no" turns stale only if the store
// swaps in another signature over the same payload, and stale it fails closed.
bool access_policy::impl::published_by(std::size_t p, const std::string& id, std::string_view bundle_json) const {
  if (bundle_json.empty()) return false;
  auto key = std::pair(p, id);
  {
    std::lock_guard lock(cache_mutex);
    if (auto it = signed_by.find(key); it != signed_by.end()) return it->second;
  }
  auto vm = verify_bundle(bundle_json, publishers[p].trust);
  // The bundle must be the artifact's own: a publisher's signature on something else says nothing.
  bool ok = vm && vm->artifact_id() == id;
  std::lock_guard lock(cache_mutex);
  if (signed_by.size() >= max_cache_entries) signed_by.clear();
  signed_by.emplace(std::move(key), ok);
  return ok;
}

std::string peer_identity::display() const {
  if (!uris.empty()) {
    auto is_spiffe = [](const std::string& u) { return u.starts_with("spiffe://"); };
    auto spiffe = std::find_if(uris.begin(), uris.end(), is_spiffe);
    return spiffe != uris.end() ? *spiffe : uris.front();
  }
  if (!subject.empty()) return subject;
  if (has_certificate && !dns.empty()) return "dns:" + dns.front();
  if (token) return "token:" + token->subject;
  return "anonymous";
}

access_policy::access_policy(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
access_policy::~access_policy() = default;
access_policy::access_policy(access_policy&&) noexcept = default;
access_policy& access_policy::operator=(access_policy&&) noexcept = default;

access_policy access_policy::authenticated_callers() {
  auto p = std::make_unique<impl>();
  p->authenticated_callers = true;
  return access_policy(std::move(p));
}

namespace {

result<void> parse_role(access_policy::impl& p, const std::string& name, const json& r,
                        const std::filesystem::path& base_dir);

}  // namespace

result<access_policy> access_policy::parse(std::string_view text, const std::filesystem::path& base_dir) {
  auto doc = detail::parse_json_strict(text, "policy");
  if (!doc) return std::move(doc).error();
  if (!doc->is_object()) return bad_policy("is not a JSON object");
  if (auto r = only_fields(*doc, {"combine", "tokens", "roles", "bindings"}, "top level"); !r)
    return std::move(r).error();
  auto roles = member(*doc, "roles", json::value_t::object, "policy");
  if (!roles) return std::move(roles).error();
  auto bindings = member(*doc, "bindings", json::value_t::array, "policy");
  if (!bindings) return std::move(bindings).error();

  auto p = std::make_unique<impl>();
  if (doc->contains("combine")) {
    auto c = string_member(*doc, "combine", "policy");
    if (!c) return std::move(c).error();
    if (*c != "intersection" && *c != "union")
      return bad_policy(fmt::format("combine is \"{}\"; \"intersection\" or \"union\" expected", printable(*c)));
    p->union_roles = *c == "union";
  }
  // Under union a token adds its roles to whatever certificate it arrives with, so an unbound
  // one is worth as much to any node it was sent to as to its holder: binding is then the default.
  p->require_binding = p->union_roles;
  if (doc->contains("tokens")) {
    auto t = member(*doc, "tokens", json::value_t::object, "policy");
    if (!t) return std::move(t).error();
    if (auto r = only_fields(**t, {"issuer", "require_binding"}, "tokens"); !r) return std::move(r).error();
    if ((*t)->contains("issuer")) {
      auto iss = string_member(**t, "issuer", "policy.tokens");
      if (!iss) return std::move(iss).error();
      p->token_issuer = std::move(*iss);
    }
    if ((*t)->contains("require_binding")) {
      auto rb = member(**t, "require_binding", json::value_t::boolean, "policy.tokens");
      if (!rb) return std::move(rb).error();
      p->require_binding = (*rb)->get<bool>();
    }
  }
  for (const auto& [name, r] : (*roles)->items())
    if (auto ok = parse_role(*p, name, r, base_dir); !ok) return std::move(ok).error();

  for (std::size_t i = 0; i < (*bindings)->size(); ++i) {
    const auto& b = (**bindings)[i];
    std::string where = fmt::format("bindings[{}]", i);
    if (!b.is_object()) return bad_policy(where + " is not an object");
    if (auto r = only_fields(b, {"certificate", "token", "roles"}, where); !r) return std::move(r).error();
    // One kind per binding: whether "both must match" or "either may" is meant would be a guess.
    if (b.contains("certificate") == b.contains("token"))
      return bad_policy(where + " must have exactly one of \"certificate\" and \"token\"");
    binding out;
    if (b.contains("certificate")) {
      std::string w = where + ".certificate";
      auto c = member(b, "certificate", json::value_t::object, where);
      if (!c) return std::move(c).error();
      if (auto r = only_fields(**c, {"subject", "uri", "uri_prefix", "dns"}, w); !r) return std::move(r).error();
      if ((*c)->empty()) return bad_policy(w + " names no matcher (subject, uri, uri_prefix or dns)");
      certificate_match m;
      for (auto [field, slot] : {std::pair{"subject", &m.subject}, std::pair{"uri", &m.uri},
                                 std::pair{"uri_prefix", &m.uri_prefix}, std::pair{"dns", &m.dns}}) {
        if (!(*c)->contains(field)) continue;
        auto s = string_member(**c, field, w);
        if (!s) return std::move(s).error();
        *slot = std::move(*s);
      }
      // A prefix that ends mid-segment ("spiffe://c/ns/ml") would also match "spiffe://c/ns/mlops/...".
      if (m.uri_prefix && !m.uri_prefix->ends_with("/"))
        return bad_policy(w + ".uri_prefix must end with \"/\" so that it matches whole path segments");
      out.certificate = std::move(m);
    } else {
      std::string w = where + ".token";
      auto t = member(b, "token", json::value_t::object, where);
      if (!t) return std::move(t).error();
      if (auto r = only_fields(**t, {"subject", "claims"}, w); !r) return std::move(r).error();
      token_match m;
      if ((*t)->contains("subject")) {
        auto s = string_member(**t, "subject", w);
        if (!s) return std::move(s).error();
        m.subject = std::move(*s);
      }
      if ((*t)->contains("claims")) {
        auto claims = member(**t, "claims", json::value_t::object, w);
        if (!claims) return std::move(claims).error();
        for (const auto& [name, value] : (*claims)->items()) {
          auto v = claim_text(value);
          if (!v)
            return bad_policy(fmt::format("{}.claims.{} must be a string, a number or a boolean", w, printable(name)));
          m.claims.emplace_back(name, std::move(*v));
        }
      }
      if (!m.subject && m.claims.empty()) return bad_policy(w + " names no matcher (subject or claims)");
      out.token = std::move(m);
    }
    auto roles_field = member(b, "roles", json::value_t::array, where);
    if (!roles_field) return std::move(roles_field).error();
    if ((*roles_field)->empty()) return bad_policy(where + ".roles is empty");
    for (const auto& r : **roles_field) {
      if (!r.is_string()) return bad_policy(where + ".roles holds a value that is not a string");
      const auto& name = r.get_ref<const std::string&>();
      if (!p->roles.count(name))
        return bad_policy(fmt::format("{} names an undefined role \"{}\"", where, printable(name)));
      out.roles.push_back(name);
    }
    p->bindings.push_back(std::move(out));
  }
  return access_policy(std::move(p));
}

namespace {

result<void> parse_role(access_policy::impl& p, const std::string& name, const json& r,
                        const std::filesystem::path& base_dir) {
  std::string where = fmt::format("roles.{}", printable(name));
  if (name.empty()) return bad_policy("roles has a role with an empty name");
  if (!r.is_object()) return bad_policy(where + " is not an object");
  if (auto ok = only_fields(r, {"artifacts", "publishers", "all"}, where); !ok) return std::move(ok).error();
  role_def role;
  if (r.contains("all")) {
    auto all = member(r, "all", json::value_t::boolean, where);
    if (!all) return std::move(all).error();
    role.all = (*all)->get<bool>();
  }
  if (r.contains("artifacts")) {
    auto arts = member(r, "artifacts", json::value_t::array, where);
    if (!arts) return std::move(arts).error();
    for (std::size_t i = 0; i < (*arts)->size(); ++i) {
      const auto& a = (**arts)[i];
      if (!a.is_string() || !is_artifact_id(a.get_ref<const std::string&>()))
        return bad_policy(fmt::format("{}.artifacts[{}] is not an artifact id (64 lowercase hex digits)", where, i));
      role.artifacts.insert(a.get<std::string>());
    }
  }
  if (r.contains("publishers")) {
    auto pubs = member(r, "publishers", json::value_t::array, where);
    if (!pubs) return std::move(pubs).error();
    for (std::size_t i = 0; i < (*pubs)->size(); ++i) {
      const auto& e = (**pubs)[i];
      std::string w = fmt::format("{}.publishers[{}]", where, i);
      if (!e.is_object()) return bad_policy(w + " is not an object");
      if (auto ok = only_fields(e, {"public_key", "ca_bundle", "trusted_root", "identity", "identity_provider"}, w); !ok)
        return std::move(ok).error();
      int kinds = e.contains("public_key") + e.contains("ca_bundle") + e.contains("trusted_root");
      if (kinds != 1)
        return bad_policy(w + " must have exactly one of \"public_key\", \"ca_bundle\" and \"trusted_root\"");
      bool keyless = e.contains("trusted_root");
      if (keyless != (e.contains("identity") && e.contains("identity_provider")) ||
          (!keyless && (e.contains("identity") || e.contains("identity_provider"))))
        return bad_policy(w + " needs \"identity\" and \"identity_provider\" with \"trusted_root\", and only then");
      const char* file_field = keyless ? "trusted_root" : e.contains("public_key") ? "public_key" : "ca_bundle";
      auto rel = string_member(e, file_field, w);
      if (!rel) return std::move(rel).error();
      auto file = base_dir / *rel;  // an absolute path stays as it is
      std::optional<trust_store> trust;
      if (keyless) {
        auto id = string_member(e, "identity", w);
        if (!id) return std::move(id).error();
        auto issuer = string_member(e, "identity_provider", w);
        if (!issuer) return std::move(issuer).error();
        auto t = trust_store::from_sigstore(file, {*id, *issuer});
        if (!t) return std::move(t).error().with_operation("policy " + w);
        trust.emplace(std::move(t).value());
      } else if (e.contains("public_key")) {
        auto key = public_key::load(file);
        if (!key) return std::move(key).error().with_operation("policy " + w);
        trust.emplace(trust_store::from_public_key(std::move(key).value()));
      } else {
        auto ca = trust_store::from_ca_bundle(file);
        if (!ca) return std::move(ca).error().with_operation("policy " + w);
        trust.emplace(std::move(ca).value());
      }
      role.publishers.push_back(p.publishers.size());
      p.publishers.push_back(publisher{std::move(*trust)});
    }
  }
  if (!role.all && role.artifacts.empty() && role.publishers.empty())
    return bad_policy(where + " grants nothing: give \"artifacts\", \"publishers\" or \"all\": true");
  p.roles.emplace(name, std::move(role));
  return {};
}

}  // namespace

result<access_policy> access_policy::load(const std::filesystem::path& file) {
  auto text = detail::read_file(file, max_policy_size, errc::malformed_bundle);
  if (!text) return std::move(text).error().with_path(file.string());
  auto dir = file.parent_path();
  auto policy = parse(*text, dir.empty() ? std::filesystem::path(".") : dir);
  if (!policy) {
    // A publisher key or CA that fails names its own file; anything else names the policy's.
    auto e = std::move(policy).error();
    if (e.path().empty()) e.with_path(file.string());
    return e;
  }
  return policy;
}

bool access_policy::reads_bundles() const noexcept { return !impl_->publishers.empty(); }

namespace {

// What a set of roles grants, before any token narrowing. Cheap checks first; a publisher check
// verifies the bundle's signature (then it is cached).
bool roles_grant(const access_policy::impl& p, const std::set<std::string>& roles, const std::string& id,
                 std::string_view bundle_json) {
  bool allowed = std::any_of(roles.begin(), roles.end(), [&](const std::string& r) {
    const auto& role = p.roles.at(r);
    return role.all || role.artifacts.count(id) != 0;
  });
  for (auto it = roles.begin(); !allowed && it != roles.end(); ++it)
    for (auto pub : p.roles.at(*it).publishers)
      if ((allowed = p.published_by(pub, id, bundle_json))) break;
  return allowed;
}

}  // namespace

result<void> access_policy::authorize(const peer_identity& who, const std::string& artifact_id,
                                      std::string_view bundle_json) const {
  auto deny = [&](std::string_view why) {
    return error(errc::permission_denied,
                 fmt::format("{} may not read artifact {}: {}", printable(who.display()), printable(artifact_id), why));
  };
  if (!is_artifact_id(artifact_id)) return deny("not an artifact id (64 lowercase hex digits)");
  const auto& p = *impl_;

  // verify_token() already refused a bound token presented with another certificate; this
  // repeats it for identities assembled some other way, since the binding is what makes a
  // token worth nothing to whoever it was sent to.
  if (who.token && !who.token->certificate_thumbprint.empty() &&
      who.token->certificate_thumbprint != who.certificate_thumbprint)
    return deny("its token is bound to another certificate than the one it was presented with");

  if (p.authenticated_callers) {
    if (!who.has_certificate && !who.token) return deny("the caller presented neither a certificate nor a token");
    if (who.token && has_grant_claim(*who.token) && !token_grants(*who.token, artifact_id))
      return deny("its token's drun_artifacts claim does not include it");
    if (!who.has_certificate && !has_grant_claim(*who.token))
      return deny("its token has no drun_artifacts claim, so it grants no artifact");
    return {};
  }

  if (who.token) {
    if (!p.token_issuer.empty() && who.token->issuer != p.token_issuer)
      return deny(who.token->issuer.empty()
                      ? fmt::format("its token has no issuer (\"iss\"); the policy requires \"{}\"",
                                    printable(p.token_issuer))
                      : fmt::format("its token's issuer \"{}\" is not \"{}\", the one the policy names",
                                    printable(who.token->issuer), printable(p.token_issuer)));
    if (p.require_binding && who.token->certificate_thumbprint.empty())
      return deny(fmt::format("its token is not bound to a certificate (no cnf \"x5t#S256\"), and the policy "
                              "requires bound tokens{}",
                              p.union_roles ? " (\"combine\": \"union\" requires them unless \"tokens\" says "
                                              "\"require_binding\": false)"
                                            : ""));
  }

  std::set<std::string> cert_roles, token_roles;
  for (const auto& b : p.bindings) {
    if (b.certificate && who.has_certificate && matches(*b.certificate, who))
      cert_roles.insert(b.roles.begin(), b.roles.end());
    if (b.token && who.token && matches(*b.token, *who.token)) token_roles.insert(b.roles.begin(), b.roles.end());
  }

  if (who.has_certificate && who.token && !p.union_roles) {
    // Intersection: each credential must grant the artifact on its own.
    if (cert_roles.empty() && token_roles.empty()) return deny("no binding of the access policy matches the caller");
    constexpr std::string_view rule =
        " (\"combine\": \"intersection\": its certificate and its token must each grant it)";
    for (auto [roles, what] : {std::pair{&cert_roles, "certificate"}, std::pair{&token_roles, "token"}}) {
      if (roles->empty()) return deny(fmt::format("no binding of the access policy matches its {}{}", what, rule));
      if (!roles_grant(p, *roles, artifact_id, bundle_json))
        return deny(fmt::format("none of its {}'s roles ({}) grants this artifact{}", what, join(*roles), rule));
    }
  } else {
    std::set<std::string> roles = std::move(cert_roles);
    roles.insert(token_roles.begin(), token_roles.end());
    if (roles.empty()) return deny("no binding of the access policy matches the caller");
    if (!roles_grant(p, roles, artifact_id, bundle_json))
      return deny(fmt::format("none of its roles ({}) grants this artifact", join(roles)));
  }

  if (who.token && has_grant_claim(*who.token) && !token_grants(*who.token, artifact_id))
    return deny("its token's drun_artifacts claim does not include it");
  return {};
}

}  // namespace drun
