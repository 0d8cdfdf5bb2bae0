// TLS 1.3 for peers, with OpenSSL over non-blocking sockets polled against deadlines.
#include "peer/tls.hpp"

#include <drun/token.hpp>

#include "detail/file.hpp"
#include "detail/openssl.hpp"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

namespace drun::peer {
namespace {

error tls_error(errc code, std::string what, const std::string& path) {
  auto detail = detail::openssl_errors();
  return error(code, detail.empty() ? what : what + ": " + detail).with_path(path);
}

// Private keys readable by anyone but their owner are refused, as for signing keys.
result<void> check_key_file(const std::string& key) {
  auto fd = detail::open_read(key, /*follow=*/true);
  if (!fd) return std::move(fd).error().with_code(errc::key_error).with_operation("TLS key");
  return detail::check_owner_only(fd->get(), "TLS key file", key);
}

// OpenSSL's default for an encrypted key is to ask for its passphrase on the terminal: a library
// must never prompt, so an encrypted key fails to load instead (drun takes unencrypted keys,
// protected by their file's permissions).
int no_passphrase(char*, int, int, void*) { return 0; }

// The key first: loaded after the certificate, a key of another pair fails to load with
// OpenSSL's "key values mismatch"; loaded before, the certificate drops it and the check below
// says what is wrong.
result<void> load_identity(SSL_CTX* c, const std::string& cert, const std::string& key) {
  if (auto r = check_key_file(key); !r) return r;
  SSL_CTX_set_default_passwd_cb(c, no_passphrase);
  if (SSL_CTX_use_PrivateKey_file(c, key.c_str(), SSL_FILETYPE_PEM) != 1)
    return tls_error(errc::key_error, "cannot load the TLS key (it must be an unencrypted PEM key)", key);
  if (SSL_CTX_use_certificate_chain_file(c, cert.c_str()) != 1)
    return tls_error(errc::key_error, "cannot load the certificate chain", cert);
  if (SSL_CTX_check_private_key(c) != 1) return tls_error(errc::key_error, "the key does not match the certificate", key);
  return {};
}

result<ssl_ctx_ptr> new_context(const SSL_METHOD* method) {
  ssl_ctx_ptr c(SSL_CTX_new(method));
  if (!c) return error(errc::io_error, "cannot create a TLS context: " + detail::openssl_errors());
  // TLS 1.3 only: the peer protocol has no old clients to serve.
  SSL_CTX_set_min_proto_version(c.get(), TLS1_3_VERSION);
  SSL_CTX_set_mode(c.get(), SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // Read ahead: one read() fetches many records instead of two per 16 KiB record (header, then
  // body), which halves the syscalls of a bulk transfer.
  SSL_CTX_set_read_ahead(c.get(), 1);
  SSL_CTX_set_default_read_buffer_len(c.get(), 256 * 1024);
  return c;
}

// A socket BIO of our own, for one reason: writing to a connection the other end has closed
// raises SIGPIPE, whose default action kills the process, and a library must not let a dead peer
// do that. send(MSG_NOSIGNAL) avoids it without touching the process's signal state (OpenSSL's
// socket BIO uses write(), and masking the signal around every call costs two syscalls each).
int bio_fd(BIO* b) { return static_cast<int>(reinterpret_cast<std::intptr_t>(BIO_get_data(b))); }

int bio_write(BIO* b, const char* data, int len) {
  BIO_clear_retry_flags(b);
  ssize_t n = ::send(bio_fd(b), data, static_cast<std::size_t>(len), MSG_NOSIGNAL);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
  return static_cast<int>(n);
}

int bio_read(BIO* b, char* data, int len) {
  BIO_clear_retry_flags(b);
  ssize_t n = ::recv(bio_fd(b), data, static_cast<std::size_t>(len), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(b);
  return static_cast<int>(n);
}

long bio_ctrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

int bio_create(BIO* b) {
  BIO_set_init(b, 1);
  return 1;
}

const BIO_METHOD* socket_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "drun socket");
    BIO_meth_set_write(m, bio_write);
    BIO_meth_set_read(m, bio_read);
    BIO_meth_set_ctrl(m, bio_ctrl);
    BIO_meth_set_create(m, bio_create);
    return m;
  }();
  return method;
}

// Attaches the socket to the TLS session through that BIO (the fd stays owned by the stream).
bool attach(SSL* ssl, int fd) {
  BIO* bio = BIO_new(socket_method());
  if (!bio) return false;
  BIO_set_data(bio, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)));
  SSL_set_bio(ssl, bio, bio);
  return true;
}

}  // namespace

result<ssl_ctx_ptr> server_context(const std::string& cert, const std::string& key, const std::string& client_ca,
                                   bool require_client_certificate) {
  if (cert.empty() || key.empty()) return error(errc::invalid_argument, "a peer server needs a certificate and a key");
  if (client_ca.empty() && require_client_certificate)
    return error(errc::invalid_argument, "a peer server needs the CA that client certificates chain to");
  auto c = new_context(TLS_server_method());
  if (!c) return c;
  if (auto r = load_identity(c->get(), cert, key); !r) return std::move(r).error();
  if (!client_ca.empty()) {
    if (SSL_CTX_load_verify_locations(c->get(), client_ca.c_str(), nullptr) != 1)
      return tls_error(errc::key_error, "cannot load the client CA", client_ca);
    if (auto* names = SSL_load_client_CA_file(client_ca.c_str())) SSL_CTX_set_client_CA_list(c->get(), names);
  }
  // Without a client CA (token-only callers) no certificate is asked for: one that could not be
  // verified would only fail the handshake of a caller whose token is good.
  if (client_ca.empty()) SSL_CTX_set_verify(c->get(), SSL_VERIFY_NONE, nullptr);
  else
    SSL_CTX_set_verify(c->get(), SSL_VERIFY_PEER | (require_client_certificate ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                       nullptr);
  // No session tickets: every connection authenticates afresh, and no ticket keys to manage.
  SSL_CTX_set_num_tickets(c->get(), 0);
  SSL_CTX_set_session_cache_mode(c->get(), SSL_SESS_CACHE_OFF);
  return c;
}

result<ssl_ctx_ptr> client_context(const std::string& ca, const std::string& cert, const std::string& key) {
  if (ca.empty()) return error(errc::invalid_argument, "peers need the CA their certificates chain to (--ca-cert)");
  auto c = new_context(TLS_client_method());
  if (!c) return c;
  if (SSL_CTX_load_verify_locations(c->get(), ca.c_str(), nullptr) != 1)
    return tls_error(errc::key_error, "cannot load the CA", ca);
  SSL_CTX_set_verify(c->get(), SSL_VERIFY_PEER, nullptr);
  if (!cert.empty() || !key.empty()) {
    if (cert.empty() || key.empty()) return error(errc::invalid_argument, "a client certificate needs its key, and a key its certificate");
    if (auto r = load_identity(c->get(), cert, key); !r) return std::move(r).error();
  }
  return c;
}

result<void> check_identity(const std::string& cert, const std::string& key) {
  if (cert.empty() || key.empty()) return error(errc::invalid_argument, "a client certificate needs its key, and a key its certificate");
  auto c = new_context(TLS_client_method());
  if (!c) return std::move(c).error();
  return load_identity(c->get(), cert, key);
}

template <class F>
result<int> tls_stream::drive(F&& call, clock::time_point deadline, const std::atomic<bool>* stop, const char* what) {
  for (;;) {
    ERR_clear_error();
    int r = call();
    if (r > 0) return r;
    int e = SSL_get_error(ssl_.get(), r);
    short events = 0;
    if (e == SSL_ERROR_WANT_READ) events = POLLIN;
    else if (e == SSL_ERROR_WANT_WRITE) events = POLLOUT;
    else if (e == SSL_ERROR_ZERO_RETURN) return error(errc::io_error, fmt::format("{}: the peer closed the connection", what));
    else if (e == SSL_ERROR_SYSCALL) {
      int err = errno;
      return error(errc::io_error, r == 0 || err == 0 ? fmt::format("{}: the connection was closed", what)
                                                      : fmt::format("{}: {}", what, std::strerror(err)));
    } else {
      std::string why = detail::openssl_errors();
      long v = SSL_get_verify_result(ssl_.get());
      if (v != X509_V_OK) why = fmt::format("certificate verification failed: {}", X509_verify_cert_error_string(v));
      return error(errc::io_error, fmt::format("{}: TLS error{}{}", what, why.empty() ? "" : ": ", why));
    }
    // Wait in short slices so that stop is noticed promptly.
    for (;;) {
      if (stop && stop->load()) return error(errc::cancelled, fmt::format("{}: stopped", what));
      auto now = clock::now();
      if (now >= deadline) return error(errc::io_error, fmt::format("{}: timed out", what));
      auto slice = std::min<clock::duration>(deadline - now, std::chrono::milliseconds(200));
      pollfd p{fd_.get(), events, 0};
      int n = ::poll(&p, 1, static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(slice).count()) + 1);
      if (n > 0) break;
      if (n < 0 && errno != EINTR) return error(errc::io_error, fmt::format("{}: poll: {}", what, std::strerror(errno)));
    }
  }
}

result<void> tls_stream::accept(clock::time_point deadline, const std::atomic<bool>* stop) {
  if (!attach(ssl_.get(), fd_.get())) return error(errc::io_error, "cannot create a socket BIO");
  auto r = drive([&] { return SSL_accept(ssl_.get()); }, deadline, stop, "TLS handshake");
  if (!r) return std::move(r).error();
  return {};
}

result<void> tls_stream::connect(const std::string& host, clock::time_point deadline, const std::atomic<bool>* stop) {
  if (!attach(ssl_.get(), fd_.get())) return error(errc::io_error, "cannot create a socket BIO");
  // The certificate must name what was dialled: an IP SAN for an address, a DNS SAN for a name.
  in6_addr a6{};
  in_addr a4{};
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl_.get());
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1 || ::inet_pton(AF_INET6, host.c_str(), &a6) == 1) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) != 1)
      return error(errc::invalid_argument, fmt::format("cannot check the certificate against {}", host));
  } else if (SSL_set_tlsext_host_name(ssl_.get(), host.c_str()) != 1 || SSL_set1_host(ssl_.get(), host.c_str()) != 1) {
    return error(errc::invalid_argument, fmt::format("cannot check the certificate against {}", host));
  }
  auto r = drive([&] { return SSL_connect(ssl_.get()); }, deadline, stop, "TLS handshake");
  if (!r) {
    // Closed (or reset) before a single byte of the server's handshake came back, and not for a
    // timeout: the server refused the connection on accept, which it does only at its limits.
    // That is the server being busy, not failing, and callers treat it so.
    if (r.error().code() == errc::io_error && clock::now() < deadline && BIO_number_read(SSL_get_rbio(ssl_.get())) == 0)
      return error(errc::busy, "the peer closed the connection before its TLS handshake (it is at its connection "
                               "limits): try again later");
    return std::move(r).error();
  }
  return {};
}

result<void> tls_stream::read_exact(std::span<std::byte> out, clock::time_point deadline, const std::atomic<bool>* stop) {
  std::size_t done = 0;
  while (done < out.size()) {
    int want = static_cast<int>(std::min<std::size_t>(out.size() - done, 1 << 30));
    auto r = drive([&] { return SSL_read(ssl_.get(), out.data() + done, want); }, deadline, stop, "read");
    if (!r) return std::move(r).error();
    done += static_cast<std::size_t>(*r);
  }
  return {};
}

result<void> tls_stream::write_all(std::span<const std::byte> in, clock::time_point deadline, const std::atomic<bool>* stop) {
  std::size_t done = 0;
  while (done < in.size()) {
    int want = static_cast<int>(std::min<std::size_t>(in.size() - done, 1 << 30));
    auto r = drive([&] { return SSL_write(ssl_.get(), in.data() + done, want); }, deadline, stop, "write");
    if (!r) return std::move(r).error();
    done += static_cast<std::size_t>(*r);
  }
  return {};
}

std::string tls_stream::protocol() const {
  return fmt::format("{} {}", SSL_get_version(ssl_.get()), SSL_get_cipher_name(ssl_.get()));
}

peer_identity tls_stream::identity() const {
  peer_identity id;
  X509* cert = SSL_get0_peer_certificate(ssl_.get());
  if (!cert) return id;
  id.has_certificate = true;
  // What a bound token's cnf names (RFC 8705): the leaf's DER, hashed.
  unsigned char* der = nullptr;
  if (int len = i2d_X509(cert, &der); len > 0) {
    id.certificate_thumbprint = certificate_thumbprint(std::as_bytes(std::span(der, static_cast<std::size_t>(len))));
    OPENSSL_free(der);
  }
  detail::bio_ptr bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  id.subject = detail::bio_contents(bio.get());
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; names && i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* g = sk_GENERAL_NAME_value(names, i);
    auto text = [](const ASN1_STRING* s) {
      return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), static_cast<std::size_t>(ASN1_STRING_length(s)));
    };
    if (g->type == GEN_URI) id.uris.push_back(text(g->d.uniformResourceIdentifier));
    else if (g->type == GEN_DNS) id.dns.push_back(text(g->d.dNSName));
  }
  GENERAL_NAMES_free(names);
  return id;
}

result<listener> tcp_listen(const std::string& host, const std::string& port, int backlog) {
  auto where = host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return error(errc::invalid_argument, fmt::format("cannot listen on {}: {}", where, ::gai_strerror(rc)));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, ::freeaddrinfo);
  detail::unique_fd fd(::socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol));
  int one = 1;
  if (fd.get() < 0 || ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      ::bind(fd.get(), res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd.get(), backlog) != 0)
    return error(errc::io_error, fmt::format("cannot listen on {}: {}", where, std::strerror(errno)));
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  listener l;
  l.port = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  l.fd = std::move(fd);
  return l;
}

namespace {

using addrinfo_ptr = std::unique_ptr<addrinfo, void (*)(addrinfo*)>;

addrinfo_ptr numeric_address(const std::string& text) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (text.empty() || ::getaddrinfo(text.c_str(), "0", &hints, &res) != 0) res = nullptr;
  return {res, ::freeaddrinfo};
}

}  // namespace

result<void> check_local_address(const std::string& text) {
  if (text.empty() || numeric_address(text)) return {};
  return error(errc::invalid_argument, fmt::format("the local address \"{}\" is not an IP address", text));
}

result<detail::unique_fd> tcp_connect(const std::string& host, const std::string& port, clock::time_point deadline,
                                      const std::string& local) {
  if (auto r = check_local_address(local); !r) return std::move(r).error();
  auto from = numeric_address(local);
  addrinfo hints{};
  hints.ai_family = from ? from->ai_family : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return error(errc::io_error, fmt::format("{}:{}: {}{}", host, port, ::gai_strerror(rc),
                                             from ? fmt::format(" (of the family of {})", local) : std::string()));
  addrinfo_ptr guard(res, ::freeaddrinfo);
  std::string last = "no address";
  for (auto* a = res; a; a = a->ai_next) {
    detail::unique_fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (fd.get() < 0) {
      last = std::strerror(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (from && ::bind(fd.get(), from->ai_addr, from->ai_addrlen) != 0) {
      last = fmt::format("cannot dial from {}: {}", local, std::strerror(errno));
      continue;
    }
    if (::connect(fd.get(), a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = std::strerror(errno);
      continue;
    }
    pollfd p{fd.get(), POLLOUT, 0};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
    int n = ::poll(&p, 1, static_cast<int>(std::max<long long>(0, left)));
    int err = 0;
    socklen_t len = sizeof err;
    if (n <= 0) {
      last = "connection timed out";
      continue;
    }
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      last = std::strerror(err);
      continue;
    }
    return fd;
  }
  return error(errc::io_error, fmt::format("cannot connect to {}:{}: {}", host, port, last));
}

result<std::pair<std::string, std::string>> split_host_port(std::string_view hp) {
  std::string host, port;
  if (!hp.empty() && hp.front() == '[') {
    auto close = hp.find(']');
    if (close == std::string_view::npos || close + 1 >= hp.size() || hp[close + 1] != ':')
      return error(errc::invalid_argument, fmt::format("\"{}\" is not [IPV6]:PORT", hp));
    host = std::string(hp.substr(1, close - 1));
    port = std::string(hp.substr(close + 2));
  } else {
    auto colon = hp.rfind(':');
    if (colon == std::string_view::npos || hp.find(':') != colon)
      return error(errc::invalid_argument, fmt::format("\"{}\" is not HOST:PORT", hp));
    host = std::string(hp.substr(0, colon));
    port = std::string(hp.substr(colon + 1));
  }
  bool digits = !port.empty() && port.size() <= 5 && std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (host.empty() || !digits || std::stoul(port) > 65535)
    return error(errc::invalid_argument, fmt::format("\"{}\" is not HOST:PORT", hp));
  return std::pair{host, port};
}

}  // namespace drun::peer
