// The Fulcio leaf certificate of a keyless bundle: its chain to a trusted CA at a given time,
// its embedded SCTs, its identity (SAN and OIDC issuer), and RFC 3161 timestamps over signatures.
#pragma once

#include <drun/error.hpp>

#include "sigstore/trusted_root.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace drun::detail::sigstore {

struct validity {
  millis not_before = 0, not_after = 0;
};
result<validity> validity_of(X509* cert);

// Verifies the leaf up to the root of a trusted certificate authority whose validFor window
// holds `at`, with every certificate valid at `at`, and requires the code-signing EKU.
// Returns the certificate that issued the leaf (for the SCT's issuer key hash).
// Errors: untrusted_certificate naming the cause.
result<x509_ptr> verify_fulcio_chain(X509* leaf, const trusted_root& root, millis at);

// At least one SCT embedded in the leaf must verify against a CT log of the root valid at the
// SCT's time. Errors: untrusted_certificate.
result<void> verify_embedded_scts(X509* leaf, X509* issuer, const trusted_root& root);

struct identity {
  std::vector<std::string> names;  // SAN e-mail addresses and URIs
  std::string issuer;              // OIDC issuer (1.3.6.1.4.1.57264.1.8, else the legacy .1.1)
};
// Errors: untrusted_certificate when the leaf has no SAN or no issuer extension.
result<identity> identity_of(X509* leaf);

// Verifies an RFC 3161 TimeStampResp (DER) over `data` with a timestamp authority of the root
// that was valid at the stamped time; returns that time. Errors: signature_invalid.
result<millis> verify_rfc3161(std::string_view response_der, std::string_view data, const trusted_root& root);

}  // namespace drun::detail::sigstore
