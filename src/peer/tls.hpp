// TLS 1.3 streams over non-blocking sockets for the peer protocol: contexts for the server (client
// certificates verified against a CA) and the client (the server verified against a CA and the
// name dialled), and a stream whose every read and write has a deadline and a stop flag, so that
// no peer can hold a thread forever.
#pragma once

#include <drun/error.hpp>
#include <drun/policy.hpp>

#include "detail/file.hpp"

#include <openssl/ssl.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <span>
#include <string>

namespace drun::peer {

using clock = std::chrono::steady_clock;

struct ssl_ctx_deleter {
  void operator()(SSL_CTX* c) const noexcept { SSL_CTX_free(c); }
};
using ssl_ctx_ptr = std::unique_ptr<SSL_CTX, ssl_ctx_deleter>;
struct ssl_deleter {
  void operator()(SSL* s) const noexcept { SSL_free(s); }
};
using ssl_ptr = std::unique_ptr<SSL, ssl_deleter>;

// Errors: key_error naming the file that does not load (a key readable by others is refused).
result<ssl_ctx_ptr> server_context(const std::string& cert, const std::string& key, const std::string& client_ca,
                                   bool require_client_certificate);
result<ssl_ctx_ptr> client_context(const std::string& ca, const std::string& cert, const std::string& key);
// Whether cert (PEM, its chain after it) and key (PEM, unencrypted, readable by its owner only)
// load and match, with the same checks and errors as the contexts above: for identities that
// another TLS stack (libcurl's, toward origins) presents.
result<void> check_identity(const std::string& cert, const std::string& key);

class tls_stream {
 public:
  tls_stream(detail::unique_fd fd, ssl_ptr ssl) : fd_(std::move(fd)), ssl_(std::move(ssl)) {}

  // The handshake, as server or client (host: the name or IP the certificate must carry).
  result<void> accept(clock::time_point deadline, const std::atomic<bool>* stop);
  result<void> connect(const std::string& host, clock::time_point deadline, const std::atomic<bool>* stop);

  // Errors: io_error (closed, reset, TLS failure, deadline passed), cancelled (stop set).
  result<void> read_exact(std::span<std::byte> out, clock::time_point deadline, const std::atomic<bool>* stop);
  result<void> write_all(std::span<const std::byte> in, clock::time_point deadline, const std::atomic<bool>* stop);

  // Who the other end's certificate says it is (has_certificate false when it sent none).
  peer_identity identity() const;
  // "TLSv1.3 TLS_AES_256_GCM_SHA384": what the handshake agreed on.
  std::string protocol() const;
  int fd() const noexcept { return fd_.get(); }

 private:
  // Runs one SSL call until it completes, polling the socket as OpenSSL asks.
  template <class F>
  result<int> drive(F&& call, clock::time_point deadline, const std::atomic<bool>* stop, const char* what);

  detail::unique_fd fd_;
  ssl_ptr ssl_;
};

// A connected non-blocking TCP socket to host:port, or the error naming it. local: an IP address
// of this host the connection goes out from (empty: the kernel's choice); only host's addresses
// of its family are tried.
result<detail::unique_fd> tcp_connect(const std::string& host, const std::string& port, clock::time_point deadline,
                                      const std::string& local = {});
// A local address (options' local_address) must be an IP address literal (IPv4, or IPv6
// without brackets): invalid_argument naming it otherwise. Empty is fine (the kernel picks).
result<void> check_local_address(const std::string& text);

// A non-blocking socket listening on host:port (port "0" picks a free one), and the port it got.
// Errors: invalid_argument (the address does not resolve), io_error (cannot bind or listen).
struct listener {
  detail::unique_fd fd;
  std::uint16_t port = 0;
};
result<listener> tcp_listen(const std::string& host, const std::string& port, int backlog);

// Splits "HOST:PORT" or "[V6]:PORT". Errors: invalid_argument.
result<std::pair<std::string, std::string>> split_host_port(std::string_view host_port);

}  // namespace drun::peer
