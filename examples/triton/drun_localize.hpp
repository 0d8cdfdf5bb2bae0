// Localizing a model through drun for a model server: read the model repository's drun.json,
// verify the signed bundle, bring every missing piece into the encrypted store, and materialize
// the verified model into a directory the server reads. Plain C++ against drun's public API; the
// Triton repository agent (triton_agent.cc) is a thin shell around localize().
#pragma once

#include <drun/error.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace drun_localize {

// The file localize() reads from a model's repository directory.
inline constexpr std::string_view config_file_name = "drun.json";

// drun.json, parsed strictly: an unknown, repeated, mistyped or missing field is an error naming
// the field. Relative paths (signature, public_key, ca_bundle, ca_cert, tls_cert, tls_key,
// token_file, store, and the PATH of a "file:PATH" key_source) are resolved against the
// repository directory, so the result holds absolute paths only.
struct config {
  std::string signature;             // http(s):// URL, or the path of the bundle
  std::filesystem::path public_key;  // exactly one of public_key and ca_bundle
  std::filesystem::path ca_bundle;
  std::vector<std::string> origins;         // http(s)://, s3:// or file:// base URLs of the model's files
  std::vector<std::string> peers;           // HOST:PORT of drun peers (mutual TLS), tried before origins
  std::filesystem::path ca_cert;            // extra roots for HTTPS origins; the roots of the peers
  std::filesystem::path tls_cert, tls_key;  // this node's identity towards peers (both or neither)
  std::filesystem::path token_file;         // bearer token for peers; readable by its owner only
  std::filesystem::path store;              // the encrypted store directory
  std::string key_source;                   // file:PATH, env:NAME or cmd:COMMAND (drun/node_key.hpp)
  std::optional<unsigned> connections;      // pieces in flight, 1..256; default drun's

  // Parses drun.json text. base_dir resolves relative paths; origin names the text in errors
  // (the file's path). Errors: invalid_argument naming the field (or the JSON syntax error).
  static drun::result<config> parse(std::string_view json_text, const std::filesystem::path& base_dir,
                                    const std::string& origin = std::string(config_file_name));
  // Reads and parses repository_dir/drun.json (at most 1 MiB, a regular file).
  // Errors: not_found, io_error, invalid_argument.
  static drun::result<config> load(const std::filesystem::path& repository_dir);
};

// Localizes the model of repository_dir into destination and returns destination:
//   1. reads repository_dir/drun.json;
//   2. fetches (URL) or reads (path) the bundle and verifies it against public_key or ca_bundle:
//      nothing is downloaded for a bundle that does not check out;
//   3. fetches every piece not yet in the store from the peers and origins, each checked against
//      its signed digest before it is sealed (a rerun or another model server on the node brings
//      only what is missing);
//   4. decrypts the verified model into destination (store::materialize, through a staging
//      directory: on failure nothing of the model is left there).
// destination must not exist or be an empty directory; it is checked before anything is fetched.
// Blocks for the whole transfer; safe to call from several threads at once (for different
// destinations). Errors: drun::error, its operation naming the step ("config", "trust",
// "signature", "verify", "sources", "store", "fetch", "materialize") and its path the file
// concerned; a piece no source delivered intact is errc::digest_mismatch naming the model file and
// byte range.
//
// WARNING: destination then holds the model in plaintext, readable by whoever can read the
// directory. Keep it private to the server (mode 0700, as Triton's acquired locations are) and
// remove it when the model is unloaded.
drun::result<std::filesystem::path> localize(const std::filesystem::path& repository_dir,
                                             const std::filesystem::path& destination);

// The same, for a configuration already parsed.
drun::result<std::filesystem::path> localize(const config& cfg, const std::filesystem::path& destination);

}  // namespace drun_localize
