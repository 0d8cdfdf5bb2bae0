// Manifests: enumerate a model exactly as OMS v1.0 says, hash it in parallel, and build the
// in-toto statement that gets signed. Digests of a manifest are readable only once verified
// (see verify.hpp): a manifest built here is something to sign, not something to trust.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/hash.hpp>
#include <drun/piece.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace drun {

enum class serialization_method { files, shards };
DRUN_API std::string_view to_string(serialization_method m) noexcept;

// What is hashed. Recorded in the statement, so a verifier walks the model the same way.
struct model_policy {
  // Root-relative POSIX paths excluded with their subtree, beyond the defaults (.git,
  // .gitattributes, .github, .gitignore at the top level). Exact paths, never globs.
  std::vector<std::string> ignore_paths;
  // When false (the default) any symlink in the model is an error. When true, a symlink to a
  // regular file is hashed as that file; a symlink to a directory is still refused.
  bool allow_symlinks = false;
};

// The top-level names ignored in every model.
DRUN_API const std::vector<std::string>& default_ignore_paths();

// True for a normalized relative POSIX path: not empty, no leading or trailing '/', no empty,
// "." or ".." segment, no NUL or control character, valid UTF-8.
DRUN_API bool is_safe_relative_path(std::string_view path) noexcept;

// One regular file of a model.
struct model_file {
  std::string name;             // OMS resource name: root-relative POSIX path, "." for a single file
  std::filesystem::path path;   // where it is on disk
  std::uint64_t size = 0;
  // Identity when listed: hashing refuses a file replaced (or reached through a swapped directory)
  // between listing and reading.
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
};

// Lists a model's files in OMS order (path component by component). A single file lists itself
// as ".". Errors: not_found, io_error, unsafe_entry (symlink, special file, unsafe name).
DRUN_API result<std::vector<model_file>> enumerate_model(const std::filesystem::path& model,
                                                         const model_policy& policy);

// Where a model's signature lives by default: MODEL/model.sig for a directory, MODEL.sig beside a
// single file.
DRUN_API std::filesystem::path default_signature_path(const std::filesystem::path& model);
// The signature's path relative to the model root when it lies inside it (it must then be
// ignored, never hashed), else nullopt.
DRUN_API std::optional<std::string> signature_inside(const std::filesystem::path& model,
                                                     const std::filesystem::path& signature);

// Called from hashing threads with the bytes hashed so far and the total; must be thread safe
// and cheap.
using progress_callback = std::function<void(std::uint64_t done, std::uint64_t total)>;

struct manifest_options {
  serialization_method method = serialization_method::shards;
  hash_algorithm hash = hash_algorithm::sha256;
  std::uint64_t piece_size = 0;  // 0: default_piece_size(total bytes of the model)
  model_policy policy;
  unsigned threads = 0;          // 0: one per hardware thread
  progress_callback progress;
};

namespace detail { struct manifest_data; struct manifest_access; }

// An unsigned manifest of a model, ready to sign. Move-only.
class DRUN_API manifest {
 public:
  ~manifest();
  manifest(manifest&&) noexcept;
  manifest& operator=(manifest&&) noexcept;

  serialization_method method() const noexcept;
  hash_algorithm hash_type() const noexcept;
  std::uint64_t shard_size() const noexcept;  // 0 in files mode
  std::size_t resource_count() const noexcept;
  std::uint64_t total_bytes() const noexcept;
  // Shards mode: the model's empty files, which no shard covers, so the signature cannot vouch
  // for them (verifiers refuse them unless told to accept unsigned empty files).
  const std::vector<std::string>& unsigned_empty_files() const noexcept;
  // The in-toto Statement v1 JSON: the exact payload that gets signed.
  std::string statement_json() const;

 private:
  friend struct detail::manifest_access;
  explicit manifest(std::unique_ptr<detail::manifest_data> data);
  std::unique_ptr<detail::manifest_data> data_;
};

// Enumerates and hashes a model (pieces of one file hashed concurrently; memory bounded by one
// read buffer per thread). Blocks. Errors: those of enumerate_model, invalid_argument (no files,
// bad piece size), io_error (including a file that changed while it was read).
DRUN_API result<manifest> build_manifest(const std::filesystem::path& model,
                                         const manifest_options& options);

}  // namespace drun
