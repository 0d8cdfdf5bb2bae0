// Signing: DSSE (PAE) over a manifest's statement, packed as a Sigstore bundle v0.3 JSON in the
// OMS `key` method (public key hint) or `certificate` method (leaf + intermediates).
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/keys.hpp>
#include <drun/manifest.hpp>
#include <drun/trust.hpp>

#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace drun {

inline constexpr std::string_view in_toto_payload_type = "application/vnd.in-toto+json";
inline constexpr std::string_view bundle_media_type = "application/vnd.dev.sigstore.bundle.v0.3+json";

// DSSE v1 pre-authentication encoding: "DSSEv1 <len type> <type> <len payload> <payload>".
DRUN_API std::string pre_authentication_encoding(std::string_view payload_type,
                                                 std::span<const std::byte> payload);

// Signs the manifest; returns the bundle JSON. With a chain, the leaf must certify the key's
// public half (invalid_argument otherwise). A bundle over max_bundle_size (verify.hpp), which no
// verifier would read, is refused with invalid_argument saying how many pieces made it so.
DRUN_API result<std::string> sign_manifest(const manifest& m, const private_key& key,
                                           const certificate_chain* chain = nullptr);

// Writes a file atomically (temporary name, fsync, rename) with the given mode.
DRUN_API result<void> write_file_atomically(const std::filesystem::path& file,
                                            std::string_view content, unsigned mode = 0644);

}  // namespace drun
