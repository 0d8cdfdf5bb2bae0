// JWT verification and minting: tokens drun mints, tokens signed here with OpenSSL directly (ES256,
// RS256, EdDSA with hand-made headers), RFC 8037 known answers, certificate binding (RFC 8705
// cnf x5t#S256) and issuer checks, and every refusal with its code and the part of the message
// that says which check failed.
#include <drun/hash.hpp>
#include <drun/token.hpp>

#include "detail/encoding.hpp"
#include "key_data.hpp"
#include "support.hpp"

#include <nlohmann/json.hpp>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <functional>
#include <memory>

using namespace drun;
using namespace std::chrono_literals;
using json = nlohmann::json;
using sys_clock = std::chrono::system_clock;

namespace {

// ---- the test's own JOSE plumbing, independent of src/auth ---------------------------------

std::string b64url(std::string_view bytes) {
  auto s = detail::base64_encode(as_bytes(bytes));
  while (!s.empty() && s.back() == '=') s.pop_back();
  for (auto& c : s) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return s;
}

std::string b64url_bytes(const std::vector<unsigned char>& v) {
  return b64url(std::string_view(reinterpret_cast<const char*>(v.data()), v.size()));
}

std::string unb64url(std::string s) {
  for (auto& c : s) c = c == '-' ? '+' : c == '_' ? '/' : c;
  while (s.size() % 4) s.push_back('=');
  auto out = detail::base64_decode(s);
  REQUIRE(out);
  return *out;
}

struct pkey_deleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using pkey = std::unique_ptr<EVP_PKEY, pkey_deleter>;

pkey gen_ec() { return pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")); }
pkey gen_rsa(std::size_t bits) { return pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", bits)); }
pkey gen_ed25519() { return pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")); }

std::string evp_sign(EVP_PKEY* k, const char* md, std::string_view msg) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  REQUIRE(ctx);
  std::size_t len = 0;
  REQUIRE(EVP_DigestSignInit_ex(ctx, nullptr, md, nullptr, nullptr, k, nullptr) == 1);
  REQUIRE(EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1);
  std::string sig(len, '\0');
  REQUIRE(EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &len,
                         reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1);
  EVP_MD_CTX_free(ctx);
  sig.resize(len);
  return sig;
}

// DER ECDSA-Sig-Value -> JWS r || s.
std::string der_to_raw(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
  REQUIRE(sig);
  std::string raw(64, '\0');
  BN_bn2binpad(ECDSA_SIG_get0_r(sig), reinterpret_cast<unsigned char*>(raw.data()), 32);
  BN_bn2binpad(ECDSA_SIG_get0_s(sig), reinterpret_cast<unsigned char*>(raw.data() + 32), 32);
  ECDSA_SIG_free(sig);
  return raw;
}

std::vector<unsigned char> bn_param(EVP_PKEY* k, const char* name, int pad = 0) {
  BIGNUM* bn = nullptr;
  REQUIRE(EVP_PKEY_get_bn_param(k, name, &bn) == 1);
  std::vector<unsigned char> out(pad ? static_cast<std::size_t>(pad) : static_cast<std::size_t>(BN_num_bytes(bn)));
  if (pad) BN_bn2binpad(bn, out.data(), pad);
  else BN_bn2bin(bn, out.data());
  BN_free(bn);
  return out;
}

json jwk_ec(EVP_PKEY* k, const std::string& kid) {
  json j{{"kty", "EC"}, {"crv", "P-256"}, {"x", b64url_bytes(bn_param(k, OSSL_PKEY_PARAM_EC_PUB_X, 32))},
         {"y", b64url_bytes(bn_param(k, OSSL_PKEY_PARAM_EC_PUB_Y, 32))}};
  if (!kid.empty()) j["kid"] = kid;
  return j;
}

json jwk_rsa(EVP_PKEY* k, const std::string& kid) {
  json j{{"kty", "RSA"}, {"n", b64url_bytes(bn_param(k, OSSL_PKEY_PARAM_RSA_N))},
         {"e", b64url_bytes(bn_param(k, OSSL_PKEY_PARAM_RSA_E))}};
  if (!kid.empty()) j["kid"] = kid;
  return j;
}

json jwk_ed25519(EVP_PKEY* k, const std::string& kid) {
  std::vector<unsigned char> raw(32);
  std::size_t len = raw.size();
  REQUIRE(EVP_PKEY_get_raw_public_key(k, raw.data(), &len) == 1);
  json j{{"kty", "OKP"}, {"crv", "Ed25519"}, {"x", b64url_bytes(raw)}};
  if (!kid.empty()) j["kid"] = kid;
  return j;
}

jwks set_of(const std::vector<json>& keys) {
  json arr = json::array();
  for (const auto& k : keys) arr.push_back(k);
  auto set = jwks::parse(json{{"keys", arr}}.dump());
  REQUIRE(set);
  return std::move(set).value();
}

// Signs header.payload with `key` the way `alg` says, entirely in the test.
std::string sign_jws(const json& header, const json& payload, EVP_PKEY* key, const std::string& alg) {
  std::string input = b64url(header.dump()) + "." + b64url(payload.dump());
  std::string sig;
  if (alg == "ES256") sig = der_to_raw(evp_sign(key, "SHA256", input));
  else if (alg == "RS256") sig = evp_sign(key, "SHA256", input);
  else sig = evp_sign(key, nullptr, input);  // EdDSA
  return input + "." + b64url(sig);
}

const sys_clock::time_point t0 = sys_clock::time_point(std::chrono::seconds(1'750'000'000));

json claims_at(sys_clock::time_point now, std::string aud = "peers") {
  auto s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  return json{{"sub", "loader"}, {"aud", std::move(aud)}, {"iat", s}, {"exp", s + 600}};
}

token_check check_at(sys_clock::time_point now, std::string aud = "peers") {
  token_check c;
  c.audience = std::move(aud);
  c.now = now;
  return c;
}

void check_fails(const result<token_claims>& r, errc code, const std::string& fragment, const std::string& token = {}) {
  REQUIRE_FALSE(r.has_value());
  CAPTURE(r.error().message());
  CHECK(r.error().code() == code);
  CHECK(r.error().message().find(fragment) != std::string::npos);
  // Never the token, nor its signature, in a message.
  if (!token.empty()) {
    CHECK(r.error().message().find(token) == std::string::npos);
    auto sig = token.substr(token.rfind('.') + 1);
    if (sig.size() > 8) CHECK(r.error().message().find(sig) == std::string::npos);
  }
}

struct minted {
  private_key key = std::move(private_key::generate(key_type::ed25519)).value();
  jwks keys = std::move(jwks::parse(std::move(jwks_for(key.public_key())).value())).value();
  std::string mint(sys_clock::time_point now, std::vector<std::string> artifacts = {"*"}, std::string aud = "peers") {
    token_request req;
    req.subject = "system:serviceaccount:ml:loader";
    req.audience = std::move(aud);
    req.artifacts = std::move(artifacts);
    req.ttl = 15min;
    req.now = now;
    auto t = issue_token(key, req);
    REQUIRE(t);
    return *t;
  }
};

const std::string id_a(64, 'a');
const std::string id_b(64, 'b');

}  // namespace

TEST_CASE("issue_token makes an EdDSA JWT that verify_token accepts") {
  minted m;
  auto token = m.mint(t0, {id_a, id_b});
  CHECK(std::count(token.begin(), token.end(), '.') == 2);
  CHECK(token.find('=') == std::string::npos);
  auto header = json::parse(unb64url(token.substr(0, token.find('.'))));
  CHECK(header["alg"] == "EdDSA");
  CHECK(header["typ"] == "JWT");
  auto set = json::parse(*jwks_for(m.key.public_key()));
  REQUIRE(set["keys"].size() == 1);
  CHECK(set["keys"][0]["kid"] == header["kid"]);
  CHECK(set["keys"][0]["use"] == "sig");
  CHECK(set["keys"][0]["alg"] == "EdDSA");
  CHECK(set["keys"][0]["kty"] == "OKP");

  auto c = verify_token(token, m.keys, check_at(t0 + 1min));
  REQUIRE(c);
  CHECK(c->subject == "system:serviceaccount:ml:loader");
  CHECK(c->issuer == "drun");
  CHECK(c->audience == std::vector<std::string>{"peers"});
  CHECK(c->artifacts == std::vector<std::string>{id_a, id_b});
  CHECK(c->expires == t0 + 15min);
  CHECK(c->not_before == t0);
  CHECK(c->claims.at("drun_artifacts") == std::vector<std::string>{id_a, id_b});
  CHECK(c->claims.at("exp") == std::vector<std::string>{std::to_string(1'750'000'000 + 900)});

  // The real clock too (check.now left at the epoch).
  token_request req;
  req.subject = "s";
  req.audience = "peers";
  auto now_token = issue_token(m.key, req);
  REQUIRE(now_token);
  token_check live;
  live.audience = "peers";
  CHECK(verify_token(*now_token, m.keys, live));
  // An empty artifacts request leaves the claim out altogether.
  auto first = now_token->find('.'), last = now_token->rfind('.');
  CHECK(json::parse(unb64url(now_token->substr(first + 1, last - first - 1))).contains("drun_artifacts") == false);
}

TEST_CASE("a token that was changed does not verify") {
  minted m;
  auto token = m.mint(t0);
  auto dot1 = token.find('.'), dot2 = token.rfind('.');
  SUBCASE("payload with another subject, signature kept") {
    auto payload = json::parse(unb64url(token.substr(dot1 + 1, dot2 - dot1 - 1)));
    payload["sub"] = "admin";
    auto forged = token.substr(0, dot1 + 1) + b64url(payload.dump()) + token.substr(dot2);
    check_fails(verify_token(forged, m.keys, check_at(t0)), errc::signature_invalid, "bad signature", forged);
  }
  SUBCASE("a flipped signature bit") {
    auto sig = unb64url(token.substr(dot2 + 1));
    sig[10] = static_cast<char>(sig[10] ^ 1);
    auto forged = token.substr(0, dot2 + 1) + b64url(sig);
    check_fails(verify_token(forged, m.keys, check_at(t0)), errc::signature_invalid, "bad signature", forged);
  }
  SUBCASE("a truncated signature") {
    auto forged = token.substr(0, token.size() - 4);
    auto r = verify_token(forged, m.keys, check_at(t0));
    REQUIRE_FALSE(r);
    CHECK((r.error().code() == errc::signature_invalid || r.error().code() == errc::malformed_bundle));
  }
  SUBCASE("another key's set") {
    minted other;
    check_fails(verify_token(token, other.keys, check_at(t0)), errc::signature_invalid, "no key with kid", token);
  }
}

TEST_CASE("expiry and not-before, with clock skew") {
  minted m;
  auto token = m.mint(t0);  // nbf t0, exp t0 + 15 min
  auto exp = t0 + 15min;
  check_fails(verify_token(token, m.keys, check_at(exp + 61s)), errc::signature_invalid, "expired", token);
  CHECK(verify_token(token, m.keys, check_at(exp + 30s)));  // within the 60 s skew
  auto strict = check_at(exp + 30s);
  strict.clock_skew = 0s;
  check_fails(verify_token(token, m.keys, strict), errc::signature_invalid, "expired");
  check_fails(verify_token(token, m.keys, check_at(t0 - 2min)), errc::signature_invalid, "not yet valid", token);
  CHECK(verify_token(token, m.keys, check_at(t0 - 30s)));
  auto strict_nbf = check_at(t0 - 1s);
  strict_nbf.clock_skew = 0s;
  check_fails(verify_token(token, m.keys, strict_nbf), errc::signature_invalid, "not yet valid");
}

TEST_CASE("audience") {
  minted m;
  auto token = m.mint(t0, {"*"}, "peers");
  check_fails(verify_token(token, m.keys, check_at(t0, "other")), errc::signature_invalid, "wrong audience", token);
  check_fails(verify_token(token, m.keys, check_at(t0, "")), errc::invalid_argument, "audience");
  auto negative = check_at(t0);
  negative.clock_skew = -1s;
  check_fails(verify_token(token, m.keys, negative), errc::invalid_argument, "clock skew");

  // "aud" as an array, and a token with no "aud" at all, signed here.
  auto ed = gen_ed25519();
  auto keys = set_of({jwk_ed25519(ed.get(), "k")});
  auto payload = claims_at(t0);
  payload["aud"] = {"a", "peers", "b"};
  CHECK(verify_token(sign_jws({{"alg", "EdDSA"}, {"kid", "k"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)));
  payload.erase("aud");
  check_fails(verify_token(sign_jws({{"alg", "EdDSA"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)),
              errc::signature_invalid, "wrong audience");
  payload["aud"] = 7;
  check_fails(verify_token(sign_jws({{"alg", "EdDSA"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)),
              errc::malformed_bundle, "aud");
}

TEST_CASE("alg none and HMAC are refused before any key is looked at") {
  minted m;
  auto payload = b64url(claims_at(t0).dump());
  auto none = b64url(R"({"alg":"none","typ":"JWT"})") + "." + payload + ".";
  check_fails(verify_token(none, m.keys, check_at(t0)), errc::signature_invalid, "unsupported alg \"none\"");
  auto none_upper = b64url(R"({"alg":"NONE"})") + "." + payload + ".";
  check_fails(verify_token(none_upper, m.keys, check_at(t0)), errc::signature_invalid, "unsupported alg \"NONE\"");
  auto hs = b64url(R"({"alg":"HS256","typ":"JWT"})") + "." + payload + "." + b64url(std::string(32, 'x'));
  check_fails(verify_token(hs, m.keys, check_at(t0)), errc::signature_invalid, "unsupported alg \"HS256\"", hs);
  auto ps = b64url(R"({"alg":"PS256"})") + "." + payload + "." + b64url(std::string(32, 'x'));
  check_fails(verify_token(ps, m.keys, check_at(t0)), errc::signature_invalid, "unsupported alg \"PS256\"");
  auto noalg = b64url(R"({"typ":"JWT"})") + "." + payload + "." + b64url(std::string(32, 'x'));
  check_fails(verify_token(noalg, m.keys, check_at(t0)), errc::malformed_bundle, "alg");
}

TEST_CASE("key selection: kid, and alg must fit the key type") {
  auto ed = gen_ed25519();
  auto rsa = gen_rsa(2048);
  auto ec = gen_ec();
  auto keys = set_of({jwk_rsa(rsa.get(), "rsa-1"), jwk_ed25519(ed.get(), "ed-1"), jwk_ec(ec.get(), "ec-1")});
  CHECK(keys.size() == 3);
  auto payload = claims_at(t0);
  auto ed_token = [&](const json& header) { return sign_jws(header, payload, ed.get(), "EdDSA"); };

  CHECK(verify_token(ed_token({{"alg", "EdDSA"}, {"kid", "ed-1"}}), keys, check_at(t0)));
  // No kid: every key of the alg's type is tried.
  CHECK(verify_token(sign_jws({{"alg", "EdDSA"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)));
  check_fails(verify_token(ed_token({{"alg", "EdDSA"}, {"kid", "nope"}}), keys, check_at(t0)),
              errc::signature_invalid, "no key with kid \"nope\"");
  // An RSA key never verifies an EdDSA token, whatever the header says.
  check_fails(verify_token(ed_token({{"alg", "EdDSA"}, {"kid", "rsa-1"}}), keys, check_at(t0)),
              errc::signature_invalid, "is an RSA key and cannot verify an EdDSA token");
  // ... nor does an EdDSA key an ES256 one (the classic alg-confusion shape).
  auto es_token = sign_jws({{"alg", "ES256"}, {"kid", "ed-1"}}, payload, ec.get(), "ES256");
  check_fails(verify_token(es_token, keys, check_at(t0)),
              errc::signature_invalid, "cannot verify an ES256 token");
  auto only_rsa = set_of({jwk_rsa(rsa.get(), "")});
  check_fails(verify_token(sign_jws({{"alg", "EdDSA"}}, payload, ed.get(), "EdDSA"), only_rsa, check_at(t0)),
              errc::signature_invalid, "no EdDSA key in the key set");
  // The right type but the wrong key.
  auto other_ed = gen_ed25519();
  check_fails(verify_token(sign_jws({{"alg", "EdDSA"}, {"kid", "ed-1"}}, payload, other_ed.get(), "EdDSA"), keys,
                           check_at(t0)),
              errc::signature_invalid, "bad signature");
  // A key in the header is never used.
  auto self_signed =
      sign_jws({{"alg", "EdDSA"}, {"jwk", jwk_ed25519(other_ed.get(), "")}}, payload, other_ed.get(), "EdDSA");
  check_fails(verify_token(self_signed, keys, check_at(t0)), errc::signature_invalid, "bad signature");
}

TEST_CASE("ES256: raw r||s signatures made with OpenSSL in the test") {
  auto ec = gen_ec();
  auto keys = set_of({jwk_ec(ec.get(), "ec-1")});
  auto payload = claims_at(t0);
  payload["groups"] = {"ml", "ops"};
  auto token = sign_jws({{"alg", "ES256"}, {"kid", "ec-1"}, {"typ", "JWT"}}, payload, ec.get(), "ES256");
  auto c = verify_token(token, keys, check_at(t0));
  REQUIRE(c);
  CHECK(c->subject == "loader");
  CHECK(c->claims.at("groups") == std::vector<std::string>{"ml", "ops"});
  CHECK(verify_token(sign_jws({{"alg", "ES256"}}, payload, ec.get(), "ES256"), keys, check_at(t0)));

  // A DER signature (what OpenSSL emits) is not a JWS ES256 signature.
  std::string input = b64url(json{{"alg", "ES256"}}.dump()) + "." + b64url(payload.dump());
  auto der_token = input + "." + b64url(evp_sign(ec.get(), "SHA256", input));
  check_fails(verify_token(der_token, keys, check_at(t0)), errc::signature_invalid, "bad signature");
  // Another P-256 key.
  auto other = gen_ec();
  check_fails(verify_token(sign_jws({{"alg", "ES256"}}, payload, other.get(), "ES256"), keys, check_at(t0)),
              errc::signature_invalid, "bad signature");
}

TEST_CASE("RS256: PKCS#1 v1.5 SHA-256 signatures made with OpenSSL in the test") {
  auto rsa = gen_rsa(2048);
  auto keys = set_of({jwk_rsa(rsa.get(), "r")});
  auto payload = claims_at(t0);
  payload["iss"] = "https://issuer.example";
  auto c = verify_token(sign_jws({{"alg", "RS256"}, {"kid", "r"}}, payload, rsa.get(), "RS256"), keys, check_at(t0));
  REQUIRE(c);
  CHECK(c->issuer == "https://issuer.example");
  auto other = gen_rsa(2048);
  auto wrong_key = sign_jws({{"alg", "RS256"}, {"kid", "r"}}, payload, other.get(), "RS256");
  check_fails(verify_token(wrong_key, keys, check_at(t0)),
              errc::signature_invalid, "bad signature");

  auto weak = gen_rsa(1024);
  auto r = jwks::parse(json{{"keys", {jwk_rsa(weak.get(), "weak")}}}.dump());
  CHECK(test::error_of(r).code() == errc::key_error);
  CHECK(r.error().message().find("at least 2048 bits") != std::string::npos);
}

TEST_CASE("size and shape are checked before anything else") {
  minted m;
  auto token = m.mint(t0);
  std::string big = token + std::string(max_token_size, 'A');
  check_fails(verify_token(big, m.keys, check_at(t0)), errc::malformed_bundle, "at most 8192", big);

  auto dot1 = token.find('.'), dot2 = token.rfind('.');
  auto header = token.substr(0, dot1), payload = token.substr(dot1 + 1, dot2 - dot1 - 1), sig = token.substr(dot2 + 1);
  for (const auto& bad : {header + "." + payload, token + ".x", header + ".." + sig, "." + payload + "." + sig,
                          std::string("not a token")})
    check_fails(verify_token(bad, m.keys, check_at(t0)), errc::malformed_bundle, "not a JWT", bad);
  // Padding, the standard alphabet, stray characters: refused in any part.
  check_fails(verify_token(header + "=." + payload + "." + sig, m.keys, check_at(t0)), errc::malformed_bundle,
              "header is not valid base64url");
  check_fails(verify_token(header + "." + payload + "." + sig + "==", m.keys, check_at(t0)), errc::malformed_bundle,
              "signature is not valid base64url");
  auto std_alphabet = sig;
  std::replace(std_alphabet.begin(), std_alphabet.end(), '-', '+');
  std::replace(std_alphabet.begin(), std_alphabet.end(), '_', '/');
  if (std_alphabet != sig)
    check_fails(verify_token(header + "." + payload + "." + std_alphabet, m.keys, check_at(t0)), errc::malformed_bundle,
                "base64url");
  check_fails(verify_token(header + "." + payload + "." + sig.substr(0, 5) + "!" + sig.substr(6), m.keys, check_at(t0)),
              errc::malformed_bundle, "signature is not valid base64url");
  // Header JSON: not an object, duplicate keys.
  check_fails(verify_token(b64url("[1]") + "." + payload + "." + sig, m.keys, check_at(t0)), errc::malformed_bundle,
              "not a JSON object");
  check_fails(verify_token(b64url(R"({"alg":"EdDSA","alg":"none"})") + "." + payload + "." + sig, m.keys, check_at(t0)),
              errc::malformed_bundle, "duplicate key");
}

TEST_CASE("header rules: crit, typ") {
  auto ed = gen_ed25519();
  auto keys = set_of({jwk_ed25519(ed.get(), "")});
  auto payload = claims_at(t0);
  auto crit = sign_jws({{"alg", "EdDSA"}, {"crit", {"exp"}}, {"exp", 1}}, payload, ed.get(), "EdDSA");
  check_fails(verify_token(crit, keys, check_at(t0)),
              errc::signature_invalid, "crit");
  auto jose = sign_jws({{"alg", "EdDSA"}, {"typ", "JOSE"}}, payload, ed.get(), "EdDSA");
  check_fails(verify_token(jose, keys, check_at(t0)),
              errc::malformed_bundle, "typ \"JOSE\" is not JWT");
  CHECK(verify_token(sign_jws({{"alg", "EdDSA"}, {"typ", "jwt"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)));
  CHECK(verify_token(sign_jws({{"alg", "EdDSA"}, {"typ", "at+jwt"}}, payload, ed.get(), "EdDSA"), keys, check_at(t0)));
}

TEST_CASE("claims: required, typed, and what policies see") {
  auto ed = gen_ed25519();
  auto keys = set_of({jwk_ed25519(ed.get(), "")});
  auto sign = [&](const json& p) { return sign_jws({{"alg", "EdDSA"}}, p, ed.get(), "EdDSA"); };
  auto p = claims_at(t0);
  p.erase("exp");
  check_fails(verify_token(sign(p), keys, check_at(t0)), errc::malformed_bundle, "\"exp\"");
  p = claims_at(t0);
  p["exp"] = "tomorrow";
  check_fails(verify_token(sign(p), keys, check_at(t0)), errc::malformed_bundle, "\"exp\" is not a number");
  p = claims_at(t0);
  p.erase("sub");
  check_fails(verify_token(sign(p), keys, check_at(t0)), errc::malformed_bundle, "sub");
  p = claims_at(t0);
  p["drun_artifacts"] = {"not-an-id"};
  check_fails(verify_token(sign(p), keys, check_at(t0)), errc::malformed_bundle, "drun_artifacts");

  p = claims_at(t0);
  p["exp"] = 1'750'000'600.5;  // NumericDate may be fractional
  p["team"] = "ml";
  p["level"] = 3;
  p["admin"] = false;
  p["groups"] = {"a", 2, true};
  p["nested"] = {{"x", 1}};
  p["mixed"] = {"a", {{"x", 1}}};
  p["drun_artifacts"] = {id_a};
  auto c = verify_token(sign(p), keys, check_at(t0));
  REQUIRE(c);
  CHECK(c->claims.at("team") == std::vector<std::string>{"ml"});
  CHECK(c->claims.at("level") == std::vector<std::string>{"3"});
  CHECK(c->claims.at("admin") == std::vector<std::string>{"false"});
  CHECK(c->claims.at("groups") == std::vector<std::string>{"a", "2", "true"});
  CHECK(c->claims.count("nested") == 0);
  CHECK(c->claims.count("mixed") == 0);
  CHECK(c->artifacts == std::vector<std::string>{id_a});
  CHECK(c->expires == t0 + 600s + 500ms);
  CHECK(c->not_before == sys_clock::time_point{});

  // A payload that is not an object, once the signature is fine.
  check_fails(verify_token(sign(json::array({1, 2})), keys, check_at(t0)), errc::malformed_bundle, "not a JSON object");
}

TEST_CASE("JWKS parsing: skipped keys, unusable sets, broken keys") {
  auto ed = gen_ed25519();
  auto ok = jwk_ed25519(ed.get(), "ed");
  auto enc = ok;
  enc["use"] = "enc";
  json x25519{{"kty", "OKP"}, {"crv", "X25519"}, {"x", ok["x"]}};
  json p384{{"kty", "EC"}, {"crv", "P-384"}, {"x", "AA"}, {"y", "AA"}};
  json oct{{"kty", "oct"}, {"k", "c2VjcmV0"}};
  auto wrong_alg = ok;
  wrong_alg["alg"] = "RS256";
  auto set = jwks::parse(json{{"keys", {enc, x25519, p384, wrong_alg, ok}}}.dump());
  REQUIRE(set);
  CHECK(set->size() == 1);

  auto none = jwks::parse(json{{"keys", {enc, x25519}}}.dump());
  CHECK(test::error_of(none).code() == errc::malformed_bundle);
  CHECK(none.error().message().find("no usable key") != std::string::npos);
  CHECK(test::error_of(jwks::parse(R"({"keys": {}})")).code() == errc::malformed_bundle);
  CHECK(test::error_of(jwks::parse(R"([])")).code() == errc::malformed_bundle);
  CHECK(test::error_of(jwks::parse("{")).code() == errc::malformed_bundle);

  auto short_x = ok;
  short_x["x"] = b64url(std::string(31, 'x'));
  CHECK(test::error_of(jwks::parse(json{{"keys", {short_x}}}.dump())).code() == errc::key_error);
  auto with_d = ok;
  with_d["d"] = b64url(std::string(32, 'x'));
  auto priv = jwks::parse(json{{"keys", {with_d}}}.dump());
  CHECK(test::error_of(priv).code() == errc::key_error);
  CHECK(priv.error().message().find("private key material") != std::string::npos);
  CHECK(test::error_of(jwks::parse(json{{"keys", {oct}}}.dump())).code() == errc::key_error);  // "k" is a secret

  // A P-256 point that is not on the curve.
  auto ec = gen_ec();
  auto off = jwk_ec(ec.get(), "");
  auto y = unb64url(off["y"].get<std::string>());
  y[31] = static_cast<char>(y[31] ^ 1);
  off["y"] = b64url(y);
  auto r = jwks::parse(json{{"keys", {off}}}.dump());
  CHECK(test::error_of(r).code() == errc::key_error);
  ERR_clear_error();

  // load(): from a file, with the path in errors.
  test::temp_dir d;
  test::write_file(d / "jwks.json", json{{"keys", {ok}}}.dump());
  CHECK(jwks::load(d / "jwks.json"));
  CHECK(test::error_of(jwks::load(d / "absent.json")).code() == errc::not_found);
  test::write_file(d / "bad.json", "{}");
  auto bad = jwks::load(d / "bad.json");
  CHECK(test::error_of(bad).message().find("bad.json") != std::string::npos);
}

TEST_CASE("RFC 8037 known answers: Ed25519 thumbprint and signature") {
  // RFC 8037 A.2: the public key; A.3: its RFC 7638 thumbprint.
  std::string x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
  std::string spki = std::string("\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00", 12) + unb64url(x);
  auto pem = "-----BEGIN PUBLIC KEY-----\n" + detail::base64_encode(as_bytes(spki)) + "\n-----END PUBLIC KEY-----\n";
  auto pub = public_key::from_pem(pem);
  REQUIRE(pub);
  auto set = json::parse(*jwks_for(*pub));
  CHECK(set["keys"][0]["x"] == x);
  CHECK(set["keys"][0]["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");

  // RFC 8037 A.4: a JWS over a payload that is not JSON. The signature checks out, so the failure
  // is about the payload; one flipped signature character makes it about the signature.
  auto keys = jwks::parse(set.dump());
  REQUIRE(keys);
  std::string jws = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
                    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
  check_fails(verify_token(jws, *keys, check_at(t0)), errc::malformed_bundle, "token payload is not valid JSON");
  auto flipped = jws;
  flipped[flipped.size() - 3] = flipped[flipped.size() - 3] == 'M' ? 'N' : 'M';
  check_fails(verify_token(flipped, *keys, check_at(t0)), errc::signature_invalid, "bad signature");
}

TEST_CASE("jwks_for P-256: drun's own ECDSA key verifies ES256 tokens") {
  auto k = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(k);
  auto text = jwks_for(k->public_key());
  REQUIRE(text);
  auto set = json::parse(*text);
  auto jwk = set["keys"][0];
  CHECK(jwk["kty"] == "EC");
  CHECK(jwk["crv"] == "P-256");
  CHECK(jwk["alg"] == "ES256");
  // RFC 7638 over {"crv","kty","x","y"}, recomputed here.
  std::string canonical = R"({"crv":"P-256","kty":"EC","x":")" + jwk["x"].get<std::string>() + R"(","y":")" +
                          jwk["y"].get<std::string>() + R"("})";
  auto digest = hash(hash_algorithm::sha256, as_bytes(canonical));
  CHECK(jwk["kid"] == b64url(std::string(reinterpret_cast<const char*>(digest.bytes().data()), digest.size())));

  auto keys = jwks::parse(*text);
  REQUIRE(keys);
  std::string input = b64url(json{{"alg", "ES256"}, {"kid", jwk["kid"]}}.dump()) + "." + b64url(claims_at(t0).dump());
  auto der = detail::key_access::sign(*k, as_bytes(input));
  REQUIRE(der);
  CHECK(verify_token(input + "." + b64url(der_to_raw(*der)), *keys, check_at(t0)));

  auto p384 = private_key::generate(key_type::ecdsa_p384);
  REQUIRE(p384);
  CHECK(test::error_of(jwks_for(p384->public_key())).code() == errc::invalid_argument);
}

TEST_CASE("issue_token refuses what it cannot mint safely") {
  minted m;
  token_request req;
  req.subject = "s";
  req.audience = "a";
  auto ec = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(ec);
  auto r = issue_token(*ec, req);
  CHECK(test::error_of(r).code() == errc::invalid_argument);
  CHECK(r.error().message().find("Ed25519") != std::string::npos);
  auto bad = req;
  bad.subject.clear();
  CHECK(test::error_of(issue_token(m.key, bad)).code() == errc::invalid_argument);
  bad = req;
  bad.audience.clear();
  CHECK(test::error_of(issue_token(m.key, bad)).code() == errc::invalid_argument);
  bad = req;
  bad.ttl = 0s;
  CHECK(test::error_of(issue_token(m.key, bad)).code() == errc::invalid_argument);
  bad.ttl = 25h;
  CHECK(test::error_of(issue_token(m.key, bad)).code() == errc::invalid_argument);
  bad = req;
  bad.artifacts = {"ABC"};
  CHECK(test::error_of(issue_token(m.key, bad)).code() == errc::invalid_argument);
  bad.ttl = 24h;
  bad.artifacts = {id_a, "*"};
  CHECK(issue_token(m.key, bad));
}

// ---- certificate binding (RFC 8705) and issuer -------------------------------------------------

namespace {

// A self-signed certificate made here with OpenSSL, written as PEM; returns its DER.
std::string self_signed_pem(const std::filesystem::path& file, const char* cn) {
  pkey k = gen_ec();
  X509* c = X509_new();
  REQUIRE(c);
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), 7);
  X509_gmtime_adj(X509_getm_notBefore(c), -60);
  X509_gmtime_adj(X509_getm_notAfter(c), 3600);
  X509_set_pubkey(c, k.get());
  X509_NAME_add_entry_by_txt(X509_get_subject_name(c), "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn),
                             -1, -1, 0);
  X509_set_issuer_name(c, X509_get_subject_name(c));
  REQUIRE(X509_sign(c, k.get(), EVP_sha256()) > 0);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(bio, c);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  test::write_file(file, std::string(data, static_cast<std::size_t>(len)));
  BIO_free(bio);
  unsigned char* der = nullptr;
  int dlen = i2d_X509(c, &der);
  REQUIRE(dlen > 0);
  std::string out(reinterpret_cast<char*>(der), static_cast<std::size_t>(dlen));
  OPENSSL_free(der);
  X509_free(c);
  return out;
}

// base64url(SHA-256(der)) computed with OpenSSL directly, not with drun's hash or codec.
std::string thumbprint_here(const std::string& der) {
  unsigned char md[32];
  unsigned int len = 0;
  REQUIRE(EVP_Digest(der.data(), der.size(), md, &len, EVP_sha256(), nullptr) == 1);
  return b64url(std::string(reinterpret_cast<const char*>(md), len));
}

}  // namespace

TEST_CASE("certificate_thumbprint: base64url SHA-256 of the DER, from bytes or from a PEM file") {
  test::temp_dir d;
  auto der = self_signed_pem(d / "holder.pem", "holder");
  auto expected = thumbprint_here(der);
  CHECK(expected.size() == 43);
  CHECK(certificate_thumbprint(as_bytes(std::string_view(der))) == expected);
  auto from_file = certificate_thumbprint(d / "holder.pem");
  REQUIRE(from_file);
  CHECK(*from_file == expected);
  // The first certificate of a chain file is the holder's (the leaf a TLS client sends).
  self_signed_pem(d / "other.pem", "other");
  test::write_file(d / "chain.pem", test::read_text(d / "holder.pem") + test::read_text(d / "other.pem"));
  CHECK(*certificate_thumbprint(d / "chain.pem") == expected);

  auto absent = certificate_thumbprint(d / "absent.pem");
  CHECK(test::error_of(absent).code() == errc::not_found);
  test::write_file(d / "junk.pem", "not a certificate");
  auto junk = certificate_thumbprint(d / "junk.pem");
  CHECK(test::error_of(junk).code() == errc::key_error);
  CHECK(junk.error().message().find("junk.pem") != std::string::npos);
  CHECK(junk.error().message().find("no PEM certificate") != std::string::npos);
  ERR_clear_error();
}

TEST_CASE("a bound token is accepted only with the certificate it names") {
  test::temp_dir d;
  auto holder = thumbprint_here(self_signed_pem(d / "holder.pem", "holder"));
  auto thief = thumbprint_here(self_signed_pem(d / "thief.pem", "thief"));
  minted m;
  token_request req;
  req.subject = "node-7";
  req.audience = "peers";
  req.artifacts = {id_a};
  req.now = t0;
  req.certificate_thumbprint = holder;
  auto token = issue_token(m.key, req);
  REQUIRE(token);
  auto dot1 = token->find('.'), dot2 = token->rfind('.');
  auto payload = json::parse(unb64url(token->substr(dot1 + 1, dot2 - dot1 - 1)));
  CHECK(payload["cnf"] == json{{"x5t#S256", holder}});

  auto with = [&](std::string presenter) {
    auto c = check_at(t0);
    c.certificate_thumbprint = std::move(presenter);
    return c;
  };
  auto ok = verify_token(*token, m.keys, with(holder));
  REQUIRE(ok);
  CHECK(ok->certificate_thumbprint == holder);
  CHECK(ok->claims.count("cnf") == 0);  // an object: not something a policy matches on
  // Replayed by a peer that holds another certificate, or by a caller with none.
  check_fails(verify_token(*token, m.keys, with(thief)), errc::signature_invalid,
              "token is bound to another certificate", *token);
  check_fails(verify_token(*token, m.keys, check_at(t0)), errc::signature_invalid,
              "no client certificate was presented", *token);
  // Required binding is satisfied by it.
  auto required = with(holder);
  required.require_binding = true;
  CHECK(verify_token(*token, m.keys, required));
  // Rebinding to the thief's certificate breaks the signature.
  payload["cnf"]["x5t#S256"] = thief;
  auto rebound = token->substr(0, dot1 + 1) + b64url(payload.dump()) + token->substr(dot2);
  check_fails(verify_token(rebound, m.keys, with(thief)), errc::signature_invalid, "bad signature", rebound);
  // Removing cnf breaks it too.
  payload.erase("cnf");
  auto unbound = token->substr(0, dot1 + 1) + b64url(payload.dump()) + token->substr(dot2);
  check_fails(verify_token(unbound, m.keys, with(thief)), errc::signature_invalid, "bad signature", unbound);

  // An unbound token: accepted with or without a certificate, unless binding is required.
  auto bearer = m.mint(t0);
  CHECK(verify_token(bearer, m.keys, with(thief)));
  CHECK(verify_token(bearer, m.keys, check_at(t0)));
  auto strict = with(thief);
  strict.require_binding = true;
  check_fails(verify_token(bearer, m.keys, strict), errc::signature_invalid, "token is not bound to a certificate",
              bearer);
  auto strict_none = check_at(t0);
  strict_none.require_binding = true;
  check_fails(verify_token(bearer, m.keys, strict_none), errc::signature_invalid, "not bound");

  // Thumbprints that are not one: refused when minting and when checking.
  for (std::string bad : {std::string("abc"), holder + "=", holder.substr(0, 42), std::string(43, '+'),
                          b64url(std::string(31, 'x')), b64url(std::string(33, 'x'))}) {
    CAPTURE(bad);
    auto r = req;
    r.certificate_thumbprint = bad;
    auto t = issue_token(m.key, r);
    CHECK(test::error_of(t).code() == errc::invalid_argument);
    CHECK(t.error().message().find("thumbprint") != std::string::npos);
    check_fails(verify_token(bearer, m.keys, with(bad)), errc::invalid_argument, "thumbprint");
  }
}

TEST_CASE("hostile cnf claims are refused with what is wrong") {
  auto ed = gen_ed25519();
  auto keys = set_of({jwk_ed25519(ed.get(), "")});
  test::temp_dir d;
  auto holder = thumbprint_here(self_signed_pem(d / "holder.pem", "holder"));
  auto check = check_at(t0);
  check.certificate_thumbprint = holder;
  auto with_cnf = [&](const json& cnf) {
    auto p = claims_at(t0);
    p["cnf"] = cnf;
    return sign_jws({{"alg", "EdDSA"}}, p, ed.get(), "EdDSA");
  };
  CHECK(verify_token(with_cnf({{"x5t#S256", holder}}), keys, check));

  check_fails(verify_token(with_cnf(holder), keys, check), errc::malformed_bundle, "\"cnf\" is not a JSON object");
  check_fails(verify_token(with_cnf(nullptr), keys, check), errc::malformed_bundle, "\"cnf\" is not a JSON object");
  check_fails(verify_token(with_cnf(json::array({holder})), keys, check), errc::malformed_bundle,
              "\"cnf\" is not a JSON object");
  check_fails(verify_token(with_cnf(json::object()), keys, check), errc::malformed_bundle,
              "names no confirmation method");
  check_fails(verify_token(with_cnf({{"x5t#S256", 42}}), keys, check), errc::malformed_bundle,
              "\"x5t#S256\" is not a string");
  check_fails(verify_token(with_cnf({{"x5t#S256", {{"v", holder}}}}), keys, check), errc::malformed_bundle,
              "\"x5t#S256\" is not a string");
  for (std::string bad : {std::string(), std::string("short"), holder + "=", holder + "A", holder.substr(0, 42) + "+",
                          b64url(std::string(48, 'x'))}) {
    CAPTURE(bad);
    check_fails(verify_token(with_cnf({{"x5t#S256", bad}}), keys, check), errc::malformed_bundle,
                "is not a certificate thumbprint");
  }
  // A stray bit in the last character: another spelling of the same digest, refused.
  auto last = holder.back();
  auto stray = holder.substr(0, 42) + static_cast<char>(last == 'A' ? 'B' : last ^ 1);
  if (stray != holder) {
    auto r = verify_token(with_cnf({{"x5t#S256", stray}}), keys, check);
    REQUIRE_FALSE(r);
    CHECK((r.error().code() == errc::malformed_bundle || r.error().code() == errc::signature_invalid));
  }
  // Confirmation methods drun cannot check: the token is refused, not used as a bearer token.
  check_fails(verify_token(with_cnf({{"jkt", holder}}), keys, check), errc::signature_invalid,
              "cnf \"jkt\", a method drun cannot check");
  check_fails(verify_token(with_cnf({{"jwk", {{"kty", "OKP"}}}}), keys, check), errc::signature_invalid,
              "cnf \"jwk\"");
  check_fails(verify_token(with_cnf({{"x5t#S256", holder}, {"kid", "k"}}), keys, check), errc::signature_invalid,
              "cnf \"kid\"");
  check_fails(verify_token(with_cnf({{"x5t", holder}}), keys, check), errc::signature_invalid, "cnf \"x5t\"");
  // Non-printable method names are not echoed raw.
  auto r = verify_token(with_cnf({{"bad\nname", 1}}), keys, check);
  REQUIRE_FALSE(r);
  CHECK(r.error().message().find('\n') == std::string::npos);
  // Duplicate members are refused by the strict parser (one meaning per token).
  auto p = claims_at(t0).dump();
  p.pop_back();
  p += R"(,"cnf":{"x5t#S256":")" + holder + R"(","x5t#S256":")" + holder + R"("}})";
  std::string input = b64url(json{{"alg", "EdDSA"}}.dump()) + "." + b64url(p);
  auto dup = input + "." + b64url(evp_sign(ed.get(), nullptr, input));
  check_fails(verify_token(dup, keys, check), errc::malformed_bundle, "duplicate key");
}

TEST_CASE("issuer: checked exactly when the check names one") {
  auto ed = gen_ed25519();
  auto keys = set_of({jwk_ed25519(ed.get(), "")});
  auto sign = [&](std::optional<json> iss) {
    auto p = claims_at(t0);
    if (iss) p["iss"] = *iss;
    return sign_jws({{"alg", "EdDSA"}}, p, ed.get(), "EdDSA");
  };
  auto check = check_at(t0);
  CHECK(verify_token(sign(json("https://evil.example")), keys, check));  // no issuer named: any
  CHECK(verify_token(sign(std::nullopt), keys, check));
  check.issuer = "https://issuer.example";
  auto good = verify_token(sign(json("https://issuer.example")), keys, check);
  REQUIRE(good);
  CHECK(good->issuer == "https://issuer.example");
  check_fails(verify_token(sign(json("https://evil.example")), keys, check), errc::signature_invalid,
              "wrong issuer: the token's \"iss\" is \"https://evil.example\", not \"https://issuer.example\"");
  check_fails(verify_token(sign(std::nullopt), keys, check), errc::signature_invalid,
              "token has no \"iss\" claim; issuer \"https://issuer.example\" is required");
  check_fails(verify_token(sign(json("")), keys, check), errc::signature_invalid, "wrong issuer");
  check_fails(verify_token(sign(json("https://issuer.example/")), keys, check), errc::signature_invalid,
              "wrong issuer");  // exact, not a prefix
  check_fails(verify_token(sign(json(7)), keys, check), errc::malformed_bundle, "\"iss\" is not a string");
  // drun's own tokens say "drun" unless told otherwise.
  minted m;
  auto drun_check = check_at(t0);
  drun_check.issuer = "drun";
  CHECK(verify_token(m.mint(t0), m.keys, drun_check));
  drun_check.issuer = "other";
  check_fails(verify_token(m.mint(t0), m.keys, drun_check), errc::signature_invalid, "wrong issuer");
}
