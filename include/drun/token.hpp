// Bearer tokens for peers: JWTs (RFC 7519) in compact JWS form, signed with EdDSA (Ed25519),
// ES256 or RS256, verified against a JWKS (RFC 7517) so that tokens from an OIDC provider or a
// Kubernetes service-account issuer work unchanged. drun can also mint short-lived EdDSA tokens
// for deployments without an identity provider.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/keys.hpp>

#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
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

struct token_check {
  std::string audience;                       // required: must be one of the token's "aud"
  std::chrono::seconds clock_skew{60};        // tolerated on exp and nbf
  std::chrono::system_clock::time_point now;  // default (epoch): the system clock
};

// Verifies a compact JWS: header alg EdDSA|ES256|RS256 (never "none", never HS*), the key chosen by
// "kid" when present (else every key of a matching type is tried), the signature, then exp (required),
// nbf, and aud. Errors: signature_invalid (bad or unknown signature, alg none/unsupported, expired,
// not yet valid, wrong audience), malformed_bundle (not a JWT, bad base64url/JSON, too large).
// The message says which check failed and never contains the token.
DRUN_API result<token_claims> verify_token(std::string_view token, const jwks& keys, const token_check& check);

struct token_request {
  std::string subject;
  std::string audience;
  std::string issuer = "drun";
  std::vector<std::string> artifacts;     // ids or "*": the drun_artifacts claim
  std::chrono::seconds ttl{15 * 60};
  std::chrono::system_clock::time_point now;  // default (epoch): the system clock
};

// Mints an EdDSA JWT with an Ed25519 private key; "kid" is the key's JWK thumbprint (RFC 7638).
// Errors: invalid_argument (not an Ed25519 key, empty subject or audience, ttl <= 0 or > 24 h).
DRUN_API result<std::string> issue_token(const private_key& key, const token_request& request);

// The JWKS (one key, "kid" = RFC 7638 thumbprint, "use": "sig", "alg") that verifies tokens
// issue_token() makes with the matching private key. Ed25519 and ECDSA P-256 keys.
DRUN_API result<std::string> jwks_for(const public_key& key);

}  // namespace drun
