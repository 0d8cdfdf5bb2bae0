// OCI registries: push a signed model as an OCI artifact, so that a registry's access control,
// replication and retention apply to it. Fetching from one is an origin like any other
// (make_source("oci://..."), source.hpp); the bundle travels with the artifact.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/manifest.hpp>
#include <drun/source.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace drun {

// The artifact type of the manifests drun pushes (an OCI 1.1 artifact with the empty config).
inline constexpr std::string_view model_artifact_type = "application/vnd.drun.model.v1";

struct push_options {
  // TLS, CA, client certificate and the registry's credentials (registry_credentials,
  // registry_auth_file): as for fetching.
  source_options source;
  // The bundle pushed with the model, as a layer titled model.sig; its files are the files pushed.
  // Empty: default_signature_path(model) when it exists, else every file of the model (no bundle).
  std::filesystem::path signature;
  std::size_t chunk_size = 32u << 20;  // bytes per PATCH of a chunked upload (and the memory it holds)
  progress_callback progress;          // bytes uploaded (skipped blobs count as done)
};

struct push_report {
  std::string reference;        // oci://REGISTRY/REPOSITORY@sha256:... of the manifest pushed
  std::string manifest_digest;  // sha256:...
  std::size_t blobs_uploaded = 0;
  std::size_t blobs_skipped = 0;  // the registry already had them (by digest)
  std::uint64_t bytes_uploaded = 0;
  unsigned resumed = 0;  // chunked uploads picked up again after a failed chunk
};

// Uploads each file as a blob (chunked; blobs the registry already has are skipped by digest, a
// failed chunk resumes where the registry says the upload stands), the bundle as a layer titled
// model.sig, and an OCI image manifest with each file's name as its layer's
// org.opencontainers.image.title, tagged as the URL says (oci://REGISTRY/REPOSITORY:TAG). A file
// that changes while it is pushed is refused by the registry (its digest no longer matches).
// Errors: invalid_argument (the URL), not_found, model_mismatch (the bundle's files are not on
// disk as signed), malformed_bundle, permission_denied (the registry or its token service refused
// the credentials), io_error.
DRUN_API result<push_report> push_model(const std::filesystem::path& model, std::string_view url,
                                        const push_options& options = {});

}  // namespace drun
