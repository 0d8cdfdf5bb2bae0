// Authorization for the peer server: who may read which artifact. A policy maps identities
// (certificate subjects and SANs, token subjects and claims) to roles, and roles to artifacts (by
// artifact id, by publisher key or CA, or all). Policy files are JSON:
//
//   {
//     "combine": "intersection",                   // or "union"; optional, intersection by default
//     "tokens": { "issuer": "https://issuer.example",  // optional: tokens must carry exactly this iss
//                 "require_binding": true },            // optional: see below
//     "roles": {
//       "reader":  { "artifacts": ["<64 hex artifact id>", ...] },
//       "team-ml": { "publishers": [ { "public_key": "keys/publisher.pub" },
//                                    { "ca_bundle": "pki/release-ca.pem" },
//                                    { "trusted_root": "sigstore/trusted_root.json",
//                                      "identity": "https://github.com/org/models/.github/workflows/release.yml@refs/heads/main",
//                                      "identity_provider": "https://token.actions.githubusercontent.com" } ] },
//       "admin":   { "all": true }
//     },
//     "bindings": [
//       { "certificate": { "subject": "CN=node-1,O=ml" },               "roles": ["reader"] },
//       { "certificate": { "uri": "spiffe://cluster/ns/ml/sa/loader" },  "roles": ["team-ml"] },
//       { "certificate": { "uri_prefix": "spiffe://cluster/ns/ml/" },    "roles": ["team-ml"] },
//       { "certificate": { "dns": "node-2.ml.svc" },                     "roles": ["reader"] },
//       { "token": { "subject": "system:serviceaccount:ml:loader",
//                    "claims": { "team": "ml" } },                       "roles": ["team-ml"] }
//     ]
//   }
//
// Paths in "publishers" are relative to the policy file. A binding matches when every field it
// names matches (claims: the token's claim has that value, or an array holding it). A
// certificate's roles are the union over the certificate bindings it matches, a token's over the
// token bindings. What a caller may read:
//   - a certificate and no token: what its certificate's roles grant;
//   - a token and no certificate (a server that admits token-only callers): what its token's roles grant;
//   - both, "combine": "intersection" (the default): only what its certificate's roles grant AND
//     its token's roles grant, each on its own. A token can narrow what a certificate may read,
//     never widen it, so a token replayed with another node's certificate gains that node nothing;
//     a certificate or a token that matches no binding grants nothing, and so neither does the pair;
//   - both, "combine": "union": what either grants. Then a token presented with any certificate
//     from the client CA adds its roles, so "tokens.require_binding" defaults to true: a token must
//     be bound to the certificate it comes with (cnf x5t#S256, checked by verify_token).
// "tokens.issuer": a token whose "iss" is missing or another is denied. "tokens.require_binding"
// (default: true with "union", false with "intersection"): a token without a certificate binding
// is denied. A token that carries a drun_artifacts claim narrows access to those artifacts ("*":
// no narrowing); it never widens what the roles allow.
// Unknown fields are errors, so a typo never widens or narrows access silently. An artifact is
// allowed by a "publishers" entry when its stored bundle verifies against that key, CA, or
// Sigstore trusted root and identity (keyless; "identity" and "identity_provider" both required).
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/token.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

// Who is asking, as the TLS handshake and the bearer token established it.
struct DRUN_API peer_identity {
  bool has_certificate = false;
  std::string subject;                 // RFC 2253, e.g. "CN=node-1,O=ml"
  std::vector<std::string> uris;       // URI SANs (SPIFFE IDs)
  std::vector<std::string> dns;        // DNS SANs
  std::optional<token_claims> token;   // a verified token, when one was presented
  // The client certificate's thumbprint (token.hpp certificate_thumbprint), which a bound token
  // must name; empty without a certificate.
  std::string certificate_thumbprint;

  // "spiffe://..." when there is a URI SAN, else the subject, else "token:<sub>": for logs.
  std::string display() const;
};

class DRUN_API access_policy {
 public:
  ~access_policy();
  access_policy(access_policy&&) noexcept;
  access_policy& operator=(access_policy&&) noexcept;

  // Errors: malformed_bundle (not JSON, unknown field, bad artifact id, a binding naming an
  // undefined role), key_error (a publisher key or CA that does not load), not_found, io_error.
  static result<access_policy> parse(std::string_view json, const std::filesystem::path& base_dir);
  static result<access_policy> load(const std::filesystem::path& file);

  // The policy without a file: every authenticated caller (a certificate that chained to the
  // client CA) may read every artifact; a token-only caller reads what its drun_artifacts claim
  // grants; a caller with both reads what its token's claim grants (the intersection). Token
  // issuer and binding are left to the server's token_check.
  static access_policy authenticated_callers();

  // Whether `who` may read the artifact whose stored, already verified bundle is bundle_json.
  // who.token must come from verify_token() with who.certificate_thumbprint in its check (a bound
  // token naming another certificate than who's is denied here too). Thread safe (results of
  // publisher checks are cached per artifact id). Errors: permission_denied, naming the identity,
  // the artifact and the rule that refused (never a token).
  result<void> authorize(const peer_identity& who, const std::string& artifact_id, std::string_view bundle_json) const;
  // Whether some rule judges artifacts by their bundle (publishers). Without one, a server
  // authorizes before it even looks for the artifact, so a refusal takes the same time whether
  // the artifact is held or not.
  bool reads_bundles() const noexcept;

  struct impl;

 private:
  explicit access_policy(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace drun
