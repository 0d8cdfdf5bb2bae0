// Peers as a source: a small pool of TLS connections per peer, one request in flight on each.
// A connection to a peer that offers RDMA sets it up after the hello and takes piece bytes that
// way; the first RDMA failure turns RDMA off for the peer, and the piece is asked for again over
// TCP+TLS.
#include <drun/peer.hpp>

#include "detail/log.hpp"
#include "metrics/registry.hpp"
#include "peer/tls.hpp"
#include "peer/wire.hpp"
#include "transport/rdma.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <mutex>
#include <netdb.h>
#include <sys/socket.h>

namespace drun {
namespace {

using peer::clock;
using peer::frame;

struct connection {
  std::string trace_id;  // of the traceparent its HELLO said: it serves only that trace
  std::unique_ptr<peer::tls_stream> tls;
  std::unique_ptr<transport::data_path> tcp;
  std::unique_ptr<rdma::endpoint> rdma;
};

class peer_source final : public source {
 public:
  peer_source(std::string host, std::string port, peer_client_options o, peer::ssl_ctx_ptr ctx,
              std::shared_ptr<rdma::device> dev)
      : name_(fmt::format("peer {}:{}", host.find(':') != std::string::npos ? "[" + host + "]" : host, port)),
        host_(std::move(host)), port_(std::move(port)), o_(std::move(o)), ctx_(std::move(ctx)),
        rdma_device_(std::move(dev)), rdma_off_(!rdma_device_) {}
  ~peer_source() override { sodium_memzero(o_.token.data(), o_.token.size()); }

  const std::string& name() const noexcept override { return name_; }
  bool is_peer() const noexcept override { return true; }
  bool carried_by_rdma() const noexcept override { return rdma_up_.load() && !rdma_off_.load(); }

  result<void> fetch(const piece_request& p, std::span<std::byte> out, const std::atomic<bool>* cancel) override {
    auto id = peer::artifact_to_wire(p.artifact_id);
    if (!id) return error(errc::invalid_argument, "not an artifact id");
    peer::writer w;
    peer::encode(w, peer::request{frame::get_piece, *id, static_cast<std::uint32_t>(p.file_index),
                                  static_cast<std::uint32_t>(p.piece)});
    auto r = request(frame::get_piece, w.view(), out.size(), out.size(), {out, nullptr}, cancel);
    if (!r) return std::move(r).error().with_path(std::string(p.file)).with_range(p.range.begin, p.range.end);
    return {};
  }

  result<std::optional<std::vector<bool>>> holdings(std::string_view artifact_id, std::size_t pieces,
                                                    const std::atomic<bool>* cancel) override {
    auto id = peer::artifact_to_wire(artifact_id);
    if (!id) return error(errc::invalid_argument, "not an artifact id");
    std::vector<std::byte> answer;
    std::size_t expected = 4 + (pieces + 7) / 8;
    auto r = request(frame::get_have, *id, expected, expected, {{}, &answer}, cancel);
    if (!r) return std::move(r).error();
    auto have = peer::decode_holdings(answer, pieces);
    if (!have) return error(errc::io_error, fmt::format("{}: its holdings do not match the manifest's piece count", name_));
    return have;
  }

  result<std::string> bundle(std::string_view artifact_id) override {
    auto id = peer::artifact_to_wire(artifact_id);
    if (!id) return error(errc::invalid_argument, fmt::format("\"{}\" is not an artifact id", artifact_id));
    std::vector<std::byte> answer;
    auto r = request(frame::get_bundle, *id, 1, max_bundle_size, {{}, &answer}, nullptr);
    if (!r) return std::move(r).error();
    return std::string(reinterpret_cast<const char*>(answer.data()), answer.size());
  }

 private:
  // Where an answer goes: straight into a caller's buffer of its exact size, or appended to a vector.
  struct answer_sink {
    std::span<std::byte> fixed;
    std::vector<std::byte>* grow = nullptr;
  };

  // Sends one request and reads its answer (min..max bytes) into sink. A piece whose bytes fail
  // over RDMA is asked for once more, over TCP+TLS.
  result<void> request(frame type, std::span<const std::byte> body, std::uint64_t min, std::uint64_t max,
                       answer_sink sink, const std::atomic<bool>* cancel) {
    std::string rdma_failure;
    auto r = exchange(type, body, min, max, sink, cancel, rdma_failure);
    if (!r && !rdma_failure.empty()) {
      stop_rdma(rdma_failure);
      r = exchange(type, body, min, max, sink, cancel, rdma_failure);
    }
    return r;
  }

  // One request and its answer. A connection whose exchange went wrong is closed, never reused.
  result<void> exchange(frame type, std::span<const std::byte> body, std::uint64_t min, std::uint64_t max,
                        answer_sink sink, const std::atomic<bool>* cancel, std::string& rdma_failure) {
    auto fail = [&](std::string why) { return error(errc::io_error, fmt::format("{}: {}", name_, why)); };
    // A pooled connection the peer has since closed (its idle timeout) fails before any answer:
    // that is not the peer failing, so the request goes once more on a fresh connection.
    connection conn;
    result<peer::frame_in> head = error(errc::io_error, "no answer");
    for (int attempt = 0; attempt < 2; ++attempt) {
      bool pooled = false;
      auto c = take(cancel, attempt == 0, pooled);
      if (!c) return std::move(c).error();
      conn = std::move(*c);
      auto wrote = peer::write_frame(*conn.tls, type, body, clock::now() + o_.io_timeout, cancel);
      if (wrote) head = peer::read_frame(*conn.tls, clock::now() + o_.io_timeout, cancel);
      else head = std::move(wrote).error();
      if (head || head.error().code() == errc::cancelled || !pooled) break;
    }
    if (!head) return head.error().code() == errc::cancelled ? std::move(head).error() : fail(head.error().detail());
    if (static_cast<frame>(head->type) == frame::error) {
      auto e = decode_error(head->body);
      if (e.code() == errc::permission_denied || e.code() == errc::not_found || e.code() == errc::busy)
        give(std::move(conn));
      return e;
    }
    auto length = static_cast<frame>(head->type) == frame::body ? peer::decode_answer_length(head->body) : std::nullopt;
    if (!length)
      return fail(fmt::format("protocol error: expected an answer, got frame type 0x{:02x}", head->type));
    if (*length < min || *length > max)
      return fail(fmt::format("protocol error: an answer of {} bytes where {} to {} were expected", *length, min, max));
    // One deadline for the whole answer, sized for a slow but honest link (64 KiB/s): a peer
    // trickling bytes cannot hold a piece in flight forever.
    const auto deadline = clock::now() + o_.io_timeout + std::chrono::seconds(*length >> 16);
    std::span<std::byte> into = sink.fixed;
    if (sink.grow) {
      sink.grow->resize(static_cast<std::size_t>(*length));  // at most max, which the caller bounded
      into = *sink.grow;
    }
    // Pieces come over RDMA when this connection has it; bundles and holdings always over TLS.
    bool via_rdma = type == frame::get_piece && conn.rdma;
    transport::data_path& path = via_rdma ? static_cast<transport::data_path&>(*conn.rdma) : *conn.tcp;
    if (auto r = path.receive(into, deadline, cancel); !r) {
      if (r.error().code() == errc::cancelled) return std::move(r).error();
      if (via_rdma) rdma_failure = r.error().detail();
      return fail(r.error().detail());
    }
    give(std::move(conn));
    return {};
  }

  // Ends RDMA for this peer, once: its remaining pieces come over TCP+TLS.
  void stop_rdma(const std::string& why) {
    if (rdma_off_.exchange(true)) return;
    metrics::global().rdma_fallbacks.add();
    detail::log(log_level::warning, fmt::format("RDMA to {} ended ({}); its pieces continue over TCP+TLS", name_, why));
  }

  // After the hello: RDMA_SETUP with our QPs and slots, and RDMA_READY with the peer's. Anything
  // short of that leaves the connection on TCP+TLS (and RDMA off for this peer); only a failure
  // of the control channel itself fails the connection.
  result<void> setup_rdma(connection& c, clock::time_point deadline, const std::atomic<bool>* cancel) {
    auto ep = rdma::endpoint::receiver(rdma_device_, o_.rdma, c.tls->fd());
    if (!ep) {
      stop_rdma(ep.error().detail());
      return {};
    }
    auto body = rdma::encode((*ep)->address(), true);
    if (auto r = peer::write_frame(*c.tls, frame::rdma_setup, body, deadline, cancel); !r) return r;
    auto answer = peer::read_frame(*c.tls, deadline, cancel);
    if (!answer) return std::move(answer).error();
    if (static_cast<frame>(answer->type) == frame::error) {
      auto e = decode_error(answer->body);
      auto raw = peer::decode_error(answer->body);
      if (!raw || raw->code != static_cast<std::uint16_t>(peer::wire_error::rdma_unavailable)) return e;
      stop_rdma(e.detail());
      return {};
    }
    if (static_cast<frame>(answer->type) != frame::rdma_ready)
      return error(errc::io_error, fmt::format("protocol error: expected RDMA_READY, got frame type 0x{:02x}", answer->type));
    auto remote = rdma::decode(answer->body, false);
    if (!remote) return error(errc::io_error, "protocol error: " + remote.error().detail());
    if (auto r = (*ep)->connect(*remote); !r) {
      // Our QPs are half set up and the peer's are waiting: this connection cannot go on.
      stop_rdma(r.error().detail());
      return error(errc::io_error, r.error().detail());
    }
    c.rdma = std::move(*ep);
    rdma_up_ = true;
    return {};
  }

  error decode_error(std::span<const std::byte> body) const {
    auto frame = peer::decode_error(body);
    std::optional<std::uint16_t> code;
    std::string msg;
    if (frame) code = frame->code, msg = std::string(frame->message);
    // The message is the peer's words: printable ASCII only, so it cannot forge terminal output.
    for (auto& ch : msg)
      if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
    errc e = errc::io_error;
    if (code == static_cast<std::uint16_t>(peer::wire_error::denied) ||
        code == static_cast<std::uint16_t>(peer::wire_error::unauthenticated))
      e = errc::permission_denied;
    else if (code == static_cast<std::uint16_t>(peer::wire_error::not_found))
      e = errc::not_found;
    else if (code == static_cast<std::uint16_t>(peer::wire_error::busy))
      e = errc::busy;

    const char* what = code == static_cast<std::uint16_t>(peer::wire_error::denied)            ? "denied access"
                       : code == static_cast<std::uint16_t>(peer::wire_error::unauthenticated) ? "refused the caller"
                                                                                                : "answered";
    return error(e, fmt::format("{} {}: {}", name_, what, msg));  // another protocol version: io_error (exit 3)
  }

  result<connection> take(const std::atomic<bool>* cancel, bool allow_pooled, bool& pooled) {
    pooled = false;
    // The peer logs what it serves under the trace it was told in the HELLO, so a connection
    // opened for another trace is not reused (another span of the same trace may reuse it).
    const auto* trace = detail::current_trace();
    std::string traceparent = trace ? trace->traceparent() : std::string();
    std::string trace_id = trace ? trace->trace_id_hex() : std::string();
    if (allow_pooled) {
      std::lock_guard lock(mutex_);
      // A connection set up for RDMA before RDMA ended for this peer is not used again.
      while (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        if ((c.rdma && rdma_off_.load()) || c.trace_id != trace_id) continue;
        pooled = true;
        return c;
      }
    }
    auto deadline = clock::now() + o_.connect_timeout;
    auto fd = peer::tcp_connect(host_, port_, deadline, o_.local_address);
    if (!fd) return error(errc::io_error, fmt::format("{}: {}", name_, fd.error().detail()));
    peer::ssl_ptr ssl(SSL_new(ctx_.get()));
    if (!ssl) return error(errc::io_error, "cannot create a TLS session");
    connection c;
    c.trace_id = trace_id;
    c.tls = std::make_unique<peer::tls_stream>(std::move(*fd), std::move(ssl));
    c.tcp = transport::make_tcp_transport(*c.tls);
    auto* s = c.tls.get();
    // The name the certificate must carry: the one the caller gave for every peer, else the address.
    const std::string& expected = o_.server_name.empty() ? host_ : o_.server_name;
    if (auto r = s->connect(expected, deadline, cancel); !r) return error(r.error().code(), fmt::format("{}: {}", name_, r.error().detail()));
    // The token goes only to a peer whose certificate the handshake above verified against
    // ca_file and the address dialled; a bound token is worth nothing to that peer elsewhere.
    const std::uint16_t version = hello_version_.load();
    peer::writer w;
    peer::encode(w, peer::hello{version, std::as_bytes(std::span(o_.token.data(), o_.token.size())),
                                std::as_bytes(std::span(traceparent.data(), traceparent.size()))});
    auto sent = peer::write_frame(*s, frame::hello, w.view(), deadline, cancel);
    w.wipe();  // it holds the token
    if (!sent) return error(errc::io_error, fmt::format("{}: {}", name_, sent.error().detail()));
    auto answer = peer::read_frame(*s, clock::now() + o_.io_timeout, cancel);
    if (!answer) return error(errc::io_error, fmt::format("{}: {}", name_, answer.error().detail()));
    if (static_cast<frame>(answer->type) == frame::error) {
      // A server from before version 2 refuses the trace context as trailing bytes (bad_request)
      // or the version itself: say the HELLO again in version 1, for this peer from now on.
      auto refused = peer::decode_error(answer->body);
      auto why = refused ? std::optional<std::uint16_t>(refused->code) : std::nullopt;
      if (version > peer::oldest_protocol_version &&
          (why == static_cast<std::uint16_t>(peer::wire_error::unsupported_version) ||
           why == static_cast<std::uint16_t>(peer::wire_error::bad_request))) {
        hello_version_.store(peer::oldest_protocol_version);
        return take(cancel, false, pooled);
      }
      return decode_error(answer->body);
    }
    // A server may answer in an older version than ours (it then ignores the trace context).
    auto welcome = static_cast<frame>(answer->type) == frame::welcome ? peer::decode_welcome(answer->body) : std::nullopt;
    if (!welcome || welcome->version < peer::oldest_protocol_version || welcome->version > version)
      return error(errc::io_error, fmt::format("{}: protocol error in the handshake", name_));
    if ((welcome->features & peer::feature_rdma) && !rdma_off_.load())
      if (auto r = setup_rdma(c, clock::now() + o_.io_timeout, cancel); !r) {
        // RDMA failed half-way (the peer's side is set up, ours is not): this connection cannot
        // go on, but RDMA is now off for the peer, so a fresh one is plain TCP+TLS.
        if (r.error().code() != errc::cancelled && rdma_off_.load()) return take(cancel, false, pooled);
        return error(r.error().code(), fmt::format("{}: {}", name_, r.error().detail()));
      }
    return c;
  }
  void give(connection c) {
    std::lock_guard lock(mutex_);
    if (idle_.size() < o_.connections) idle_.push_back(std::move(c));
  }

  std::string name_, host_, port_;
  peer_client_options o_;
  peer::ssl_ctx_ptr ctx_;
  std::shared_ptr<rdma::device> rdma_device_;  // null: RDMA not asked for, or not available here
  std::atomic<bool> rdma_off_;
  std::atomic<bool> rdma_up_{false};
  std::atomic<std::uint16_t> hello_version_{peer::protocol_version};  // some connection set RDMA up (for the metrics' source kind)
  std::mutex mutex_;
  std::vector<connection> idle_;
};

}  // namespace

result<std::unique_ptr<source>> make_peer_source(std::string_view host_port, const peer_client_options& options) {
  auto hp = peer::split_host_port(host_port);
  if (!hp) return std::move(hp).error();
  if (options.token.size() > max_token_size) return error(errc::invalid_argument, "the token is too long");
  if (auto r = peer::check_local_address(options.local_address); !r) return std::move(r).error();
  auto ctx = peer::client_context(options.ca_file, options.cert_file, options.key_file);
  if (!ctx) return std::move(ctx).error();
  std::shared_ptr<rdma::device> dev;
  if (options.rdma.enabled) {
    if (auto c = rdma::check(options.rdma); !c) return std::move(c).error();
    auto d = rdma::open_device(options.rdma);
    if (d) {
      dev = std::move(*d);
    } else {
      // Once per process, however many peers: the host has no RDMA, not the peer.
      if (rdma::first_unavailable_notice())
        detail::log(log_level::warning,
                    fmt::format("RDMA is not available ({}): peers are fetched from over TCP+TLS", d.error().detail()));
    }
  }
  return std::unique_ptr<source>(new peer_source(hp->first, hp->second, options, std::move(*ctx), std::move(dev)));
}

result<std::vector<std::string>> resolve_peers(std::string_view name_port) {
  auto hp = peer::split_host_port(name_port);
  if (!hp) return std::move(hp).error();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(hp->first.c_str(), hp->second.c_str(), &hints, &res); rc != 0)
    return error(errc::not_found, fmt::format("{}: {}", hp->first, ::gai_strerror(rc)));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, ::freeaddrinfo);
  std::vector<std::string> out;
  for (auto* a = res; a; a = a->ai_next) {
    char host[NI_MAXHOST];
    if (::getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, nullptr, 0, NI_NUMERICHOST) != 0) continue;
    std::string h(host);
    auto entry = h.find(':') != std::string::npos ? fmt::format("[{}]:{}", h, hp->second) : fmt::format("{}:{}", h, hp->second);
    if (std::find(out.begin(), out.end(), entry) == out.end()) out.push_back(entry);
  }
  if (out.empty()) return error(errc::not_found, fmt::format("{} resolves to no address", hp->first));
  return out;
}

}  // namespace drun
