// Internal access to trust stores and certificate chains.
#pragma once

#include <drun/trust.hpp>

#include "detail/openssl.hpp"
#include "sigstore/keyless.hpp"

#include <optional>
#include <string>
#include <vector>

namespace drun::detail {

struct trust_access {
  // The trusted publisher key, if this store trusts one key.
  static const std::optional<public_key>& key(const trust_store& t);
  // Verifies a chain (leaf first, DER) to the store's roots and the leaf's key usage; returns
  // the leaf's public key and subject. Errors: untrusted_certificate, malformed_bundle, key_error.
  static result<std::pair<public_key, std::string>> verify_chain(const trust_store& t,
                                                                 const std::vector<std::string>& der_chain);
  // The trusted root and identity policy, if this store trusts Sigstore keyless signers.
  struct sigstore_trust {
    sigstore::trusted_root root;
    sigstore::identity_policy policy;
  };
  static const sigstore_trust* sigstore(const trust_store& t);
  // DER of leaf and intermediates, leaf first.
  static std::vector<std::string> der_chain(const certificate_chain& c);
  // The subject line of a DER certificate ("" if it does not parse).
  static std::string subject_of(const std::string& der);
};

}  // namespace drun::detail
