// Parsing of trusted_root.json. Strict like every parser of trust material: unknown media types,
// malformed keys and certificates are errors naming the field, never skipped entries (a root
// that silently drops a log would turn into "no evidence" errors far from the cause).
#include "sigstore/trusted_root.hpp"

#include "detail/encoding.hpp"
#include "detail/json.hpp"
#include "key_data.hpp"

#include <fmt/format.h>
#include <openssl/x509.h>

#include <cctype>
#include <ctime>

namespace drun::detail::sigstore {
namespace {

using vt = json::value_t;

constexpr std::size_t max_trusted_root = 4 << 20;
constexpr std::size_t max_entries = 64;  // per list; the public-good root has a handful

error bad_root(std::string detail) { return error(errc::key_error, "trusted root: " + std::move(detail)); }

// Field access for the root: the JSON helpers' malformed_bundle becomes key_error here.
result<const json*> field(const json& obj, std::string_view key, vt type, std::string_view where) {
  auto f = require_field(obj, key, type, where);
  if (!f) return bad_root(f.error().detail());
  return f;
}

result<std::string> base64_field(const json& obj, std::string_view key, std::string_view where) {
  auto f = field(obj, key, vt::string, where);
  if (!f) return std::move(f).error();
  auto bytes = base64_decode((*f)->get_ref<const std::string&>());
  if (!bytes || bytes->empty()) return bad_root(fmt::format("{}.{} is not valid base64", where, key));
  return std::move(*bytes);
}

result<time_window> window_field(const json& obj, std::string_view where) {
  auto vf = field(obj, "validFor", vt::object, where);
  if (!vf) return std::move(vf).error();
  std::string w = fmt::format("{}.validFor", where);
  auto start = field(**vf, "start", vt::string, w);
  if (!start) return std::move(start).error();
  time_window out;
  auto s = parse_rfc3339((*start)->get_ref<const std::string&>());
  if (!s) return bad_root(fmt::format("{}.start is not an RFC 3339 time", w));
  out.start = *s;
  if (const json* end = optional_field(**vf, "end")) {
    auto e = end->is_string() ? parse_rfc3339(end->get_ref<const std::string&>()) : std::nullopt;
    if (!e) return bad_root(fmt::format("{}.end is not an RFC 3339 time", w));
    if (*e < out.start) return bad_root(fmt::format("{} ends before it starts", w));
    out.end = e;
  }
  return out;
}

result<x509_ptr> certificate_from_der(const std::string& der, std::string_view where) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  x509_ptr cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (!cert || p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) {
    openssl_errors();
    return bad_root(fmt::format("{} is not a DER certificate", where));
  }
  return cert;
}

result<std::vector<log_key>> parse_logs(const json& root, std::string_view key) {
  std::vector<log_key> out;
  const json* list = optional_field(root, key);
  if (!list) return out;
  if (!list->is_array() || list->size() > max_entries)
    return bad_root(fmt::format("{} is not an array of at most {} logs", key, max_entries));
  for (std::size_t i = 0; i < list->size(); ++i) {
    std::string w = fmt::format("{}[{}]", key, i);
    const json& e = (*list)[i];
    if (!e.is_object()) return bad_root(w + " is not an object");
    auto pk = field(e, "publicKey", vt::object, w);
    if (!pk) return std::move(pk).error();
    std::string pw = w + ".publicKey";
    auto der = base64_field(**pk, "rawBytes", pw);
    if (!der) return std::move(der).error();
    const auto* p = reinterpret_cast<const unsigned char*>(der->data());
    evp_pkey_ptr pkey(d2i_PUBKEY(nullptr, &p, static_cast<long>(der->size())));
    if (!pkey || p != reinterpret_cast<const unsigned char*>(der->data()) + der->size()) {
      openssl_errors();
      return bad_root(pw + ".rawBytes is not a DER SubjectPublicKeyInfo");
    }
    auto k = key_access::from_evp(pkey.get());
    if (!k) return bad_root(fmt::format("{}: {}", pw, k.error().detail()));
    auto window = window_field(**pk, pw);
    if (!window) return std::move(window).error();
    auto id = field(e, "logId", vt::object, w);
    if (!id) return std::move(id).error();
    auto key_id = base64_field(**id, "keyId", w + ".logId");
    if (!key_id) return std::move(key_id).error();
    // A log's id is a SHA-256 (of its key, for Rekor and CT logs): any other length could never
    // match an entry's, so the log would be configured and silently useless. (Found by fuzzing.)
    if (key_id->size() != 32)
      return bad_root(fmt::format("{}.logId.keyId is {} bytes, not a 32-byte SHA-256", w, key_id->size()));
    std::string base_url;
    if (const json* u = optional_field(e, "baseUrl"); u && u->is_string()) base_url = u->get<std::string>();
    out.push_back(log_key{std::move(base_url), std::move(*key_id), std::move(*k), *window});
  }
  return out;
}

result<std::vector<authority>> parse_authorities(const json& root, std::string_view key) {
  std::vector<authority> out;
  const json* list = optional_field(root, key);
  if (!list) return out;
  if (!list->is_array() || list->size() > max_entries)
    return bad_root(fmt::format("{} is not an array of at most {} authorities", key, max_entries));
  for (std::size_t i = 0; i < list->size(); ++i) {
    std::string w = fmt::format("{}[{}]", key, i);
    const json& e = (*list)[i];
    if (!e.is_object()) return bad_root(w + " is not an object");
    authority a;
    if (const json* s = optional_field(e, "subject"); s && s->is_object()) {
      auto part = [&](const char* k) { const json* v = optional_field(*s, k); return v && v->is_string() ? v->get<std::string>() : std::string(); };
      a.name = part("organization") + "/" + part("commonName");
    }
    auto chain = field(e, "certChain", vt::object, w);
    if (!chain) return std::move(chain).error();
    auto certs = field(**chain, "certificates", vt::array, w + ".certChain");
    if (!certs) return std::move(certs).error();
    if ((*certs)->empty() || (*certs)->size() > 10)
      return bad_root(fmt::format("{}.certChain has {} certificates (1 to 10 expected)", w, (*certs)->size()));
    for (std::size_t k = 0; k < (*certs)->size(); ++k) {
      std::string cw = fmt::format("{}.certChain.certificates[{}]", w, k);
      const json& c = (**certs)[k];
      if (!c.is_object()) return bad_root(cw + " is not an object");
      auto der = base64_field(c, "rawBytes", cw);
      if (!der) return std::move(der).error();
      auto cert = certificate_from_der(*der, cw + ".rawBytes");
      if (!cert) return std::move(cert).error();
      a.chain.push_back(std::move(*cert));
    }
    auto window = window_field(e, w);
    if (!window) return std::move(window).error();
    a.valid_for = *window;
    out.push_back(std::move(a));
  }
  return out;
}

}  // namespace

std::optional<millis> parse_rfc3339(std::string_view t) {
  // YYYY-MM-DDTHH:MM:SS[.fff...]Z; offsets other than Z are not used by Sigstore's roots.
  auto digits = [&](std::size_t pos, std::size_t n) -> std::optional<int> {
    if (pos + n > t.size()) return std::nullopt;
    int v = 0;
    for (std::size_t i = pos; i < pos + n; ++i) {
      if (!std::isdigit(static_cast<unsigned char>(t[i]))) return std::nullopt;
      v = v * 10 + (t[i] - '0');
    }
    return v;
  };
  if (t.size() < 20 || t[4] != '-' || t[7] != '-' || (t[10] != 'T' && t[10] != 't') || t[13] != ':' || t[16] != ':')
    return std::nullopt;
  auto y = digits(0, 4), mo = digits(5, 2), d = digits(8, 2), h = digits(11, 2), mi = digits(14, 2), s = digits(17, 2);
  if (!y || !mo || !d || !h || !mi || !s || *mo < 1 || *mo > 12 || *d < 1 || *d > 31 || *h > 23 || *mi > 59 || *s > 60)
    return std::nullopt;
  std::size_t pos = 19;
  millis frac = 0;
  if (t[pos] == '.') {
    std::size_t n = 0;
    for (++pos; pos < t.size() && std::isdigit(static_cast<unsigned char>(t[pos])); ++pos, ++n)
      if (n < 3) frac = frac * 10 + (t[pos] - '0');
    if (n == 0) return std::nullopt;
    for (; n < 3; ++n) frac *= 10;
  }
  if (pos + 1 != t.size() || (t[pos] != 'Z' && t[pos] != 'z')) return std::nullopt;
  std::tm tm{};
  tm.tm_year = *y - 1900;
  tm.tm_mon = *mo - 1;
  tm.tm_mday = *d;
  tm.tm_hour = *h;
  tm.tm_min = *mi;
  tm.tm_sec = *s;
  return static_cast<millis>(timegm(&tm)) * 1000 + frac;
}

std::string format_time(millis t) {
  std::time_t secs = static_cast<std::time_t>(t / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

result<trusted_root> parse_trusted_root(std::string_view text) {
  if (text.size() > max_trusted_root)
    return bad_root(fmt::format("file is too large ({} bytes, at most {})", text.size(), max_trusted_root));
  auto doc = parse_json_strict(text, "trusted root");
  if (!doc) return error(errc::key_error, doc.error().detail());
  if (!doc->is_object()) return bad_root("not a JSON object");
  auto media = field(*doc, "mediaType", vt::string, "trusted root");
  if (!media) return std::move(media).error();
  const auto& m = (*media)->get_ref<const std::string&>();
  if (m != "application/vnd.dev.sigstore.trustedroot+json;version=0.1" &&
      m != "application/vnd.dev.sigstore.trustedroot.v0.2+json")
    return bad_root(fmt::format("mediaType \"{}\" is not a Sigstore TrustedRoot (version 0.1)", m));
  trusted_root root;
  auto cas = parse_authorities(*doc, "certificateAuthorities");
  if (!cas) return std::move(cas).error();
  root.certificate_authorities = std::move(*cas);
  auto tsas = parse_authorities(*doc, "timestampAuthorities");
  if (!tsas) return std::move(tsas).error();
  root.timestamp_authorities = std::move(*tsas);
  auto tlogs = parse_logs(*doc, "tlogs");
  if (!tlogs) return std::move(tlogs).error();
  root.tlogs = std::move(*tlogs);
  auto ctlogs = parse_logs(*doc, "ctlogs");
  if (!ctlogs) return std::move(ctlogs).error();
  root.ctlogs = std::move(*ctlogs);
  // A root without a CA or a log is well-formed but proves nothing: bundles checked against it
  // fail at the step that needs the missing part, with that step's message.
  return root;
}

}  // namespace drun::detail::sigstore
