// OCI registries (the distribution API): references, manifests, the registry's authentication
// (Basic, and the Docker/OCI bearer token flow), and the origin and bundle lookups built on them.
// A registry is a source like any other: nothing it serves is trusted until it matches the signed
// manifest; its own digests only name what to fetch.
#pragma once

#include "fetch/http.hpp"

#include <drun/error.hpp>
#include <drun/source.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace drun::oci {

inline constexpr std::string_view manifest_type = "application/vnd.oci.image.manifest.v1+json";
inline constexpr std::string_view index_type = "application/vnd.oci.image.index.v1+json";
inline constexpr std::string_view docker_manifest_type = "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr std::string_view docker_list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr std::string_view empty_config_type = "application/vnd.oci.empty.v1+json";
inline constexpr std::string_view bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json";
inline constexpr std::string_view title_annotation = "org.opencontainers.image.title";
inline constexpr std::size_t max_manifest_size = 4 << 20;  // the distribution registry's own limit

// oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]; the tag is "latest" when neither is given.
struct reference {
  std::string registry;    // host[:port]
  std::string repository;  // lower-case path components
  std::string tag;         // empty when digest is given
  std::string digest;      // "sha256:<64 hex>"

  const std::string& ref() const noexcept { return digest.empty() ? tag : digest; }
  std::string base() const { return "https://" + registry + "/v2/" + repository; }  // the API's prefix
  std::string text() const { return "oci://" + registry + "/" + repository + (digest.empty() ? ":" : "@") + ref(); }
};
// Errors: invalid_argument naming what does not parse.
result<reference> parse_reference(std::string_view url);

struct layer {
  std::string media_type;
  std::string digest;
  std::uint64_t size = 0;
  std::string title;  // the file it holds: org.opencontainers.image.title or org.cncf.model.filepath
};

struct image {
  std::string digest;  // of the image manifest itself (sha256 of its bytes)
  std::string media_type;
  std::string artifact_type;
  std::vector<layer> layers;
  const layer* titled(std::string_view name) const;
};

// The registry of one repository: a client whose requests carry the credentials the registry
// asked for (Basic, or a bearer token for `actions` on the repository: "pull" or "pull,push").
class registry {
 public:
  registry(reference ref, const source_options& options, std::string actions);
  ~registry();
  registry(const registry&) = delete;
  registry& operator=(const registry&) = delete;
  http::client& client() noexcept { return client_; }
  const reference& ref() const noexcept { return ref_; }

  // The image manifest the reference names (an index: its first image manifest). The bytes
  // must hash to the digest asked for, or to the registry's Docker-Content-Digest. Errors:
  // not_found, permission_denied, io_error, malformed_bundle (a manifest that does not parse),
  // digest_mismatch, unsupported.
  result<image> resolve(const std::string& ref);
  // A blob whole (small ones: a bundle), its digest checked. Same errors.
  result<std::string> blob(const layer& l, std::size_t max_size);

 private:
  result<bool> authenticate(const http::response& challenge);
  result<std::string> credentials();

  reference ref_;
  source_options options_;
  std::string actions_;
  http::client client_;
};

result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options);
result<std::string> fetch_bundle(std::string_view url, std::size_t max_size, const source_options& options);

}  // namespace drun::oci
