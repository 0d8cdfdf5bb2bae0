// Peers: a node serves the pieces in its store to other nodes over mutually authenticated TLS 1.3,
// and a fetch session uses other nodes as sources. What a peer sends is verified against the
// signed manifest like any other source's bytes; the expected digests never come from a peer.
//
// The wire protocol is documented in docs/peer-protocol.md: length-prefixed frames (type, length,
// body) with a versioned handshake, every length bounded.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/policy.hpp>
#include <drun/source.hpp>
#include <drun/store.hpp>
#include <drun/token.hpp>
#include <drun/transport.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

struct peer_server_options {
  std::string listen = "127.0.0.1:0";  // ADDR:PORT (IPv4, [IPv6] or a name); port 0 picks a free one
  std::string cert_file, key_file;     // this node's certificate chain and key (PEM; key owner-only)
  std::string client_ca_file;          // callers' certificates must chain to these roots
  // Off only when token-only callers are wanted: then a caller without a certificate must
  // present a valid token (token_keys required).
  bool require_client_certificate = true;
  std::shared_ptr<const access_policy> policy;  // null: access_policy::authenticated_callers()
  std::shared_ptr<const jwks> token_keys;       // null: tokens are refused
  // Tokens must be issued for it. One audience for every server that trusts the same key set
  // makes a token good at all of them, and a client sends its token to every peer it dials, so
  // a peer could replay an unbound token elsewhere: give each group of servers its own audience,
  // and bind tokens to their holders' certificates (token.hpp), which makes a replay useless.
  std::string audience = "drun";
  // Non-empty: a token's "iss" must be exactly this (token_check::issuer).
  std::string token_issuer;
  // Refuse tokens not bound to the caller's certificate (token_check::require_binding). Off by
  // default because token-only callers have no certificate to bind to and identity providers'
  // tokens are unbound; a token bound to a certificate is checked against the connection's
  // whatever this says.
  bool require_bound_tokens = false;
  unsigned max_connections = 256;               // more are closed at once (counted as busy)
  double max_requests_per_second = 2000;        // per connection; faster callers are slowed down
  std::uint64_t max_upload_bytes_per_second = 0;  // the whole server; 0: unlimited
  std::uint64_t memory_budget = std::uint64_t{256} << 20;  // piece buffers of all connections
  // Pieces up to this size are read whole and sent from one buffer; larger ones stream through
  // 1 MiB buffers, or this size if smaller (decrypted twice: once to authenticate, once to send),
  // so a caller that stops reading a large piece holds 1 MiB, and each chunk, not the whole
  // answer, has a deadline.
  std::uint64_t max_buffered_piece = std::uint64_t{16} << 20;
  // Of the budget, what the connections of one caller (one identity) may hold together.
  std::uint64_t memory_per_caller = std::uint64_t{64} << 20;
  std::chrono::milliseconds handshake_timeout{10000};  // TLS handshake and hello
  // Unauthenticated sockets must not crowd out callers: once half of the handshake slots (a
  // quarter of max_connections) are taken, one address (an IPv6 /64) holding this many
  // connections still in their handshake gets no more (they are closed at once, counted as busy),
  // and a caller that has sent no TLS byte after first_byte_timeout is closed.
  unsigned max_handshakes_per_address = 16;
  std::chrono::milliseconds first_byte_timeout{2000};
  std::chrono::milliseconds idle_timeout{60000};       // between requests
  std::chrono::milliseconds io_timeout{30000};         // to receive a request or send a response
  // Offered to callers that ask for it, after their hello; without a usable device the server
  // says so once (log.hpp) and serves everyone over TCP+TLS. See the WARNING in transport.hpp.
  rdma_options rdma;
  // Non-empty: also serve the process's metrics (metrics.hpp) at http://ADDR:PORT/metrics, for as
  // long as the server runs. "PORT" alone is on loopback; another address has to be named.
  std::string metrics_listen;
};

struct peer_server_stats {
  std::uint64_t connections = 0;        // accepted since start
  std::uint64_t active = 0;             // open now
  std::uint64_t handshake_failures = 0; // TLS, certificate, token or hello refused
  std::uint64_t busy = 0;               // turned away at a limit: connections, an address's handshakes, buffers
  std::uint64_t requests = 0;
  std::uint64_t denied = 0;             // refused by the policy
  std::uint64_t protocol_errors = 0;    // malformed frames, bad lengths, unknown types after the hello
  std::uint64_t pieces_served = 0;
  std::uint64_t bytes_served = 0;
  std::uint64_t rdma_connections = 0;   // connections whose pieces moved over RDMA
  std::uint64_t pieces_served_rdma = 0; // of pieces_served
};

// Serves a store's committed pieces (and bundles) on its own threads until stopped or destroyed.
// A piece is servable the moment a fetch (in this process or another) commits it.
class DRUN_API peer_server {
 public:
  // Errors: invalid_argument (listen address), key_error (certificate, key or CA unusable),
  // io_error (cannot listen).
  static result<peer_server> start(store& s, peer_server_options options);
  ~peer_server();  // stops
  peer_server(peer_server&&) noexcept;
  peer_server& operator=(peer_server&&) noexcept;

  std::uint16_t port() const noexcept;
  std::uint16_t metrics_port() const noexcept;  // 0 without metrics_listen
  peer_server_stats stats() const noexcept;
  // Closes the listener and every connection, and joins the threads. Idempotent.
  void stop() noexcept;

  struct impl;

 private:
  explicit peer_server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

struct peer_client_options {
  std::string ca_file;              // peers' certificates must chain to these roots (required)
  std::string cert_file, key_file;  // this node's client certificate (optional with a token)
  // Sent in the hello to every peer, and only after the TLS handshake has verified the peer's
  // certificate against ca_file and the address dialled (--peers-dns members included); never
  // logged. A peer that receives it could replay it elsewhere unless it is bound to cert_file
  // (token.hpp), so bind it when there is a certificate.
  std::string token;
  unsigned connections = 4;         // per peer: pieces in flight to one peer
  // An IP address of this host that connections to peers go out from (a multi-homed node's
  // fabric NIC, say). Empty: the kernel picks by route.
  std::string local_address;
  // When set, every peer's certificate must name this (a DNS name) instead of the address
  // dialled. For the members of a headless Service, whose addresses change with every pod: a
  // certificate for the Service's name (from the CA that issues only to members) says "a member
  // of this swarm", and cert-manager's csi-driver can give each pod its own key for it.
  std::string server_name;
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds io_timeout{30000};  // a response with no bytes for this long fails
  // Asked for on every connection to a peer that offers it. When RDMA cannot be had (no device
  // here, the peer refuses, or it fails: a QP error, a completion error, a timeout), that peer's
  // pieces continue over TCP+TLS, and the reason is logged once per peer (log.hpp).
  rdma_options rdma;
};

// A peer as a source: "HOST:PORT" ("[v6]:PORT"). The peer's certificate must chain to ca_file
// and name HOST (DNS or IP SAN), or options.server_name when that is set. Nothing is connected until the first request.
// Errors: invalid_argument, key_error.
DRUN_API result<std::unique_ptr<source>> make_peer_source(std::string_view host_port, const peer_client_options& options);

// Every address NAME resolves to, as "ADDR:PORT" (a Kubernetes headless Service gives one per pod).
// Errors: invalid_argument (not NAME:PORT), not_found (the name does not resolve).
DRUN_API result<std::vector<std::string>> resolve_peers(std::string_view name_port);

}  // namespace drun
