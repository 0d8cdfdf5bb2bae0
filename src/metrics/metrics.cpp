// The metrics registry, its exposition text and the /metrics endpoint.
//
// The exposition is written here rather than with prometheus-cpp: the set of metrics is fixed
// and small, the hot path wants one relaxed add with no lookup, and prometheus-cpp's HTTP exposer
// would bring a second embedded web server (civetweb) into every process that links drun. The
// text format is simple and promtool lints what we write (tests/python/test_metrics.py).
#include <drun/metrics.hpp>

#include "detail/file.hpp"
#include "metrics/registry.hpp"
#include "peer/tls.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

namespace drun::metrics {

registry& global() noexcept {
  static registry* r = new registry;  // never destroyed: counted into until the process ends
  return *r;
}

void histogram::observe(double seconds) noexcept {
  std::size_t i = 0;
  while (i < bounds.size() && seconds > bounds[i]) ++i;
  if (i < bounds.size()) buckets_[i].fetch_add(1, std::memory_order_relaxed);
  auto us = std::isfinite(seconds) && seconds > 0 ? static_cast<std::uint64_t>(seconds * 1e6) : 0;
  sum_us_.fetch_add(us, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::array<std::uint64_t, histogram::bounds.size()> histogram::cumulative() const noexcept {
  std::array<std::uint64_t, bounds.size()> out{};
  std::uint64_t running = 0;
  for (std::size_t i = 0; i < bounds.size(); ++i) out[i] = running += buckets_[i].load(std::memory_order_relaxed);
  return out;
}

namespace {

struct collectors {
  std::mutex mutex;
  std::map<std::uint64_t, usage_fn> stores;
  std::uint64_t next = 1;
};

collectors& store_collectors() {
  static collectors c;
  return c;
}

constexpr const char* source_names[] = {"origin", "peer", "rdma"};
constexpr const char* refusal_names[] = {"limit", "tls", "authorization", "address"};
constexpr const char* token_names[] = {"malformed", "signature", "expired", "audience", "issuer", "binding"};
constexpr const char* result_names[] = {"ok", "failed", "cancelled"};

class writer {
 public:
  void family(const char* name, const char* type, const char* help) {
    fmt::format_to(std::back_inserter(out_), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  }
  void sample(const char* name, std::uint64_t v) { fmt::format_to(std::back_inserter(out_), "{} {}\n", name, v); }
  void sample(const char* name, std::int64_t v) { fmt::format_to(std::back_inserter(out_), "{} {}\n", name, v); }
  template <class E, std::size_t N>
  void samples(const char* name, const char* label, const labeled<E>& c, const char* const (&names)[N]) {
    static_assert(N == static_cast<std::size_t>(E::count_));
    for (std::size_t i = 0; i < N; ++i)
      fmt::format_to(std::back_inserter(out_), "{}{{{}=\"{}\"}} {}\n", name, label, names[i],
                     c[static_cast<E>(i)].value());
  }
  void counter(const char* name, const char* help, const metrics::counter& c) {
    family(name, "counter", help);
    sample(name, c.value());
  }
  template <class E, std::size_t N>
  void counter(const char* name, const char* help, const char* label, const labeled<E>& c,
               const char* const (&names)[N]) {
    family(name, "counter", help);
    samples(name, label, c, names);
  }
  void histo(const char* name, const char* help, const histogram& h) {
    family(name, "histogram", help);
    auto cum = h.cumulative();
    for (std::size_t i = 0; i < cum.size(); ++i)
      fmt::format_to(std::back_inserter(out_), "{}_bucket{{le=\"{}\"}} {}\n", name, histogram::bounds[i], cum[i]);
    // +Inf is the count: the histogram invariant holds even while an observation races the scrape.
    auto count = std::max(h.count(), cum.back());
    fmt::format_to(std::back_inserter(out_), "{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, count,
                   name, h.sum(), name, count);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace

std::uint64_t add_store_collector(usage_fn fn) {
  auto& c = store_collectors();
  std::lock_guard lock(c.mutex);
  auto h = c.next++;
  c.stores.emplace(h, std::move(fn));
  return h;
}

void remove_store_collector(std::uint64_t handle) noexcept {
  auto& c = store_collectors();
  std::lock_guard lock(c.mutex);
  c.stores.erase(handle);
}

}  // namespace drun::metrics

namespace drun {

std::string metrics_text() {
  using namespace metrics;
  const auto& r = global();
  writer w;
  w.counter("drun_fetch_bytes_total", "Verified piece bytes a fetch stored, by the kind of source that sent them.",
            "source", r.fetch_bytes, source_names);
  w.counter("drun_fetch_pieces_total", "Verified pieces a fetch stored, by the kind of source that sent them.",
            "source", r.fetch_pieces, source_names);
  w.counter("drun_fetch_pieces_rejected_total",
            "Pieces whose bytes did not match the signed digest, by the kind of source that sent them.", "source",
            r.fetch_rejected, source_names);
  w.counter("drun_fetch_retries_total", "Piece transfers tried again after a failure or a mismatch.",
            r.fetch_retries);
  w.counter("drun_fetch_peers_banned_total", "Peers banned for the rest of a fetch for sending bytes that do not match.",
            r.peers_banned);
  w.counter("drun_fetch_peers_dropped_total", "Peers a fetch stopped asking after repeated failures or refusals.",
            r.peers_dropped);
  w.counter("drun_fetches_total", "Fetch sessions that ended, by result.", "result", r.fetches, result_names);
  w.histo("drun_fetch_duration_seconds", "How long fetch sessions took, from start to their end.", r.fetch_duration);

  store_usage held;
  {
    auto& c = store_collectors();
    std::lock_guard lock(c.mutex);
    for (const auto& [h, fn] : c.stores) {
      auto u = fn();
      held.pieces += u.pieces;
      held.bytes += u.bytes;
    }
  }
  w.family("drun_store_pieces", "gauge", "Pieces held (sealed) by the stores this process has open.");
  w.sample("drun_store_pieces", held.pieces);
  w.family("drun_store_bytes", "gauge", "Plaintext bytes of the pieces held by the stores this process has open.");
  w.sample("drun_store_bytes", held.bytes);
  w.counter("drun_store_pieces_sealed_total", "Pieces sealed (encrypted and written) into a store.",
            r.store_pieces_sealed);
  w.counter("drun_store_seal_failures_total", "Pieces that could not be sealed or written.", r.store_seal_failures);
  w.counter("drun_store_open_failures_total",
            "Stored pieces that failed their tag or signed digest when read (and were dropped).",
            r.store_open_failures);
  w.counter("drun_store_scrub_findings_total", "Stored pieces a scrub found damaged.", r.store_scrub_findings);
  w.counter("drun_store_gc_evictions_total", "Artifacts removed by garbage collection.", r.store_gc_evictions);
  w.counter("drun_store_key_rotations_total", "Node key rotations completed.", r.store_key_rotations);

  w.family("drun_peer_connections", "gauge", "Connections the peer servers of this process have open now.");
  w.sample("drun_peer_connections", r.peer_connections.value());
  w.counter("drun_peer_connections_total", "Connections the peer servers accepted.", r.peer_connections_total);
  w.counter("drun_peer_connections_refused_total",
            "Connections refused before serving, by reason: limit (connections or handshake slots), tls "
            "(handshake or certificate), authorization (token or hello refused), address (the connecting "
            "address already held its share of the handshake slots).",
            "reason", r.peer_refused, refusal_names);
  w.counter("drun_peer_requests_total", "Piece requests the peer servers received.", r.peer_requests);
  w.counter("drun_peer_pieces_served_total", "Pieces the peer servers sent.", r.peer_pieces_served);
  w.counter("drun_peer_bytes_served_total", "Piece bytes the peer servers sent (over TLS or RDMA).",
            r.peer_bytes_served);
  w.counter("drun_peer_authorization_denials_total", "Requests the access policy refused.", r.peer_denials);
  w.counter("drun_peer_protocol_errors_total", "Malformed frames and requests from callers.", r.peer_protocol_errors);
  w.counter("drun_peer_busy_answers_total",
            "Piece requests answered busy: the piece buffers (memory budget, or the caller's share) stayed "
            "taken for the whole I/O timeout.",
            r.peer_busy_answers);
  w.counter("drun_peer_token_failures_total", "Bearer tokens refused, by the check that failed.", "reason",
            r.token_failures, token_names);
  w.counter("drun_rdma_bytes_served_total", "Piece bytes the peer servers sent over RDMA.", r.rdma_bytes_served);
  w.counter("drun_rdma_fallbacks_total", "Connections that asked for RDMA and moved their pieces over TLS instead.",
            r.rdma_fallbacks);
  w.counter("drun_audit_records_total", "Records this process appended to the audit log.", r.audit_records);
  w.counter("drun_audit_write_failures_total", "Audit records this process could not write (the decision stood).",
            r.audit_write_failures);
  return w.take();
}

result<void> write_metrics_file(const std::filesystem::path& file) {
  return detail::replace_file(file, metrics_text(), 0644, "cannot write metrics file");
}

struct metrics_server::impl {
  detail::unique_fd listener;
  std::uint16_t port = 0;
  std::string address;
  std::atomic<bool> stopping{false};
  std::thread thread;

  void serve_one(int fd);
  void loop();
  // Stops and joins the thread: also when a server is moved onto (the old impl ends here).
  ~impl() {
    stopping = true;
    if (thread.joinable()) thread.join();
  }
};

namespace {

// Sends all of `data` to a non-blocking socket before `deadline`; gives up silently otherwise
// (a scraper that stops reading loses its scrape, nothing else).
void send_all(int fd, std::string_view data, std::chrono::steady_clock::time_point deadline) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return;
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, static_cast<int>(left.count()));
      continue;
    }
    return;
  }
}

std::string response(const char* status, std::string_view type, std::string_view body, const char* extra = "") {
  return fmt::format("HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{}", status,
                     type, body.size(), extra, body);
}

}  // namespace

namespace {

// After the answer: no more to send, and what the caller still sends is read and dropped for a
// moment (at most 64 KiB, 1 s), so that closing does not reset the connection before the caller
// has read the answer (a close with unread input sends RST).
void linger_close(int fd) {
  ::shutdown(fd, SHUT_WR);
  char sink[4096];
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (std::size_t drained = 0; drained < (64u << 10);) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return;
    ssize_t n = ::recv(fd, sink, sizeof sink, 0);
    if (n <= 0) return;
    drained += static_cast<std::size_t>(n);
  }
}

}  // namespace

namespace metrics {

scrape_request judge_scrape_request(std::string_view req) noexcept {
  auto end = req.find("\r\n");
  if (end == std::string_view::npos || req.find("\r\n\r\n") == std::string_view::npos) return scrape_request::too_large;
  std::string_view line = req.substr(0, end);
  auto sp1 = line.find(' '), sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1 || line.substr(sp2 + 1).substr(0, 5) != "HTTP/")
    return scrape_request::bad_request_line;
  auto method = line.substr(0, sp1);
  auto target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  auto path = target.substr(0, target.find('?'));  // Prometheus may add parameters; none are used
  if (path != "/metrics") return scrape_request::not_found;
  if (method == "GET") return scrape_request::get;
  if (method == "HEAD") return scrape_request::head;
  return scrape_request::not_allowed;
}

}  // namespace metrics

void metrics_server::impl::serve_one(int fd) {
  constexpr std::size_t max_request = 8192;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  std::string req;
  char buf[2048];
  while (req.find("\r\n\r\n") == std::string::npos && req.size() < max_request && !stopping.load()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return;
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(std::min<long>(left.count(), 200)));
    if (rc < 0 && errno != EINTR) return;
    if (rc <= 0) continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n == 0) return;
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return;
    }
    req.append(buf, static_cast<std::size_t>(n));
  }
  using metrics::scrape_request;
  const auto judged = metrics::judge_scrape_request(req);
  switch (judged) {
    case scrape_request::too_large:
      send_all(fd, response("431 Request Header Fields Too Large", "text/plain", "request too large\n"), deadline);
      return;
    case scrape_request::bad_request_line:
      send_all(fd, response("400 Bad Request", "text/plain", "bad request line\n"), deadline);
      return;
    case scrape_request::not_found:
      send_all(fd, response("404 Not Found", "text/plain", "drun serves /metrics only\n"), deadline);
      return;
    case scrape_request::not_allowed:
      send_all(fd, response("405 Method Not Allowed", "text/plain", "GET only\n", "Allow: GET, HEAD\r\n"), deadline);
      return;
    case scrape_request::get:
    case scrape_request::head:
      break;
  }
  auto body = metrics_text();
  auto r = response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
  if (judged == scrape_request::head) r.resize(r.size() - body.size());
  send_all(fd, r, deadline);
}

void metrics_server::impl::loop() {
  while (!stopping.load()) {
    pollfd p{listener.get(), POLLIN, 0};
    int rc = ::poll(&p, 1, 200);
    if (rc <= 0) continue;
    int fd = ::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors (EMFILE) and the like: the connection stays queued, so a pause, not a spin.
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    // One at a time: a scrape takes well under a millisecond, and a caller that stalls is cut off
    // by the 2 s request deadline (then at most 1 s of draining), so there is nothing to gain
    // from threads an attacker could multiply.
    detail::unique_fd conn(fd);
    serve_one(conn.get());
    linger_close(conn.get());
  }
}

result<metrics_server> metrics_server::start(const std::string& listen) {
  std::string spec = listen;
  if (!spec.empty() && spec.find_first_not_of("0123456789") == std::string::npos) spec = "127.0.0.1:" + spec;
  auto hp = peer::split_host_port(spec);
  if (!hp) return error(errc::invalid_argument, fmt::format("metrics address {}: {}", listen, hp.error().message()));
  auto l = peer::tcp_listen(hp->first, hp->second, 64);
  if (!l) return std::move(l).error();
  auto p = std::make_unique<impl>();
  p->listener = std::move(l->fd);
  p->port = l->port;
  p->address = hp->first.find(':') != std::string::npos ? fmt::format("[{}]:{}", hp->first, l->port)
                                                          : fmt::format("{}:{}", hp->first, l->port);
  p->thread = std::thread([raw = p.get()] { raw->loop(); });
  return metrics_server(std::move(p));
}

metrics_server::metrics_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
metrics_server::metrics_server(metrics_server&&) noexcept = default;
metrics_server& metrics_server::operator=(metrics_server&&) noexcept = default;
metrics_server::~metrics_server() = default;

std::uint16_t metrics_server::port() const noexcept { return impl_->port; }
const std::string& metrics_server::address() const noexcept { return impl_->address; }

}  // namespace drun
