// Internal access to key handles: signing and signature checks for sign.cpp and verify.cpp.
#pragma once

#include <drun/keys.hpp>

#include "detail/openssl.hpp"

#include <span>
#include <string>

namespace drun::detail {

struct key_access {
  // Signs msg (DSSE PAE bytes): ECDSA DER with the curve's hash, or a raw Ed25519 signature.
  static result<std::string> sign(const private_key& key, std::span<const std::byte> msg);
  // Checks a signature made by sign() or by another OMS signer.
  static bool verify(const public_key& key, std::span<const std::byte> msg, std::span<const std::byte> sig);
  // Wraps an OpenSSL public key (from a certificate); key_error for unsupported types.
  static result<public_key> from_evp(EVP_PKEY* pkey);
  static EVP_PKEY* evp(const public_key& key);
  // Derives libsodium's Ed25519 secret key from the seed held by k.pkey.
  static result<void> finish_ed25519(private_key::impl& k);
};

}  // namespace drun::detail
