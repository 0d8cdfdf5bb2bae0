// Verification: authenticate a bundle against a trust store, validate its statement, and compare
// a model on disk with it. A verified_manifest is the only type from which signed digests can be
// read, and only a successful verify_bundle() makes one.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/hash.hpp>
#include <drun/keys.hpp>
#include <drun/manifest.hpp>
#include <drun/piece.hpp>
#include <drun/trust.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace drun {

// Bundles larger than this are refused before they are read or parsed, and sign_manifest refuses
// to make one. A bundle is read before anything in it is authenticated (from a file, a URL, a
// peer), and its payload is one base64 string that verifying holds about four times over (text,
// parsed string, decoded, signed message): the cap is what a hostile bundle can cost. Real ones
// need far less: drun's shards bundles take ~235 bytes per piece (measured), so a 1 TiB model at
// the default 64 MiB pieces (16384) is ~4 MiB, and 32 MiB covers ~8 TiB at default piece sizes
// (larger artifacts sign with a larger piece size). Keyless and key bundles otherwise are a few KiB.
inline constexpr std::size_t max_bundle_size = std::size_t{32} << 20;

// Who signed, as the bundle describes it.
struct signer_info {
  std::string method;        // "key", "certificate" or "sigstore" (keyless)
  std::string key_hint;      // the bundle's public key hint, if any
  std::string subject;       // leaf certificate subject (certificate), the SAN identity (sigstore)
  std::string issuer;        // the OIDC issuer (sigstore)
};

// A file of a verified manifest.
struct manifest_file {
  std::string name;                    // root-relative path ("." for a single-file model)
  std::optional<std::uint64_t> size;   // known in shards mode; files mode signs only a digest
  std::size_t first_piece = 0;         // index into pieces()
  std::size_t piece_count = 0;
};

// A piece of a verified manifest: the whole file in files mode.
struct manifest_piece {
  std::size_t file = 0;
  std::optional<byte_range> range;  // absent in files mode (the whole file, size unsigned)
  digest expected;
};

class verified_manifest;

// Bytes that hashed to a piece's signed digest, bound to the artifact and piece they were checked
// for. It owns its bytes (check_piece moves them in) and lets nobody write them, so they cannot
// change after the check, be freed or reused under it, or be shorter than the signed range; and a
// store refuses it for any other artifact or piece. Only verified_manifest::check_piece makes one.
class DRUN_API verified_piece {
 public:
  ~verified_piece();  // wipes the bytes
  verified_piece(verified_piece&&) noexcept;
  verified_piece& operator=(verified_piece&&) noexcept;
  verified_piece(const verified_piece&) = delete;
  verified_piece& operator=(const verified_piece&) = delete;

  const std::string& artifact_id() const noexcept { return artifact_id_; }
  std::size_t index() const noexcept { return index_; }
  std::size_t file() const noexcept { return file_; }
  byte_range range() const noexcept { return range_; }
  std::span<const std::byte> bytes() const noexcept { return bytes_; }
  // Hands the buffer back (to fill with the next piece); the bytes are no longer verified then.
  std::vector<std::byte> release() && noexcept;

 private:
  friend class verified_manifest;
  verified_piece(std::string artifact_id, std::size_t index, std::size_t file, byte_range range,
                 std::vector<std::byte> bytes);
  std::string artifact_id_;
  std::size_t index_, file_;
  byte_range range_;
  std::vector<std::byte> bytes_;
};

namespace detail { struct verified_access; }

class DRUN_API verified_manifest {
 public:
  ~verified_manifest();
  verified_manifest(verified_manifest&&) noexcept;
  verified_manifest& operator=(verified_manifest&&) noexcept;

  // Hex SHA-256 of the exact signed payload bytes: the artifact's identity.
  const std::string& artifact_id() const noexcept;
  serialization_method method() const noexcept;
  hash_algorithm hash_type() const noexcept;
  std::uint64_t shard_size() const noexcept;  // 0 in files mode
  const std::string& subject_name() const noexcept;
  const signer_info& signer() const noexcept;
  const std::vector<manifest_file>& files() const noexcept;
  const std::vector<manifest_piece>& pieces() const noexcept;
  const std::vector<std::string>& ignore_paths() const noexcept;
  bool allow_symlinks() const noexcept;

  // Checks bytes against piece `index`'s signed digest (and its length in shards mode). On
  // success the bytes move into the verified_piece; on failure they stay with the caller as they
  // were. Errors: invalid_argument (no such piece), digest_mismatch naming file and range.
  result<verified_piece> check_piece(std::size_t index, std::vector<std::byte>&& bytes) const;

 private:
  friend struct detail::verified_access;
  struct impl;
  explicit verified_manifest(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// Reads a bundle file, refusing one over max_bundle_size. Errors: not_found, io_error,
// invalid_argument (not a regular file), malformed_bundle (too large).
DRUN_API result<std::string> read_bundle_file(const std::filesystem::path& file);

// Authenticates a bundle and validates its statement. The trust store decides the method: a key
// store takes `key` bundles, CA roots `certificate` bundles, a Sigstore trust store keyless ones
// (whose failures say which step failed: transparency log, timestamp, signing time, certificate
// chain, SCT, transparency log entry body, identity, DSSE signature). Errors: malformed_bundle,
// unsupported, signature_invalid, untrusted_certificate.
DRUN_API result<verified_manifest> verify_bundle(std::string_view bundle_json, const trust_store& trust);

struct verify_options {
  std::vector<std::string> ignore_paths;   // added to those the bundle records
  bool ignore_unsigned_files = false;      // files absent from the manifest are not an error
  // Shards manifests cannot sign an empty file (it has no bytes, so no shard), and an empty
  // __init__.py or adapter_config.json can still change what a loader does: an empty file the
  // manifest does not list is unsigned like any other, unless this says the caller accepts them.
  // Each verify that accepts some logs a warning naming them (log.hpp). No effect on a files
  // manifest, which lists empty files: one missing from it was added after signing.
  bool allow_unsigned_empty_files = false;
  unsigned threads = 0;                    // 0: one per hardware thread
  progress_callback progress;
};

// Re-enumerates the model with the recorded policy and compares every name and digest.
// Errors: model_mismatch (missing, extra, resized, symlink), digest_mismatch (file and range of
// the first failing piece; the detail counts the others), not_found, io_error.
DRUN_API result<void> verify_model(const verified_manifest& m, const std::filesystem::path& model,
                                   const verify_options& options = {});

// What a bundle claims, read WITHOUT checking its signature: for display only.
struct bundle_summary {
  std::string artifact_id;
  serialization_method method = serialization_method::shards;
  hash_algorithm hash_type = hash_algorithm::sha256;
  std::uint64_t shard_size = 0;
  std::string subject_name;
  signer_info signer;
  std::vector<manifest_file> files;
  std::vector<manifest_piece> pieces;  // by piece index, as verified_manifest::pieces() would list them
  std::size_t piece_count = 0;         // pieces.size()
  std::vector<std::string> ignore_paths;
};
DRUN_API result<bundle_summary> inspect_bundle(std::string_view bundle_json);

}  // namespace drun
