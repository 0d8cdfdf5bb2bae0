// Signing keys: Ed25519 (libsodium) and ECDSA P-256/P-384/P-521 (OpenSSL), stored as PEM
// (PKCS#8 private keys, SubjectPublicKeyInfo public keys).
//
// WARNING: a private key file must be readable by its owner only. load() refuses one that group
// or others can read, and save() writes mode 0600 and never overwrites an existing file.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace drun {

enum class key_type { ed25519, ecdsa_p256, ecdsa_p384, ecdsa_p521 };
// "ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521"
DRUN_API std::string_view to_string(key_type t) noexcept;
DRUN_API std::optional<key_type> parse_key_type(std::string_view name) noexcept;

namespace detail { struct key_access; }

// A public key. Copyable (shares an immutable handle).
class DRUN_API public_key {
 public:
  // Parses PEM SubjectPublicKeyInfo; text before the BEGIN line is skipped.
  static result<public_key> from_pem(std::string_view pem);
  static result<public_key> load(const std::filesystem::path& file);

  key_type type() const noexcept;
  // Canonical PEM: BEGIN PUBLIC KEY, base64 in 64-column lines, END line, trailing newline.
  std::string pem() const;
  // OMS key hint: hex SHA-256 of pem().
  std::string hint() const;
  friend DRUN_API bool operator==(const public_key& a, const public_key& b) noexcept;

 private:
  friend struct detail::key_access;
  struct impl;
  explicit public_key(std::shared_ptr<const impl> p);
  std::shared_ptr<const impl> impl_;
};

// A private key. Move-only; key material is wiped when it is destroyed. No printing operator.
class DRUN_API private_key {
 public:
  static result<private_key> generate(key_type type);
  // Accepts PKCS#8 ("PRIVATE KEY") and SEC1 ("EC PRIVATE KEY") PEM. Errors: not_found, io_error,
  // invalid_argument (not a regular file), key_error (permissions, unsupported key, encrypted).
  // The file's text and DER are held only in guarded memory, wiped when freed.
  static result<private_key> load(const std::filesystem::path& file);

  ~private_key();
  private_key(private_key&&) noexcept;
  private_key& operator=(private_key&&) noexcept;
  private_key(const private_key&) = delete;
  private_key& operator=(const private_key&) = delete;

  key_type type() const noexcept;
  drun::public_key public_key() const;
  // Writes PKCS#8 PEM with mode 0600; refuses to overwrite. Errors: io_error, invalid_argument.
  result<void> save(const std::filesystem::path& file) const;

 private:
  friend struct detail::key_access;
  struct impl;
  explicit private_key(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// Writes a public key PEM (mode 0644); refuses to overwrite.
DRUN_API result<void> save_public_key(const public_key& key, const std::filesystem::path& file);

}  // namespace drun
