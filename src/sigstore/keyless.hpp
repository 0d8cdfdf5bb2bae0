// Sigstore keyless verification of a bundle's verification material, offline: the steps that
// turn a Fulcio leaf certificate plus Rekor and timestamp evidence into a trusted signing key
// bound to an identity. The DSSE signature itself is checked by verify.cpp with that key.
#pragma once

#include <drun/error.hpp>
#include <drun/keys.hpp>

#include "detail/json.hpp"
#include "sigstore/tlog.hpp"
#include "sigstore/trusted_root.hpp"

#include <string>
#include <vector>

namespace drun::detail::sigstore {

// What must sign: both compared for equality with the leaf certificate, never patterns.
struct identity_policy {
  std::string identity;  // a SAN: e-mail address or URI
  std::string issuer;    // the OIDC issuer
};

struct keyless_material {
  std::string leaf_der;
  std::vector<tlog_entry> entries;
  std::vector<std::string> timestamps;  // DER TimeStampResp, from timestampVerificationData
};

// Reads the leaf (v0.3 `certificate`, or the first of v0.1/v0.2 `x509CertificateChain`), the
// tlog entries and the RFC 3161 timestamps. Errors: malformed_bundle naming the field.
result<keyless_material> parse_keyless_material(const json& verification_material);

struct keyless_signer {
  public_key key;            // the leaf's key, to check the DSSE signature with
  std::string identity;      // the SAN that matched the policy
  std::string issuer;
  millis signed_at = 0;      // the earliest verified signing time
};

// Steps 1-4 and 6 of keyless verification (chain, time, inclusion, SCT, log body, identity);
// each failure says which step failed. `payload` and `signature` are the envelope's decoded
// bytes. Errors: untrusted_certificate, signature_invalid, unsupported, malformed_bundle.
result<keyless_signer> verify_keyless(const keyless_material& m, std::string_view payload_type, std::string_view payload,
                                      std::string_view signature, const trusted_root& root,
                                      const identity_policy& policy);

// A failure of one named step: "keyless verification failed at <step>: <detail>".
error step_failed(std::string_view step, error e);

}  // namespace drun::detail::sigstore
