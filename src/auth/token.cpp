// JWT bearer tokens: compact JWS verification against a JWKS (EdDSA, ES256, RS256 through OpenSSL
// EVP), certificate binding (RFC 8705 cnf x5t#S256), and EdDSA minting with drun's own Ed25519
// keys (libsodium, through key_access::sign).
//
// The order of checks is fixed and fails closed: size, shape, header (alg, crit, typ), key
// selection, signature, and only then the claims (exp, nbf, aud, iss, cnf). Nothing from an unauthenticated payload is
// looked at before the signature checks out, and no message quotes the token.
#include <drun/token.hpp>

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/json.hpp"
#include "detail/openssl.hpp"
#include "key_data.hpp"
#include "metrics/registry.hpp"

#include <drun/hash.hpp>

#include <fmt/format.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <ctime>

namespace drun {
namespace {

using detail::json;
using ojson = nlohmann::ordered_json;

using bn_ptr = std::unique_ptr<BIGNUM, detail::ossl_deleter<BN_free>>;
using param_bld_ptr = std::unique_ptr<OSSL_PARAM_BLD, detail::ossl_deleter<OSSL_PARAM_BLD_free>>;
using params_ptr = std::unique_ptr<OSSL_PARAM, detail::ossl_deleter<OSSL_PARAM_free>>;
using ecdsa_sig_ptr = std::unique_ptr<ECDSA_SIG, detail::ossl_deleter<ECDSA_SIG_free>>;

constexpr std::size_t max_jwks_size = 1 << 20;
constexpr std::size_t max_jwks_keys = 256;   // bounds the work of a token without "kid"
constexpr int min_rsa_bits = 2048;
constexpr int max_rsa_bits = 16384;          // bounds the work of one RSA verification
constexpr auto max_ttl = std::chrono::hours(24);
// NumericDate values outside [0, year 2261] are refused: later ones would overflow the clock's
// nanosecond time_point (and a skew added to them).
constexpr double max_numeric_date = 9.2e9;

error bad_token(std::string detail) { return error(errc::malformed_bundle, std::move(detail)); }
error refused(std::string detail) { return error(errc::signature_invalid, std::move(detail)); }

// ---- base64url (RFC 4648 section 5, no padding) ----------------------------------------------

std::string b64url_encode(std::span<const std::byte> bytes) {
  auto s = detail::base64_encode(bytes);
  while (!s.empty() && s.back() == '=') s.pop_back();
  for (auto& c : s) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return s;
}
std::string b64url_encode(std::string_view s) { return b64url_encode(as_bytes(s)); }

// Strict: only the URL alphabet, no padding, no stray bits in the last character (one encoding,
// one meaning). Built on the strict standard decoder after mapping the alphabet.
std::optional<std::string> b64url_decode(std::string_view text) {
  if (text.size() % 4 == 1) return std::nullopt;
  std::string std_b64;
  std_b64.reserve(text.size() + 3);
  for (char c : text) {
    if (c == '+' || c == '/' || c == '=') return std::nullopt;
    std_b64.push_back(c == '-' ? '+' : c == '_' ? '/' : c);
  }
  while (std_b64.size() % 4 != 0) std_b64.push_back('=');
  return detail::base64_decode(std_b64);
}

// Text from a token (alg, kid, typ) made safe to put in a message: printable ASCII, bounded.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 64)) out.push_back(c >= 0x20 && c < 0x7f && c != '"' && c != '\\' ? c : '?');
  if (s.size() > 64) out += "...";
  return out;
}

std::string utc(std::chrono::system_clock::time_point t) {
  std::time_t tt = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::chrono::system_clock::time_point now_or(std::chrono::system_clock::time_point t) {
  return t == std::chrono::system_clock::time_point{} ? std::chrono::system_clock::now() : t;
}

// ---- keys --------------------------------------------------------------------------------

enum class jwk_kind { ed25519, p256, rsa };

std::string_view alg_of(jwk_kind k) {
  switch (k) {
    case jwk_kind::ed25519: return "EdDSA";
    case jwk_kind::p256: return "ES256";
    case jwk_kind::rsa: return "RS256";
  }
  return "";
}

std::string_view kind_name(jwk_kind k) {
  switch (k) {
    case jwk_kind::ed25519: return "an Ed25519 (OKP)";
    case jwk_kind::p256: return "an EC P-256";
    case jwk_kind::rsa: return "an RSA";
  }
  return "an unknown";
}

std::optional<jwk_kind> kind_for_alg(std::string_view alg) {
  if (alg == "EdDSA") return jwk_kind::ed25519;
  if (alg == "ES256") return jwk_kind::p256;
  if (alg == "RS256") return jwk_kind::rsa;
  return std::nullopt;
}

struct jwk_key {
  jwk_kind kind;
  std::string kid;  // "" when the JWK has none
  detail::evp_pkey_ptr pkey;
};

// Reads a base64url member of a JWK; `size` (when non-zero) is the exact decoded length.
result<std::string> jwk_bytes(const json& k, std::string_view name, std::size_t size, std::string_view where) {
  auto f = detail::require_field(k, name, json::value_t::string, where);
  if (!f) return std::move(f).error().with_code(errc::key_error);
  auto bytes = b64url_decode((*f)->get_ref<const std::string&>());
  if (!bytes) return error(errc::key_error, fmt::format("{}.{} is not valid base64url", where, name));
  if (size != 0 && bytes->size() != size)
    return error(errc::key_error,
                 fmt::format("{}.{} is {} bytes ({} expected)", where, name, bytes->size(), size));
  return std::move(*bytes);
}

// Builds a public key from OSSL_PARAMs (EC and RSA), the OpenSSL 3 way.
result<detail::evp_pkey_ptr> pkey_from_params(const char* type, OSSL_PARAM_BLD* bld, std::string_view where) {
  params_ptr params(OSSL_PARAM_BLD_to_param(bld));
  detail::evp_pkey_ctx_ptr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
    return error(errc::key_error,
                 fmt::format("{} is not a valid {} public key: {}", where, type, detail::openssl_errors()));
  detail::evp_pkey_ptr pkey(raw);
  // For EC this is the on-curve (and not-infinity) check: a point off the curve invites
  // invalid-curve attacks, so it is checked here explicitly, not left to the import's habits.
  detail::evp_pkey_ctx_ptr check(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
  if (!check || EVP_PKEY_public_check(check.get()) != 1)
    return error(errc::key_error, fmt::format("{} fails the public key check: {}", where, detail::openssl_errors()));
  return pkey;
}

result<detail::evp_pkey_ptr> ed25519_from_jwk(const json& k, std::string_view where) {
  auto x = jwk_bytes(k, "x", 32, where);
  if (!x) return std::move(x).error();
  detail::evp_pkey_ptr pkey(EVP_PKEY_new_raw_public_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(x->data()), x->size()));
  if (!pkey)
    return error(errc::key_error, fmt::format("{} is not a valid Ed25519 key: {}", where, detail::openssl_errors()));
  return pkey;
}

result<detail::evp_pkey_ptr> p256_from_jwk(const json& k, std::string_view where) {
  auto x = jwk_bytes(k, "x", 32, where);
  if (!x) return std::move(x).error();
  auto y = jwk_bytes(k, "y", 32, where);
  if (!y) return std::move(y).error();
  std::string point = "\x04" + *x + *y;  // SEC1 uncompressed point
  param_bld_ptr bld(OSSL_PARAM_BLD_new());
  if (!bld || OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()) != 1)
    return error(errc::key_error, "cannot build EC key parameters: " + detail::openssl_errors());
  return pkey_from_params("EC", bld.get(), where);
}

result<detail::evp_pkey_ptr> rsa_from_jwk(const json& k, std::string_view where) {
  auto n = jwk_bytes(k, "n", 0, where);
  if (!n) return std::move(n).error();
  auto e = jwk_bytes(k, "e", 0, where);
  if (!e) return std::move(e).error();
  bn_ptr bn_n(BN_bin2bn(reinterpret_cast<const unsigned char*>(n->data()), static_cast<int>(n->size()), nullptr));
  bn_ptr bn_e(BN_bin2bn(reinterpret_cast<const unsigned char*>(e->data()), static_cast<int>(e->size()), nullptr));
  if (!bn_n || !bn_e) return error(errc::key_error, "cannot read RSA key parameters: " + detail::openssl_errors());
  int bits = BN_num_bits(bn_n.get());
  if (bits < min_rsa_bits)
    return error(errc::key_error, fmt::format("{} is a {}-bit RSA key; at least {} bits are required", where, bits,
                                              min_rsa_bits));
  if (bits > max_rsa_bits)
    return error(errc::key_error, fmt::format("{} is a {}-bit RSA key; at most {} bits are accepted", where, bits,
                                              max_rsa_bits));
  // A public exponent of 1 (or an even one) makes "verification" meaningless or impossible.
  if (BN_num_bits(bn_e.get()) > 64 || !BN_is_odd(bn_e.get()) || BN_is_one(bn_e.get()))
    return error(errc::key_error, fmt::format("{} has an unusable RSA public exponent", where));
  param_bld_ptr bld(OSSL_PARAM_BLD_new());
  if (!bld || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1)
    return error(errc::key_error, "cannot build RSA key parameters: " + detail::openssl_errors());
  return pkey_from_params("RSA", bld.get(), where);
}

// One JWK: a usable key, nullopt for a key to skip (not for signatures, a type drun does not
// verify with), or an error for a key of a supported type that is broken.
result<std::optional<jwk_key>> parse_jwk(const json& k, std::size_t index) {
  std::string where = fmt::format("JWKS key {}", index);
  if (!k.is_object()) return bad_token(where + " is not a JSON object");
  auto string_member = [&](std::string_view name) -> result<std::optional<std::string>> {
    auto f = detail::optional_field(k, name);
    if (!f) return std::optional<std::string>();
    if (!f->is_string())
      return bad_token(
          fmt::format("{}.{} has the wrong type (string expected, {} found)", where, name, f->type_name()));
    return std::optional<std::string>(f->get<std::string>());
  };
  auto kty = detail::require_field(k, "kty", json::value_t::string, where);
  if (!kty) return std::move(kty).error();
  auto use = string_member("use");
  if (!use) return std::move(use).error();
  auto kid = string_member("kid");
  if (!kid) return std::move(kid).error();
  auto alg = string_member("alg");
  if (!alg) return std::move(alg).error();
  auto crv = string_member("crv");
  if (!crv) return std::move(crv).error();
  if (*use && **use != "sig") return std::optional<jwk_key>();
  if (const auto* ops = detail::optional_field(k, "key_ops")) {
    if (!ops->is_array()) return bad_token(where + ".key_ops is not an array");
    if (std::find(ops->begin(), ops->end(), json("verify")) == ops->end()) return std::optional<jwk_key>();
  }
  // A published key set never holds private parts; one that does was exported by mistake, and
  // a file with a secret in it should not quietly serve as a public configuration.
  for (const char* secret : {"d", "p", "q", "dp", "dq", "qi", "k"})
    if (k.contains(secret))
      return error(errc::key_error, fmt::format("{} holds private key material (\"{}\"): publish public keys only",
                                                where, secret));
  const auto& type = (*kty)->get_ref<const std::string&>();
  std::optional<jwk_kind> kind;
  if (type == "OKP" && *crv == "Ed25519") kind = jwk_kind::ed25519;
  else if (type == "EC" && *crv == "P-256") kind = jwk_kind::p256;
  else if (type == "RSA") kind = jwk_kind::rsa;
  if (!kind) return std::optional<jwk_key>();
  // A key that names another algorithm is never used for this one (RFC 7517 4.4). "Ed25519" is
  // the fully-specified name (RFC 9864) of what JWS calls EdDSA with this curve.
  if (*alg && **alg != alg_of(*kind) && !(*kind == jwk_kind::ed25519 && **alg == "Ed25519"))
    return std::optional<jwk_key>();
  if (*kid && !(*kid)->empty()) where += fmt::format(" (kid \"{}\")", printable(**kid));
  result<detail::evp_pkey_ptr> pkey = *kind == jwk_kind::ed25519 ? ed25519_from_jwk(k, where)
                                      : *kind == jwk_kind::p256  ? p256_from_jwk(k, where)
                                                                 : rsa_from_jwk(k, where);
  if (!pkey) return std::move(pkey).error();
  return std::optional<jwk_key>(jwk_key{*kind, kid->value_or(""), std::move(pkey).value()});
}

// ---- signatures --------------------------------------------------------------------------

// RFC 7518 3.4: an ES256 signature is r || s, 32 bytes each, big-endian. OpenSSL wants DER.
std::optional<std::string> es256_to_der(std::string_view raw) {
  if (raw.size() != 64) return std::nullopt;
  const auto* p = reinterpret_cast<const unsigned char*>(raw.data());
  ecdsa_sig_ptr sig(ECDSA_SIG_new());
  BIGNUM* r = BN_bin2bn(p, 32, nullptr);
  BIGNUM* s = BN_bin2bn(p + 32, 32, nullptr);
  if (!sig || !r || !s || ECDSA_SIG_set0(sig.get(), r, s) != 1) {
    BN_free(r);
    BN_free(s);
    return std::nullopt;
  }
  unsigned char* der = nullptr;
  int len = i2d_ECDSA_SIG(sig.get(), &der);
  if (len <= 0) return std::nullopt;
  std::string out(reinterpret_cast<char*>(der), static_cast<std::size_t>(len));
  OPENSSL_free(der);
  return out;
}

bool verify_with(const jwk_key& key, std::string_view signing_input, std::string_view signature) {
  std::string der;
  if (key.kind == jwk_kind::ed25519 && signature.size() != 64) return false;
  if (key.kind == jwk_kind::p256) {
    auto d = es256_to_der(signature);
    if (!d) return false;
    der = std::move(*d);
    signature = der;
  }
  // EdDSA signs the message itself (no digest); ES256 and RS256 hash with SHA-256, and RSA's
  // default padding for a verify context is PKCS#1 v1.5, which is what RS256 is.
  const char* md = key.kind == jwk_kind::ed25519 ? nullptr : "SHA256";
  detail::evp_md_ctx_ptr ctx(EVP_MD_CTX_new());
  bool ok = ctx &&
            EVP_DigestVerifyInit_ex(ctx.get(), nullptr, md, nullptr, nullptr, key.pkey.get(), nullptr) == 1 &&
            EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                             reinterpret_cast<const unsigned char*>(signing_input.data()), signing_input.size()) == 1;
  detail::openssl_errors();  // a failed check leaves entries in the queue; drop them
  return ok;
}

// ---- claims ------------------------------------------------------------------------------

result<std::chrono::system_clock::time_point> numeric_date(const json& payload, std::string_view name) {
  const auto& v = payload.at(name);
  if (!v.is_number()) return bad_token(fmt::format("token claim \"{}\" is not a number", name));
  double secs = v.get<double>();
  if (!(secs >= 0 && secs <= max_numeric_date))
    return bad_token(fmt::format("token claim \"{}\" is out of range", name));
  return std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(secs)));
}

// A claim value as policies see it: strings as they are, numbers in their JSON text, booleans as
// "true"/"false". Anything else (objects, null) is not matchable.
std::optional<std::string> scalar_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number()) return v.dump();
  return std::nullopt;
}

bool valid_artifact_grant(const std::string& s) {
  return s == "*" || (s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
                        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                      }));
}

// An x5t#S256 value: exactly the canonical base64url of 32 bytes (43 characters). Canonical, so
// that comparing the text compares the digests.
bool valid_thumbprint(std::string_view s) {
  if (s.size() != 43) return false;
  auto bytes = b64url_decode(s);
  return bytes && bytes->size() == 32;
}

// "cnf" (RFC 7800), read once the signature is known good. drun checks one confirmation method,
// RFC 8705's x5t#S256; a token confirmed by anything else (a key for DPoP or PoP, "jkt", "jwk",
// "kid", "jku", "jwe") is refused rather than accepted as a bearer token, since its issuer meant
// it to be usable only with a proof drun does not ask for.
result<std::string> read_cnf(const json& payload) {
  // Looked up directly, not with optional_field: "cnf": null is a malformed claim, never "unbound".
  auto it = payload.find("cnf");
  if (it == payload.end()) return std::string();
  const json* cnf = &*it;
  if (!cnf->is_object())
    return bad_token(fmt::format("token claim \"cnf\" is not a JSON object ({} found)", cnf->type_name()));
  if (cnf->empty()) return bad_token("token claim \"cnf\" names no confirmation method");
  for (const auto& [method, value] : cnf->items())
    if (method != "x5t#S256")
      return refused(fmt::format("token is confirmed by cnf \"{}\", a method drun cannot check (only \"x5t#S256\", "
                                 "a TLS client certificate thumbprint)",
                                 printable(method)));
  const auto& x5t = cnf->at("x5t#S256");
  if (!x5t.is_string())
    return bad_token(fmt::format("token claim cnf \"x5t#S256\" is not a string ({} found)", x5t.type_name()));
  const auto& text = x5t.get_ref<const std::string&>();
  if (!valid_thumbprint(text))
    return bad_token("token claim cnf \"x5t#S256\" is not a certificate thumbprint (the base64url of 32 bytes, "
                     "43 characters)");
  return text;
}

result<token_claims> read_claims(const json& payload, const token_check& check) {
  token_claims c;
  auto now = now_or(check.now);
  auto skew = std::chrono::duration_cast<std::chrono::system_clock::duration>(check.clock_skew);

  if (!payload.contains("exp")) return bad_token("token has no \"exp\" claim (an expiry is required)");
  auto exp = numeric_date(payload, "exp");
  if (!exp) return std::move(exp).error();
  c.expires = *exp;
  if (payload.contains("nbf")) {
    auto nbf = numeric_date(payload, "nbf");
    if (!nbf) return std::move(nbf).error();
    c.not_before = *nbf;
  }
  auto sub = detail::require_field(payload, "sub", json::value_t::string, "token");
  if (!sub) return std::move(sub).error();
  c.subject = (*sub)->get<std::string>();
  if (c.subject.empty()) return bad_token("token claim \"sub\" is empty");
  if (const auto* iss = detail::optional_field(payload, "iss")) {
    if (!iss->is_string()) return bad_token("token claim \"iss\" is not a string");
    c.issuer = iss->get<std::string>();
  }
  auto cnf = read_cnf(payload);
  if (!cnf) return std::move(cnf).error();
  c.certificate_thumbprint = std::move(*cnf);
  if (const auto* aud = detail::optional_field(payload, "aud")) {
    if (aud->is_string()) {
      c.audience.push_back(aud->get<std::string>());
    } else if (aud->is_array()) {
      for (const auto& a : *aud) {
        if (!a.is_string()) return bad_token("token claim \"aud\" holds a value that is not a string");
        c.audience.push_back(a.get<std::string>());
      }
    } else {
      return bad_token("token claim \"aud\" is neither a string nor an array of strings");
    }
  }
  if (payload.contains("drun_artifacts")) {
    const auto& arts = payload.at("drun_artifacts");
    if (!arts.is_array()) return bad_token("token claim \"drun_artifacts\" is not an array");
    for (const auto& a : arts) {
      if (!a.is_string() || !valid_artifact_grant(a.get<std::string>()))
        return bad_token("token claim \"drun_artifacts\" holds an entry that is neither \"*\" nor a 64-digit "
                         "lowercase hex artifact id");
      c.artifacts.push_back(a.get<std::string>());
    }
  }
  for (const auto& [name, value] : payload.items()) {
    std::vector<std::string> texts;
    if (auto t = scalar_text(value)) {
      texts.push_back(std::move(*t));
    } else if (value.is_array()) {
      bool all = true;
      for (const auto& v : value) {
        auto tv = scalar_text(v);
        if (!tv) { all = false; break; }
        texts.push_back(std::move(*tv));
      }
      if (!all) continue;
    } else {
      continue;
    }
    c.claims.emplace(name, std::move(texts));
  }

  // The checks, in the order the header documents. Skew widens each window by the same amount.
  if (now >= c.expires + skew)
    return refused(fmt::format("token expired at {} (now {}, clock skew {} s)", utc(c.expires), utc(now),
                               check.clock_skew.count()));
  if (now + skew < c.not_before)
    return refused(fmt::format("token is not yet valid: nbf is {} (now {}, clock skew {} s)", utc(c.not_before),
                               utc(now), check.clock_skew.count()));
  if (std::find(c.audience.begin(), c.audience.end(), check.audience) == c.audience.end())
    return refused(fmt::format("wrong audience: the token's \"aud\" does not include \"{}\"", check.audience));
  // One key set may hold the keys of more than one issuer (or an issuer that also signs for
  // others): the issuer the operator named is checked, not inferred from the key.
  if (!check.issuer.empty()) {
    if (!payload.contains("iss"))
      return refused(fmt::format("token has no \"iss\" claim; issuer \"{}\" is required", printable(check.issuer)));
    if (c.issuer != check.issuer)
      return refused(fmt::format("wrong issuer: the token's \"iss\" is \"{}\", not \"{}\"", printable(c.issuer),
                                 printable(check.issuer)));
  }
  // The binding: whoever presents a bound token must hold the certificate it names, so a peer
  // that was sent the token (every peer a client dials is) cannot use it on its own connection.
  if (!c.certificate_thumbprint.empty()) {
    if (check.certificate_thumbprint.empty())
      return refused("token is bound to a certificate (cnf \"x5t#S256\"), but no client certificate was presented "
                     "with it");
    if (c.certificate_thumbprint != check.certificate_thumbprint)
      return refused("token is bound to another certificate: its cnf \"x5t#S256\" is not the thumbprint of the "
                     "client certificate it was presented with");
  } else if (check.require_binding) {
    return refused("token is not bound to a certificate (no cnf \"x5t#S256\" claim), and bound tokens are required: "
                   "a bearer token can be replayed by anyone it was sent to");
  }
  return c;
}

// ---- minting -----------------------------------------------------------------------------

struct public_jwk {
  ojson members;           // kty, crv, x (, y), in that order
  std::string thumbprint;  // RFC 7638
};

result<public_jwk> jwk_of(const public_key& key) {
  EVP_PKEY* pkey = detail::key_access::evp(key);
  public_jwk out;
  std::string canonical;  // RFC 7638: required members only, sorted, no whitespace
  if (key.type() == key_type::ed25519) {
    std::array<unsigned char, 32> raw{};
    std::size_t len = raw.size();
    if (EVP_PKEY_get_raw_public_key(pkey, raw.data(), &len) != 1 || len != raw.size())
      return error(errc::key_error, "cannot read Ed25519 public key: " + detail::openssl_errors());
    auto x = b64url_encode(std::as_bytes(std::span(raw)));
    out.members = ojson{{"kty", "OKP"}, {"crv", "Ed25519"}, {"x", x}};
    canonical = fmt::format(R"({{"crv":"Ed25519","kty":"OKP","x":"{}"}})", x);
  } else if (key.type() == key_type::ecdsa_p256) {
    std::array<std::string, 2> coords;
    const char* names[2] = {OSSL_PKEY_PARAM_EC_PUB_X, OSSL_PKEY_PARAM_EC_PUB_Y};
    for (int i = 0; i < 2; ++i) {
      BIGNUM* raw_bn = nullptr;
      if (EVP_PKEY_get_bn_param(pkey, names[i], &raw_bn) != 1)
        return error(errc::key_error, "cannot read EC public key: " + detail::openssl_errors());
      bn_ptr bn(raw_bn);
      std::array<unsigned char, 32> buf{};
      if (BN_bn2binpad(bn.get(), buf.data(), static_cast<int>(buf.size())) != 32)
        return error(errc::key_error, "EC public key coordinate does not fit 32 bytes");
      coords[static_cast<std::size_t>(i)] = b64url_encode(std::as_bytes(std::span(buf)));
    }
    out.members = ojson{{"kty", "EC"}, {"crv", "P-256"}, {"x", coords[0]}, {"y", coords[1]}};
    canonical = fmt::format(R"({{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}})", coords[0], coords[1]);
  } else {
    return error(errc::invalid_argument,
                 fmt::format("a {} key has no JWS algorithm drun uses (Ed25519 or ECDSA P-256 expected)",
                             to_string(key.type())));
  }
  out.thumbprint = b64url_encode(hash(hash_algorithm::sha256, as_bytes(canonical)).bytes());
  return out;
}

// The strict parser, with a message that quotes nothing from the token: nlohmann's parse errors
// echo the bytes they last read, and those are the token's. Duplicate keys name only the key.
result<json> parse_part(std::string_view text, std::string_view what) {
  auto doc = detail::parse_json_strict(text, what);
  if (doc) return doc;
  const auto& d = doc.error().detail();
  auto dup = d.find("duplicate key");
  return bad_token(fmt::format("{} is not valid JSON{}", what, dup == std::string::npos ? "" : ": " + d.substr(dup)));
}

std::int64_t unix_seconds(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}

}  // namespace

// ---- jwks --------------------------------------------------------------------------------

struct jwks::impl {
  std::vector<jwk_key> keys;
};

jwks::jwks(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
jwks::~jwks() = default;
jwks::jwks(jwks&&) noexcept = default;
jwks& jwks::operator=(jwks&&) noexcept = default;
std::size_t jwks::size() const noexcept { return impl_->keys.size(); }

result<jwks> jwks::parse(std::string_view text) {
  if (text.size() > max_jwks_size)
    return bad_token(fmt::format("JWKS is too large ({} bytes, at most {})", text.size(), max_jwks_size));
  auto doc = detail::parse_json_strict(text, "JWKS");
  if (!doc) return std::move(doc).error();
  if (!doc->is_object()) return bad_token("JWKS is not a JSON object");
  auto keys = detail::require_field(*doc, "keys", json::value_t::array, "JWKS");
  if (!keys) return std::move(keys).error();
  if ((*keys)->size() > max_jwks_keys)
    return bad_token(fmt::format("JWKS has {} keys (at most {})", (*keys)->size(), max_jwks_keys));
  auto p = std::make_unique<impl>();
  for (std::size_t i = 0; i < (*keys)->size(); ++i) {
    auto k = parse_jwk((**keys)[i], i);
    if (!k) return std::move(k).error();
    if (*k) p->keys.push_back(std::move(**k));
  }
  if (p->keys.empty())
    return bad_token(fmt::format("JWKS has no usable key ({} keys; drun verifies with OKP/Ed25519, EC/P-256 and RSA "
                                 "signature keys)",
                                 (*keys)->size()));
  return jwks(std::move(p));
}

result<jwks> jwks::load(const std::filesystem::path& file) {
  auto text = detail::read_file(file, max_jwks_size, errc::malformed_bundle);
  if (!text) return std::move(text).error().with_path(file.string());
  auto set = parse(*text);
  if (!set) return std::move(set).error().with_path(file.string());
  return set;
}

// ---- verify ------------------------------------------------------------------------------

}  // namespace drun

namespace drun::metrics {

// By the messages read_claims() and verify_token() write: malformed input is malformed_bundle,
// and each claim check's refusal begins with its own words.
token_failure token_failure_of(const error& e) noexcept {
  if (e.code() != errc::signature_invalid) return token_failure::malformed;
  std::string_view d = e.detail();
  auto starts = [&](std::string_view p) { return d.substr(0, p.size()) == p; };
  if (starts("token expired") || starts("token is not yet valid")) return token_failure::expired;
  if (starts("wrong audience")) return token_failure::audience;
  if (starts("wrong issuer") || starts("token has no \"iss\"")) return token_failure::issuer;
  if (starts("token is bound") || starts("token is not bound")) return token_failure::binding;
  return token_failure::signature;  // alg, kid, key type, signature, confirmation method
}

}  // namespace drun::metrics

namespace drun {

result<token_claims> verify_token(std::string_view token, const jwks& keys, const token_check& check) {
  if (check.audience.empty())
    return error(errc::invalid_argument, "token check has no audience: say which audience tokens must be for");
  if (check.clock_skew < std::chrono::seconds(0))
    return error(errc::invalid_argument, "token check has a negative clock skew");
  if (!check.certificate_thumbprint.empty() && !valid_thumbprint(check.certificate_thumbprint))
    return error(errc::invalid_argument,
                 "token check's certificate thumbprint is not the base64url SHA-256 of a certificate");
  if (token.size() > max_token_size)
    return bad_token(fmt::format("token is {} bytes; at most {} are accepted", token.size(), max_token_size));
  auto dot1 = token.find('.');
  auto dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos || token.find('.', dot2 + 1) != std::string_view::npos)
    return bad_token("not a JWT: a compact JWS has three base64url parts separated by dots");
  auto header_b64 = token.substr(0, dot1);
  auto payload_b64 = token.substr(dot1 + 1, dot2 - dot1 - 1);
  auto sig_b64 = token.substr(dot2 + 1);
  if (header_b64.empty() || payload_b64.empty())
    return bad_token("not a JWT: the header or payload part is empty");

  // Header.
  auto header_text = b64url_decode(header_b64);
  if (!header_text) return bad_token("not a JWT: the header is not valid base64url");
  auto header = parse_part(*header_text, "token header");
  if (!header) return std::move(header).error();
  if (!header->is_object()) return bad_token("token header is not a JSON object");
  auto alg_field = detail::require_field(*header, "alg", json::value_t::string, "token header");
  if (!alg_field) return std::move(alg_field).error();
  const auto& alg = (*alg_field)->get_ref<const std::string&>();
  auto kind = kind_for_alg(alg);
  if (!kind) {
    std::string lower(alg);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower == "none")
      return refused(fmt::format("unsupported alg \"{}\": unsigned tokens are never accepted", printable(alg)));
    if (lower.rfind("hs", 0) == 0)
      return refused(fmt::format("unsupported alg \"{}\": HMAC tokens cannot be checked against public keys",
                                 printable(alg)));
    return refused(fmt::format("unsupported alg \"{}\" (EdDSA, ES256 or RS256 expected)", printable(alg)));
  }
  // RFC 7515 4.1.11: a recipient must refuse critical extensions it does not understand, and
  // drun understands none (b64=false among them, which would change what is signed).
  if (header->contains("crit"))
    return refused("token header has critical extensions (\"crit\"), which drun does not support");
  if (const auto* typ = detail::optional_field(*header, "typ")) {
    // "JWT" (RFC 7519 5.1) and the access-token type of RFC 9068, which OIDC providers issue.
    std::string t = typ->is_string() ? typ->get<std::string>() : std::string();
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
    if (t.rfind("application/", 0) == 0) t = t.substr(12);
    if (t != "jwt" && t != "at+jwt")
      return bad_token(fmt::format("token header typ \"{}\" is not JWT",
                                   typ->is_string() ? printable(typ->get<std::string>()) : typ->type_name()));
  }
  // Keys come only from the configured set: "jwk", "jku", "x5u" and "x5c" in a header are never
  // used, since a key named by the token itself proves nothing.
  std::vector<const jwk_key*> candidates;
  const auto& all = keys.internals().keys;
  if (const auto* kid_field = detail::optional_field(*header, "kid")) {
    if (!kid_field->is_string()) return bad_token("token header kid is not a string");
    const auto& kid = kid_field->get_ref<const std::string&>();
    for (const auto& k : all)
      if (k.kid == kid) candidates.push_back(&k);
    if (candidates.empty()) return refused(fmt::format("no key with kid \"{}\" in the key set", printable(kid)));
    auto fits = [&](const jwk_key* k) { return k->kind == *kind; };
    if (std::none_of(candidates.begin(), candidates.end(), fits))
      return refused(fmt::format("key \"{}\" is {} key and cannot verify an {} token", printable(kid),
                                 kind_name(candidates[0]->kind), alg));
    std::erase_if(candidates, [&](const jwk_key* k) { return !fits(k); });
  } else {
    for (const auto& k : all)
      if (k.kind == *kind) candidates.push_back(&k);
    if (candidates.empty()) return refused(fmt::format("no {} key in the key set", alg));
  }

  // Signature, over the ASCII of "header.payload" exactly as sent.
  auto signature = b64url_decode(sig_b64);
  if (!signature) return bad_token("not a JWT: the signature is not valid base64url");
  auto signing_input = token.substr(0, dot2);
  bool verified = std::any_of(candidates.begin(), candidates.end(),
                              [&](const jwk_key* k) { return verify_with(*k, signing_input, *signature); });
  if (!verified)
    return refused(fmt::format("bad signature: no {} key of the key set verifies this token ({} tried)", alg,
                               candidates.size()));

  // Claims, now that they are authenticated.
  auto payload_text = b64url_decode(payload_b64);
  if (!payload_text) return bad_token("not a JWT: the payload is not valid base64url");
  auto payload = parse_part(*payload_text, "token payload");
  if (!payload) return std::move(payload).error();
  if (!payload->is_object()) return bad_token("token payload is not a JSON object");
  return read_claims(*payload, check);
}

// ---- issue -------------------------------------------------------------------------------

result<std::string> issue_token(const private_key& key, const token_request& request) {
  if (key.type() != key_type::ed25519)
    return error(errc::invalid_argument,
                 fmt::format("drun issues EdDSA tokens with Ed25519 keys; this is a {} key", to_string(key.type())));
  if (request.subject.empty()) return error(errc::invalid_argument, "a token needs a subject");
  if (request.audience.empty()) return error(errc::invalid_argument, "a token needs an audience");
  if (request.ttl <= std::chrono::seconds(0) || request.ttl > max_ttl)
    return error(errc::invalid_argument,
                 fmt::format("token lifetime {} s is outside (0, {} s]", request.ttl.count(),
                             std::chrono::seconds(max_ttl).count()));
  if (!request.certificate_thumbprint.empty() && !valid_thumbprint(request.certificate_thumbprint))
    return error(errc::invalid_argument,
                 "the certificate thumbprint to bind the token to is not the base64url SHA-256 of a certificate "
                 "(43 characters)");
  for (const auto& a : request.artifacts)
    if (!valid_artifact_grant(a))
      return error(errc::invalid_argument,
                   fmt::format("\"{}\" is neither \"*\" nor a 64-digit lowercase hex artifact id", printable(a)));
  auto jwk = jwk_of(key.public_key());
  if (!jwk) return std::move(jwk).error();

  auto iat = unix_seconds(now_or(request.now));
  ojson header{{"alg", "EdDSA"}, {"kid", jwk->thumbprint}, {"typ", "JWT"}};
  ojson payload;
  if (!request.issuer.empty()) payload["iss"] = request.issuer;
  payload["sub"] = request.subject;
  payload["aud"] = request.audience;
  payload["iat"] = iat;
  payload["nbf"] = iat;
  payload["exp"] = iat + request.ttl.count();
  // An empty list is left out: present, it would narrow access to nothing.
  if (!request.artifacts.empty()) payload["drun_artifacts"] = request.artifacts;
  if (!request.certificate_thumbprint.empty()) payload["cnf"] = ojson{{"x5t#S256", request.certificate_thumbprint}};

  std::string input = b64url_encode(header.dump()) + "." + b64url_encode(payload.dump());
  auto sig = detail::key_access::sign(key, as_bytes(input));
  if (!sig) return std::move(sig).error();
  return input + "." + b64url_encode(*sig);
}

// ---- certificate thumbprints (RFC 8705 3.1) -----------------------------------------------

std::string certificate_thumbprint(std::span<const std::byte> der) {
  return b64url_encode(hash(hash_algorithm::sha256, der).bytes());
}

result<std::string> certificate_thumbprint(const std::filesystem::path& pem_file) {
  constexpr std::size_t max_pem_size = 1 << 20;
  auto text = detail::read_file(pem_file, max_pem_size, errc::key_error);
  if (!text) return std::move(text).error().with_path(pem_file.string());
  auto bio = detail::memory_bio(*text);
  detail::x509_ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    detail::openssl_errors();
    return error(errc::key_error, "no PEM certificate in it").with_path(pem_file.string());
  }
  unsigned char* der = nullptr;
  int len = i2d_X509(cert.get(), &der);
  if (len <= 0) return error(errc::key_error, "cannot encode the certificate: " + detail::openssl_errors());
  auto out = certificate_thumbprint(std::as_bytes(std::span(der, static_cast<std::size_t>(len))));
  OPENSSL_free(der);
  return out;
}

result<std::string> jwks_for(const public_key& key) {
  auto jwk = jwk_of(key);
  if (!jwk) return std::move(jwk).error();
  auto k = jwk->members;
  k["kid"] = jwk->thumbprint;
  k["use"] = "sig";
  k["alg"] = key.type() == key_type::ed25519 ? "EdDSA" : "ES256";
  ojson set{{"keys", ojson::array({k})}};
  return set.dump(2) + "\n";
}

}  // namespace drun
