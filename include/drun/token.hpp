// Bearer tokens for peers: JWTs (RFC 7519) in compact JWS form, signed with EdDSA (Ed25519),
// ES256 or RS256, verified against a JWKS (RFC 7517) so that tokens from an OIDC provider or a
// Kubernetes service-account issuer work unchanged. drun can also mint short-lived EdDSA tokens
// for deployments without an identity provider.
//
// WARNING: a token without a confirmation claim is a bearer credential: whoever holds it can use
// it, and every peer a client dials receives it. A token bound to its holder's TLS client
// certificate (RFC 8705: "cnf": {"x5t#S256": ...}) is refused on any connection whose client
// certificate is another one, so a peer that captures it cannot replay it. Bind tokens wherever
// the holder has a certificate (issue_token with certificate_thumbprint, `drun token issue
// --bind-cert`), and require bound tokens (token_check::require_binding) where every caller has one.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/keys.hpp>

#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

// Tokens longer than this are refused before any parsing.
inline constexpr std::size_t max_token_size = 8192;

// The claims of a token whose signature, expiry, not-before and audience checked out.
struct token_claims {
  std::string issuer;                  // "iss", may be empty
  std::string subject;                 // "sub", required
  std::vector<std::string> audience;   // "aud" (a string or an array of strings)
  std::chrono::system_clock::time_point expires;     // "exp", required
  std::chrono::system_clock::time_point not_before;  // "nbf" (or the epoch when absent)
  // "drun_artifacts": artifact ids (hex) the token grants, or "*" for all; empty when absent.
  std::vector<std::string> artifacts;
  // Every top-level claim whose value is a string, a number, a boolean or an array of those, as
  // strings (numbers in their JSON text, booleans as "true"/"false"): what policies match on.
  std::map<std::string, std::vector<std::string>> claims;
  // "cnf": {"x5t#S256": ...}: the thumbprint (see certificate_thumbprint) of the certificate the
  // token is bound to, which verify_token() checked against the presenter's; empty when unbound.
  std::string certificate_thumbprint;
};

// A set of public keys (JWKS). Keys: OKP/Ed25519, EC/P-256, RSA (>= 2048 bits). A key with "use"
// other than "sig", or an unknown "kty"/"crv", is skipped, never an error; a set with no usable key
// is an error.
class DRUN_API jwks {
 public:
  ~jwks();
  jwks(jwks&&) noexcept;
  jwks& operator=(jwks&&) noexcept;

  // Errors: malformed_bundle (not a JWKS, no usable key), key_error, not_found, io_error.
  static result<jwks> parse(std::string_view json);
  static result<jwks> load(const std::filesystem::path& file);
  std::size_t size() const noexcept;

  struct impl;  // src/auth/token.cpp
  const impl& internals() const noexcept { return *impl_; }

 private:
  explicit jwks(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// New members go at the end, so aggregate initializers written for older versions keep meaning
// what they meant.
struct token_check {
  std::string audience;                       // required: must be one of the token's "aud"
  std::chrono::seconds clock_skew{60};        // tolerated on exp and nbf
  std::chrono::system_clock::time_point now;  // default (epoch): the system clock
  // Non-empty: the token's "iss" must be exactly this (a token without "iss" is refused). Empty:
  // any issuer whose key is in the key set.
  std::string issuer;
  // The thumbprint (certificate_thumbprint) of the certificate the token's presenter holds: the
  // TLS client certificate of the connection it came on. Empty: the presenter has none. A token
  // bound to a certificate ("cnf") is refused unless this is that certificate's.
  std::string certificate_thumbprint;
  // Refuse tokens that are not bound to a certificate (no "cnf"): bearer tokens are replayable.
  bool require_binding = false;
};

// Verifies a compact JWS: header alg EdDSA|ES256|RS256 (never "none", never HS*), the key chosen by
// "kid" when present (else every key of a matching type is tried), the signature, then exp (required),
// nbf, aud, iss (when the check names one) and the certificate binding ("cnf", RFC 8705 x5t#S256;
// a cnf with any other confirmation method is refused, since drun cannot check it).
// Errors: signature_invalid (bad or unknown signature, alg none/unsupported, expired, not yet
// valid, wrong audience, wrong or missing issuer, bound to another certificate or to one when the
// presenter has none, unbound when binding is required, an unsupported confirmation method),
// malformed_bundle (not a JWT, bad base64url/JSON, too large, a malformed claim such as a cnf that
// is not an object or an x5t#S256 that is not 32 bytes of base64url), invalid_argument (the check).
// The message says which check failed and never contains the token.
DRUN_API result<token_claims> verify_token(std::string_view token, const jwks& keys, const token_check& check);

// The RFC 8705 certificate thumbprint that "cnf" {"x5t#S256"} carries: base64url (no padding) of
// the SHA-256 of the certificate's DER. From DER bytes, or from the first certificate of a PEM
// file (the holder's leaf, as a TLS client loads it). Errors (file): not_found, io_error,
// key_error (no PEM certificate in it).
DRUN_API std::string certificate_thumbprint(std::span<const std::byte> der);
DRUN_API result<std::string> certificate_thumbprint(const std::filesystem::path& pem_file);

struct token_request {
  std::string subject;
  std::string audience;
  std::string issuer = "drun";
  std::vector<std::string> artifacts;     // ids or "*": the drun_artifacts claim
  std::chrono::seconds ttl{15 * 60};
  std::chrono::system_clock::time_point now;  // default (epoch): the system clock
  // Non-empty: bind the token to the holder's certificate, "cnf": {"x5t#S256": this} (the value
  // certificate_thumbprint() gives). Empty: a bearer token (see the WARNING above).
  std::string certificate_thumbprint;
};

// Mints an EdDSA JWT with an Ed25519 private key; "kid" is the key's JWK thumbprint (RFC 7638).
// Errors: invalid_argument (not an Ed25519 key, empty subject or audience, ttl <= 0 or > 24 h, a
// certificate_thumbprint that is not 43 characters of base64url for 32 bytes).
DRUN_API result<std::string> issue_token(const private_key& key, const token_request& request);

// The JWKS (one key, "kid" = RFC 7638 thumbprint, "use": "sig", "alg") that verifies tokens
// issue_token() makes with the matching private key. Ed25519 and ECDSA P-256 keys.
DRUN_API result<std::string> jwks_for(const public_key& key);

}  // namespace drun
