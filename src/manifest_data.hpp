// The manifest's internal representation, shared by signing and verification, and the parallel
// piece hasher both use.
#pragma once

#include <drun/manifest.hpp>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace drun::detail {

inline constexpr std::string_view statement_type = "https://in-toto.io/Statement/v1";
inline constexpr std::string_view predicate_type = "https://model_signing/signature/v1.0";

struct resource {
  std::string name;                 // as in the statement: "path" or "path:start:end"
  std::string file;                 // the file part of name
  std::optional<byte_range> range;  // shards only
  digest value;
};

struct manifest_data {
  std::string subject_name;
  serialization_method method = serialization_method::shards;
  hash_algorithm hash = hash_algorithm::sha256;
  std::uint64_t shard_size = 0;
  bool allow_symlinks = false;
  std::vector<std::string> ignore_paths;
  std::vector<resource> resources;  // in statement order
  std::uint64_t total_bytes = 0;    // known when built locally
  std::vector<std::string> unsigned_empty_files;  // built locally in shards mode: no shard covers them
};

// OMS root digest: SHA-256 over the concatenated raw resource digests, in the listed order.
digest root_digest(const std::vector<resource>& resources);

// The in-toto statement JSON for a manifest.
std::string statement_json(const manifest_data& m);

// Parses and validates a statement (types, names, ranges, digests, root digest). Errors:
// malformed_bundle, unsupported.
result<manifest_data> parse_statement(std::string_view payload);

// True when a sorts before b in OMS order: path component by component, then range start.
bool oms_name_less(std::string_view a, std::string_view b) noexcept;

struct hash_task {
  std::size_t file;  // index into the file list
  byte_range range;
};

// Hashes every task's range on `threads` threads, one bounded read buffer per thread. Follows a
// final symlink only when follow_symlinks is set; refuses anything but a regular file.
result<std::vector<digest>> hash_ranges(const std::vector<model_file>& files,
                                        const std::vector<hash_task>& tasks, hash_algorithm alg,
                                        unsigned threads, bool follow_symlinks,
                                        const progress_callback& progress);

struct manifest_access {
  static const manifest_data& data(const manifest& m) { return *m.data_; }
  static manifest make(std::unique_ptr<manifest_data> d) { return manifest(std::move(d)); }
};

}  // namespace drun::detail
