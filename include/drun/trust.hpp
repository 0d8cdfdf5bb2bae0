// Trust: what a verifier accepts as a signer. Either one publisher public key, or X.509 roots
// (with the certificate chain carried in the bundle). Nothing in a bundle is trusted by itself.
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

namespace detail { struct trust_access; }

class DRUN_API trust_store {
 public:
  // Trust exactly this key (the OMS `key` method).
  static trust_store from_public_key(public_key key);
  // Trust chains to these PEM roots (the OMS `certificate` method). Errors: not_found, io_error,
  // key_error (no certificate in the file).
  static result<trust_store> from_ca_bundle(const std::filesystem::path& pem_file,
                                            certificate_time_policy policy = certificate_time_policy::now);

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
