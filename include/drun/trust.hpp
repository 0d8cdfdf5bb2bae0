// Trust: what a verifier accepts as a signer. One publisher public key; X.509 roots (with the
// certificate chain carried in the bundle); or a Sigstore trusted root plus an identity policy
// (keyless bundles: a Fulcio certificate and Rekor evidence). Nothing in a bundle is trusted by
// itself.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/keys.hpp>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace drun {

// When a leaf certificate must have been valid. OMS requires "now"; the model_signing reference
// checks at the leaf's notBefore, which accepts bundles whose short-lived leaf has expired.
enum class certificate_time_policy { now, leaf_not_before };

// Who must have signed a keyless (Sigstore) bundle. Both are required and compared for equality
// with the Fulcio certificate: the SAN (an e-mail address, or a URI such as a CI workflow's
// https://github.com/ORG/REPO/.github/workflows/release.yml@refs/tags/v1), and the OIDC issuer
// that vouched for it (https://accounts.google.com, https://token.actions.githubusercontent.com).
struct keyless_identity {
  std::string identity;
  std::string issuer;
};

namespace detail { struct trust_access; }

class DRUN_API trust_store {
 public:
  // Trust exactly this key (the OMS `key` method).
  static trust_store from_public_key(public_key key);
  // Trust chains to these PEM roots (the OMS `certificate` method). Errors: not_found, io_error,
  // key_error (no certificate in the file).
  static result<trust_store> from_ca_bundle(const std::filesystem::path& pem_file,
                                            certificate_time_policy policy = certificate_time_policy::now);
  // Trust keyless bundles that chain to a Fulcio CA of this Sigstore trusted_root.json (the
  // protobuf-specs TrustedRoot JSON, the file Sigstore's TUF repository publishes) and whose
  // certificate names `who`. Verification is offline: the file is all it consults.
  // Errors: invalid_argument (identity or issuer empty), not_found, io_error, key_error (the file
  // is not a usable trusted root; the detail names the field).
  static result<trust_store> from_sigstore(const std::filesystem::path& trusted_root_json, keyless_identity who);
  // The same from the file's text.
  static result<trust_store> from_sigstore_json(std::string_view trusted_root_json, keyless_identity who);

  ~trust_store();
  trust_store(trust_store&&) noexcept;
  trust_store& operator=(trust_store&&) noexcept;

 private:
  friend struct detail::trust_access;
  struct impl;
  explicit trust_store(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// A signing certificate and its intermediates, as put into a `certificate` method bundle.
class DRUN_API certificate_chain {
 public:
  // Loads the leaf (first certificate of leaf_pem) and optional intermediates (all of chain_pem).
  static result<certificate_chain> load(const std::filesystem::path& leaf_pem,
                                        const std::filesystem::path& chain_pem = {});
  ~certificate_chain();
  certificate_chain(certificate_chain&&) noexcept;
  certificate_chain& operator=(certificate_chain&&) noexcept;

  // True when the leaf certifies this public key.
  bool certifies(const public_key& key) const;
  std::string leaf_subject() const;

 private:
  friend struct detail::trust_access;
  struct impl;
  explicit certificate_chain(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace drun
