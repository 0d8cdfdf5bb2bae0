// Peers as a source: a small pool of TLS connections per peer, one request in flight on each.
#include <drun/peer.hpp>

#include "peer/tls.hpp"
#include "peer/wire.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <mutex>
#include <netdb.h>
#include <sys/socket.h>

namespace drun {
namespace {

using peer::clock;
using peer::frame;

class peer_source final : public source {
 public:
  peer_source(std::string host, std::string port, peer_client_options o, peer::ssl_ctx_ptr ctx)
      : name_(fmt::format("peer {}:{}", host.find(':') != std::string::npos ? "[" + host + "]" : host, port)),
        host_(std::move(host)), port_(std::move(port)), o_(std::move(o)), ctx_(std::move(ctx)) {}
  ~peer_source() override { sodium_memzero(o_.token.data(), o_.token.size()); }

  const std::string& name() const noexcept override { return name_; }
  bool is_peer() const noexcept override { return true; }

  result<void> fetch(const piece_request& p, std::span<std::byte> out, const std::atomic<bool>* cancel) override {
    auto id = peer::artifact_to_wire(p.artifact_id);
    if (!id) return error(errc::invalid_argument, "not an artifact id");
    peer::writer w;
    w.bytes(*id).u32(static_cast<std::uint32_t>(p.file_index)).u32(static_cast<std::uint32_t>(p.piece));
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
    peer::reader rd(answer);
    if (rd.u32() != pieces) return error(errc::io_error, fmt::format("{}: its piece count differs from the manifest", name_));
    std::vector<bool> have(pieces);
    for (std::size_t i = 0; i < pieces; ++i)
      have[i] = (std::to_integer<unsigned>(answer[4 + i / 8]) & (0x80u >> (i % 8))) != 0;
    return std::optional<std::vector<bool>>(std::move(have));
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

  // Sends one request and reads its answer (min..max bytes) into sink. A connection whose
  // exchange went wrong is closed, never reused.
  result<void> request(frame type, std::span<const std::byte> body, std::uint64_t min, std::uint64_t max,
                       answer_sink sink, const std::atomic<bool>* cancel) {
    auto fail = [&](std::string why) { return error(errc::io_error, fmt::format("{}: {}", name_, why)); };
    // A pooled connection the peer has since closed (its idle timeout) fails before any answer:
    // that is not the peer failing, so the request goes once more on a fresh connection.
    std::unique_ptr<peer::tls_stream> conn;
    result<peer::frame_in> head = error(errc::io_error, "no answer");
    for (int attempt = 0; attempt < 2; ++attempt) {
      bool pooled = false;
      auto c = take(cancel, attempt == 0, pooled);
      if (!c) return std::move(c).error();
      conn = std::move(*c);
      auto wrote = peer::write_frame(*conn, type, body, clock::now() + o_.io_timeout, cancel);
      if (wrote) head = peer::read_frame(*conn, clock::now() + o_.io_timeout, cancel);
      else head = std::move(wrote).error();
      if (head || head.error().code() == errc::cancelled || !pooled) break;
    }
    if (!head) return head.error().code() == errc::cancelled ? std::move(head).error() : fail(head.error().detail());
    auto& s = *conn;
    // One deadline for the whole answer, sized for a slow but honest link (64 KiB/s): a peer
    // trickling bytes cannot hold a piece in flight forever.
    if (static_cast<frame>(head->type) == frame::error) {
      auto e = decode_error(head->body);
      if (e.code() == errc::permission_denied || e.code() == errc::not_found) give(std::move(conn));
      return e;
    }
    peer::reader rd(head->body);
    auto length = rd.u64();
    if (static_cast<frame>(head->type) != frame::body || !length || !rd.done())
      return fail(fmt::format("protocol error: expected an answer, got frame type 0x{:02x}", head->type));
    if (*length < min || *length > max)
      return fail(fmt::format("protocol error: an answer of {} bytes where {} to {} were expected", *length, min, max));
    const auto deadline = clock::now() + o_.io_timeout + std::chrono::seconds(*length >> 16);
    std::uint64_t got = 0;
    while (got < *length) {
      auto d = peer::read_header(s, deadline, cancel);
      if (!d) return d.error().code() == errc::cancelled ? std::move(d).error() : fail(d.error().detail());
      if (static_cast<frame>(d->type) != frame::data || d->length == 0 || d->length > *length - got)
        return fail("protocol error: a DATA frame that does not fit the answer");
      std::span<std::byte> into;
      if (sink.grow) {
        sink.grow->resize(static_cast<std::size_t>(got) + d->length);
        into = std::span(*sink.grow).subspan(static_cast<std::size_t>(got));
      } else {
        into = sink.fixed.subspan(static_cast<std::size_t>(got), d->length);
      }
      if (auto r = s.read_exact(into, deadline, cancel); !r)
        return r.error().code() == errc::cancelled ? std::move(r).error() : fail(r.error().detail());
      got += d->length;
    }
    give(std::move(conn));
    return {};
  }

  error decode_error(std::span<const std::byte> body) const {
    peer::reader rd(body);
    auto code = rd.u16();
    std::string msg(reinterpret_cast<const char*>(body.data()) + std::min<std::size_t>(2, body.size()),
                    body.size() - std::min<std::size_t>(2, body.size()));
    // The message is the peer's words: printable ASCII only, so it cannot forge terminal output.
    for (auto& ch : msg)
      if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
    errc e = errc::io_error;
    if (code == static_cast<std::uint16_t>(peer::wire_error::denied) ||
        code == static_cast<std::uint16_t>(peer::wire_error::unauthenticated))
      e = errc::permission_denied;
    else if (code == static_cast<std::uint16_t>(peer::wire_error::not_found))
      e = errc::not_found;

    const char* what = code == static_cast<std::uint16_t>(peer::wire_error::denied)            ? "denied access"
                       : code == static_cast<std::uint16_t>(peer::wire_error::unauthenticated) ? "refused the caller"
                                                                                                : "answered";
    return error(e, fmt::format("{} {}: {}", name_, what, msg));  // another protocol version: io_error (exit 3)
  }

  result<std::unique_ptr<peer::tls_stream>> take(const std::atomic<bool>* cancel, bool allow_pooled, bool& pooled) {
    pooled = false;
    if (allow_pooled) {
      std::lock_guard lock(mutex_);
      if (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        pooled = true;
        return c;
      }
    }
    auto deadline = clock::now() + o_.connect_timeout;
    auto fd = peer::tcp_connect(host_, port_, deadline);
    if (!fd) return error(errc::io_error, fmt::format("{}: {}", name_, fd.error().detail()));
    peer::ssl_ptr ssl(SSL_new(ctx_.get()));
    if (!ssl) return error(errc::io_error, "cannot create a TLS session");
    auto s = std::make_unique<peer::tls_stream>(std::move(*fd), std::move(ssl));
    if (auto r = s->connect(host_, deadline, cancel); !r) return error(r.error().code(), fmt::format("{}: {}", name_, r.error().detail()));
    peer::writer w;
    w.text(peer::protocol_magic).u16(peer::protocol_version).u16(static_cast<std::uint16_t>(o_.token.size())).text(o_.token);
    auto sent = peer::write_frame(*s, frame::hello, w.view(), deadline, cancel);
    w.wipe();  // it holds the token
    if (!sent) return error(errc::io_error, fmt::format("{}: {}", name_, sent.error().detail()));
    auto answer = peer::read_frame(*s, clock::now() + o_.io_timeout, cancel);
    if (!answer) return error(errc::io_error, fmt::format("{}: {}", name_, answer.error().detail()));
    if (static_cast<frame>(answer->type) == frame::error) return decode_error(answer->body);
    peer::reader rd(answer->body);
    if (static_cast<frame>(answer->type) != frame::welcome || rd.u16() != peer::protocol_version)
      return error(errc::io_error, fmt::format("{}: protocol error in the handshake", name_));
    return s;
  }
  void give(std::unique_ptr<peer::tls_stream> c) {
    std::lock_guard lock(mutex_);
    if (idle_.size() < o_.connections) idle_.push_back(std::move(c));
  }

  std::string name_, host_, port_;
  peer_client_options o_;
  peer::ssl_ctx_ptr ctx_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<peer::tls_stream>> idle_;
};

}  // namespace

result<std::unique_ptr<source>> make_peer_source(std::string_view host_port, const peer_client_options& options) {
  auto hp = peer::split_host_port(host_port);
  if (!hp) return std::move(hp).error();
  if (options.token.size() > max_token_size) return error(errc::invalid_argument, "the token is too long");
  auto ctx = peer::client_context(options.ca_file, options.cert_file, options.key_file);
  if (!ctx) return std::move(ctx).error();
  return std::unique_ptr<source>(new peer_source(hp->first, hp->second, options, std::move(*ctx)));
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
