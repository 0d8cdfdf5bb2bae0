// Sources: where piece bytes come from. An origin serves a model's files under a base URL, as a
// model hub does (BASE/config.json, BASE/model-00001-of-00002.safetensors, ...); a single-file
// model is the base URL itself. Sources only move bytes: nothing they send is trusted until it
// matches the signed manifest (fetch.hpp checks every piece).
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/hash.hpp>
#include <drun/piece.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

struct source_options {
  std::string ca_file;         // extra trusted roots (PEM) for HTTPS, besides the system's
  bool allow_tls12 = false;    // TLS 1.3 is the minimum unless this steps down to 1.2
  // WARNING: turns off certificate verification. Only for tests against throwaway origins; every
  // fetch through such a source logs a warning.
  bool insecure = false;
  // Forward proxy: http://host:port, or https://host:port (TLS to the proxy too, verified like
  // an origin: ca_file, the TLS minimum and insecure apply to it). Empty: libcurl's environment
  // variables (https_proxy, no_proxy, ...) decide.
  std::string proxy;
  std::string proxy_credentials;  // "user:password" for the proxy (Basic); never logged
  // Mutual TLS toward origins, as company origins and registries often demand: a client
  // certificate (PEM, its chain after it) and its key (PEM, unencrypted, readable by its owner
  // only), presented to any HTTPS server of the fetch that asks for one (origins, redirect
  // targets, an HTTPS proxy). A certificate is not a secret (TLS 1.3 sends it encrypted, and the
  // key never leaves the process), but it names this node to whoever asks. Both or neither;
  // checked when a source is made (they load, and the key matches the certificate).
  std::string client_cert_file;
  std::string client_key_file;
  // An IP address of this host that connections to origins and proxies go out from. Empty: the
  // kernel picks by route.
  std::string local_address;
  // Request headers, typically credentials ("Authorization: Bearer ..."). Sent to one origin
  // only (scheme, host and port; see url_origin): credentials_origin's, or when that is empty the
  // origin of the URL these options are used with (make_source's base URL, fetch_document's URL).
  // A request anywhere else (another origin, a redirect to a CDN) never carries them. Never logged.
  std::vector<std::string> headers;
  // WARNING: one source_options is often shared by every origin of a fetch and by its bundle URL.
  // Left empty, each of those sends `headers` to its own origin: a mirror or a bundle host is
  // another party and gets the credentials too. Name the origin the credentials are for here
  // (any http(s) URL on it), and only requests to that origin carry them.
  std::string credentials_origin;
  // s3://bucket/prefix: path-style requests to this endpoint (default: AWS_ENDPOINT_URL, else
  // https://s3.REGION.amazonaws.com), signed with SigV4 using AWS_ACCESS_KEY_ID,
  // AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_REGION (or AWS_DEFAULT_REGION) from the
  // environment.
  std::string s3_endpoint;
  // OCI registries (oci://REGISTRY/REPOSITORY:TAG): Basic credentials "user:password" for the
  // registry. They go to the registry when it asks for Basic, or to the token service it names
  // (https only) for a token scoped to the one repository, as Docker's clients do; never
  // anywhere else, never logged. Empty: the registry's entry of registry_auth_file, else
  // anonymous.
  std::string registry_credentials;
  // A Docker config.json or containers auth.json: its "auths" entry for the registry ("auth":
  // base64 of user:password, or "username" and "password"). Read when a registry asks for
  // credentials; must be readable by its owner only.
  std::string registry_auth_file;
  std::chrono::seconds connect_timeout{10};
  std::chrono::seconds stall_timeout{30};  // a transfer with no bytes for this long is abandoned
};

// One piece a fetch asks a source for: origins use the file name and range, peers the artifact
// id and piece index.
struct piece_request {
  std::string_view artifact_id;  // hex
  std::string_view file;         // manifest name ("." for a single-file model)
  std::size_t file_index = 0;
  std::size_t piece = 0;         // index in the manifest's pieces
  byte_range range;              // within the file
  // The signed digest of the whole file when this one piece covers it (a file of one shard),
  // else null: a source that names files by their own digest (an OCI layer) can tell before
  // transferring anything that it holds other bytes than the signed ones. Valid for the call.
  const digest* file_digest = nullptr;
};

// Thread safe: several fetch workers call fetch() at once (an HTTP source keeps a pool of
// connections, reused across calls).
class DRUN_API source {
 public:
  virtual ~source() = default;
  // Names the source in reports and errors (its URL, without credentials).
  virtual const std::string& name() const noexcept = 0;
  // Reads the piece's bytes into out, which has exactly range.size() bytes. A transfer in
  // progress stops soon after *cancel (when given) becomes true. Errors: io_error (network,
  // HTTP status, short or oversized body, wrong Content-Range: retryable), not_found,
  // permission_denied, cancelled.
  virtual result<void> fetch(const piece_request& piece, std::span<std::byte> out, const std::atomic<bool>* cancel) = 0;
  // Peers say which pieces of an artifact they hold (one flag per piece); origins hold every
  // piece and answer nullopt. Errors: not_found (the peer does not have the artifact),
  // permission_denied, io_error, cancelled.
  virtual result<std::optional<std::vector<bool>>> holdings(std::string_view artifact_id, std::size_t pieces,
                                                            const std::atomic<bool>* cancel) {
    (void)artifact_id, (void)pieces, (void)cancel;
    return std::optional<std::vector<bool>>{};
  }
  // The artifact's bundle, for sources that can name an artifact by id (peers). Still to be
  // verified by the caller. Errors: unsupported (origins), not_found, permission_denied.
  virtual result<std::string> bundle(std::string_view artifact_id) {
    (void)artifact_id;
    return error(errc::unsupported, name() + " does not serve bundles by artifact id");
  }
  virtual bool is_peer() const noexcept { return false; }
  // Whether this peer's pieces move over RDMA now (it was offered and has not failed): the
  // fetch's metrics count its pieces as rdma rather than peer.
  virtual bool carried_by_rdma() const noexcept { return false; }
};

// The origin of an http(s) URL, the unit credentials are scoped to: "scheme://host:port",
// lower-cased, the default port filled in. Empty when the URL is not http(s) or does not parse.
DRUN_API std::string url_origin(std::string_view url);

// http://, https://, s3://, oci:// or file:// (a local directory or file). oci://REGISTRY/
// REPOSITORY:TAG (or @sha256:DIGEST) is a model stored as an OCI artifact: its image manifest
// (or the first image manifest of an index) is resolved at the first piece, each file is the
// layer titled with its name (org.opencontainers.image.title, or ModelPack's
// org.cncf.model.filepath), read by Range requests on the blob, through the registry's redirects
// to its storage. The registry is only a source: what it serves is checked against the bundle like
// any origin's bytes. hf://ORG/NAME[@REVISION] is a Hugging Face-style hub by name:
// $HF_ENDPOINT (else https://huggingface.co)/ORG/NAME/resolve/REVISION (main unless given), with
// $HF_TOKEN (else the owner-only file $HF_TOKEN_PATH or ~/.cache/huggingface/token) as a bearer
// token for the hub's origin only, never for the CDN it redirects to; `headers` are not used.
// Errors: invalid_argument
// (also: headers with a credentials_origin that is not an http(s) URL), key_error (s3:// without
// credentials).
DRUN_API result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options = {});

// Downloads a whole small document (a bundle), refusing more than max_size bytes. Headers go to
// one origin only, as for a source (credentials_origin's, else the URL's own). oci://... takes the
// bundle from the artifact's layer titled model.sig, else from an OCI 1.1 referrer of the
// artifact with a Sigstore bundle artifact type (the referrers API, else its sha256-DIGEST tag).
// hf://ORG/NAME[@REVISION]/PATH is that file of the hub's repository.
DRUN_API result<std::string> fetch_document(std::string_view url, std::size_t max_size,
                                            const source_options& options = {});
// Whether fetch_document takes this URL (http://, https://, oci://, hf://) rather than a file path.
DRUN_API bool is_remote_document(std::string_view url) noexcept;

}  // namespace drun
