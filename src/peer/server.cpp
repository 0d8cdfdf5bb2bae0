// The peer server: one acceptor thread and one thread per connection (bounded by
// max_connections); every wait has a deadline and notices stop(), and piece buffers come from a
// server-wide budget, so slow or hostile callers cannot exhaust threads or memory.
#include <drun/peer.hpp>

#include <drun/metrics.hpp>
#include <drun/trace.hpp>

#include "detail/audit.hpp"
#include "detail/log.hpp"
#include "metrics/registry.hpp"
#include "peer/tls.hpp"
#include "peer/wire.hpp"
#include "transport/rdma.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <set>
#include <sys/socket.h>
#include <thread>

namespace drun {

using peer::clock;
using peer::frame;
using peer::wire_error;

namespace {

struct artifact_info {
  std::string bundle;
  std::vector<std::size_t> piece_file;       // file index of each piece
  std::vector<std::uint64_t> piece_length;
};

// The server's own figures (stats()) and the process's metrics: each event is counted here, once.
struct counters {
  std::atomic<std::uint64_t> connections{0}, active{0}, handshake_failures{0}, busy{0}, requests{0}, denied{0},
      protocol_errors{0}, pieces_served{0}, bytes_served{0}, rdma_connections{0}, pieces_served_rdma{0};

  static metrics::registry& process() noexcept { return metrics::global(); }
  void accepted() noexcept { connections++, process().peer_connections_total.add(); }
  void opened() noexcept { active++, process().peer_connections.add(1); }
  void closed() noexcept { active--, process().peer_connections.add(-1); }
  // A connection turned away: at the accept (limit, address) or in its handshake (tls, authorization).
  void refused(metrics::refusal why) noexcept {
    (why == metrics::refusal::limit || why == metrics::refusal::address ? busy : handshake_failures)++;
    process().peer_refused[why].add();
  }
  void token_refused(const error& e) noexcept { process().token_failures[metrics::token_failure_of(e)].add(); }
  void buffers_busy() noexcept { busy++, process().peer_busy_answers.add(); }
  void protocol_error() noexcept { protocol_errors++, process().peer_protocol_errors.add(); }
  void request() noexcept { requests++, process().peer_requests.add(); }
  void denial() noexcept { denied++, process().peer_denials.add(); }
  void served(std::uint64_t bytes, bool rdma) noexcept {
    pieces_served++, bytes_served += bytes;
    process().peer_pieces_served.add(), process().peer_bytes_served.add(bytes);
    if (rdma) pieces_served_rdma++, process().rdma_bytes_served.add(bytes);
  }
};

// One connection's data paths: TCP+TLS always, RDMA once the caller set it up. Its registered
// bytes count against the server's RDMA budget until the connection ends.
struct connection {
  peer::tls_stream& tls;
  std::unique_ptr<transport::data_path> tcp;
  std::unique_ptr<rdma::endpoint> rdma;
  std::atomic<std::uint64_t>* rdma_budget_used = nullptr;
  std::uint64_t rdma_bytes = 0;
  std::uint64_t pieces = 0, bytes = 0;  // served on it, for its log line
  std::set<std::string> granted;        // artifacts whose grant the audit log has for it
  ~connection() {
    rdma.reset();
    if (rdma_budget_used) *rdma_budget_used -= rdma_bytes;
  }
};

}  // namespace

struct peer_server::impl {
  store* st = nullptr;
  std::optional<metrics_server> metrics;
  peer_server_options o;
  peer::ssl_ctx_ptr ctx;
  std::shared_ptr<const access_policy> policy;
  std::shared_ptr<rdma::device> rdma_device;  // null: RDMA not offered
  // Registered (pinned) staging memory of all RDMA connections, bounded by memory_budget.
  std::atomic<std::uint64_t> rdma_registered{0};
  detail::unique_fd listener;
  std::uint16_t port = 0;
  std::atomic<bool> stopping{false};
  std::thread acceptor;
  counters n;

  std::mutex threads_mutex;
  std::condition_variable threads_cv;  // signalled when a connection thread ends
  unsigned handshaking = 0;            // connections that have not finished their hello (threads_mutex)
  std::map<std::string, unsigned> handshaking_from;  // the same, by source address (threads_mutex)

  std::mutex memory_mutex;
  std::condition_variable memory_cv;
  std::uint64_t memory_used = 0;   // bytes of the buffers in use
  std::uint64_t pooled = 0;        // capacity of the idle buffers in pool
  std::vector<std::vector<std::byte>> pool;
  std::map<std::string, std::uint64_t> held_by;  // bytes in use, by caller (memory_mutex)

  std::mutex upload_mutex;
  clock::time_point upload_next = clock::now();

  std::mutex artifacts_mutex;
  std::map<std::string, std::shared_ptr<const artifact_info>> artifacts;

  void accept_loop();
  // source: the address's key for the handshake shares; address: the caller's address, for logs.
  void serve(detail::unique_fd fd, const std::string& source, const std::string& address);
  bool handle(connection& c, const peer_identity& who, const peer::frame_in& f);
  bool setup_rdma(connection& c, const peer::frame_in& f);
  result<std::shared_ptr<const artifact_info>> artifact(const std::string& id);

  // Piece buffers come from a pool bounded by the memory budget: a buffer in use and the idle
  // ones kept for reuse (so no fresh pages are faulted in per piece) never exceed it together, and
  // a piece larger than the whole budget goes alone. One caller's connections together hold at
  // most memory_per_caller (or one buffer), so no caller can take the budget from the others.
  // Empty optional when stopping or after waiting io_timeout (the caller is answered "busy").
  std::optional<std::vector<std::byte>> take_buffer(std::uint64_t bytes, const std::string& caller) {
    std::unique_lock lock(memory_mutex);
    auto give_up = clock::now() + o.io_timeout;
    auto full = [&] {
      auto mine = held_by.count(caller) ? held_by[caller] : 0;
      return (memory_used > 0 && memory_used + bytes > o.memory_budget) ||
             (mine > 0 && mine + bytes > o.memory_per_caller);
    };
    while (!stopping.load() && full() && clock::now() < give_up) memory_cv.wait_for(lock, std::chrono::milliseconds(200));
    if (stopping.load() || full()) return std::nullopt;
    memory_used += bytes;
    held_by[caller] += bytes;
    std::vector<std::byte> buf;
    auto fit = std::find_if(pool.begin(), pool.end(), [&](const auto& b) { return b.capacity() >= bytes; });
    if (fit != pool.end()) {
      buf = std::move(*fit);
      pool.erase(fit);
      pooled -= buf.capacity();
    }
    while (!pool.empty() && memory_used + pooled > o.memory_budget) {
      pooled -= pool.back().capacity();
      pool.pop_back();
    }
    lock.unlock();
    buf.resize(bytes);
    return buf;
  }
  // bytes: what take_buffer was asked for (a reused buffer's extra capacity counts as pooled).
  void give_buffer(std::vector<std::byte> buf, std::uint64_t bytes, const std::string& caller) {
    sodium_memzero(buf.data(), buf.size());
    std::lock_guard lock(memory_mutex);
    memory_used -= bytes;
    if (auto it = held_by.find(caller); it != held_by.end() && (it->second -= bytes) == 0) held_by.erase(it);
    if (memory_used + pooled + buf.capacity() <= o.memory_budget) {
      pooled += buf.capacity();
      pool.push_back(std::move(buf));
    }
    memory_cv.notify_all();
  }
  // The server-wide upload limit: each chunk reserves its share of time.
  void pace_upload(std::size_t bytes) {
    if (!o.max_upload_bytes_per_second) return;
    clock::time_point start;
    {
      std::lock_guard lock(upload_mutex);
      start = std::max(clock::now(), upload_next);
      upload_next = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(
                                static_cast<double>(bytes) / static_cast<double>(o.max_upload_bytes_per_second)));
    }
    while (!stopping.load() && clock::now() < start)
      std::this_thread::sleep_for(std::min<clock::duration>(start - clock::now(), std::chrono::milliseconds(100)));
  }
};

namespace {

result<void> send_error(peer::tls_stream& s, wire_error code, std::string_view message, clock::time_point deadline,
                        const std::atomic<bool>* stop) {
  peer::writer w;
  peer::encode(w, peer::error_frame{static_cast<std::uint16_t>(code), message});
  return peer::write_frame(s, frame::error, w.view(), deadline, stop);
}

// Sends an answer: BODY with the length on the control channel, then the bytes over the data
// path (DATA frames, or RDMA writes). One deadline covers the whole answer, sized for a slow but
// honest reader (64 KiB/s): a client that reads slower cannot hold a thread and a piece buffer
// for longer. The upload limit's waits are not its fault.
result<void> send_answer(peer::tls_stream& s, transport::data_path& path, std::span<const std::byte> bytes,
                         std::chrono::milliseconds io_timeout, const std::atomic<bool>* stop,
                         const transport::pace_fn& pace) {
  auto deadline = clock::now() + io_timeout + std::chrono::seconds(bytes.size() >> 16);
  peer::writer w;
  peer::encode_answer_length(w, bytes.size());
  if (auto r = peer::write_frame(s, frame::body, w.view(), deadline, stop); !r) return r;
  return path.send(bytes, deadline, stop, pace);
}

}  // namespace

result<std::shared_ptr<const artifact_info>> peer_server::impl::artifact(const std::string& id) {
  {
    std::lock_guard lock(artifacts_mutex);
    if (auto it = artifacts.find(id); it != artifacts.end()) return it->second;
  }
  auto bundle = st->bundle(id);
  if (!bundle) return std::move(bundle).error();
  auto details = st->show(id);
  if (!details) return std::move(details).error();
  auto info = std::make_shared<artifact_info>();
  info->bundle = std::move(*bundle);
  for (std::size_t f = 0; f < details->files.size(); ++f) {
    const auto& file = details->files[f];
    for (std::size_t k = 0; k < file.pieces; ++k) {
      std::uint64_t begin = k * details->piece_size;
      info->piece_file.push_back(f);
      info->piece_length.push_back(std::min(details->piece_size, file.size - begin));
    }
  }
  std::lock_guard lock(artifacts_mutex);
  artifacts.emplace(id, info);
  return std::shared_ptr<const artifact_info>(info);
}

// RDMA_SETUP: the caller's QPs and landing slots. Answered RDMA_READY with ours, or ERROR
// rdma_unavailable (the connection stays on TCP+TLS). Returns false when the connection must close.
bool peer_server::impl::setup_rdma(connection& c, const peer::frame_in& f) {
  auto io = clock::now() + o.io_timeout;
  auto unavailable = [&](std::string why) {
    return send_error(c.tls, wire_error::rdma_unavailable, why, io, &stopping).has_value();
  };
  if (!rdma_device) return unavailable("this server offers no RDMA");
  if (c.rdma) {
    n.protocol_error();
    (void)send_error(c.tls, wire_error::bad_request, "RDMA is already set up on this connection", io, &stopping);
    return false;
  }
  auto remote = rdma::decode(f.body, true);
  if (!remote) {
    n.protocol_error();
    (void)send_error(c.tls, wire_error::bad_request, remote.error().detail(), io, &stopping);
    return false;
  }
  std::uint64_t bytes = rdma::endpoint::sender_bytes(*remote);
  if (rdma_registered.fetch_add(bytes) + bytes > o.memory_budget) {
    rdma_registered -= bytes;
    return unavailable("the server's RDMA memory is all in use");
  }
  auto ep = rdma::endpoint::sender(rdma_device, o.rdma, *remote, c.tls.fd());
  if (!ep) {
    rdma_registered -= bytes;
    return unavailable(ep.error().detail());
  }
  c.rdma_budget_used = &rdma_registered;
  c.rdma_bytes = bytes;
  auto body = rdma::encode((*ep)->address(), false);
  if (!peer::write_frame(c.tls, frame::rdma_ready, body, io, &stopping)) return false;
  c.rdma = std::move(*ep);
  n.rdma_connections++;
  return true;
}

// One request. Returns false when the connection must close.
bool peer_server::impl::handle(connection& c, const peer_identity& who, const peer::frame_in& f) {
  auto& s = c.tls;
  auto io = [&] { return clock::now() + o.io_timeout; };
  auto bad = [&](std::string why) {
    n.protocol_error();
    (void)send_error(s, wire_error::bad_request, why, io(), &stopping);
    return false;
  };
  auto type = static_cast<frame>(f.type);  // a request: serve() refused anything else unread
  if (type == frame::rdma_setup) return setup_rdma(c, f);
  auto req = peer::decode_request(type, f.body);
  if (!req) return bad("malformed request body");
  std::string id = peer::artifact_from_wire(req->artifact);
  const std::uint32_t file_index = req->file, piece_index = req->piece;

  // Authorization comes first, so a caller learns nothing of artifacts it may not read (not even
  // whether they exist: an unknown artifact is judged with no bundle, which only an id or "all"
  // rule can allow). The store is not even asked unless a publisher rule needs the bundle, so a
  // refusal takes as long for a held artifact as for an unknown one.
  std::optional<result<std::shared_ptr<const artifact_info>>> info;
  if (policy->reads_bundles()) info.emplace(artifact(id));
  auto allowed = policy->authorize(who, id, info && *info ? std::string_view((**info)->bundle) : std::string_view());
  if (!allowed) {
    n.denial();
    detail::log(log_level::warning, "request denied by the policy",
                {{"caller", who.display()}, {"artifact", id}, {"reason", allowed.error().message()}});
    detail::audit("peer.denied", {{"caller", who.display()}, {"artifact", id}, {"reason", allowed.error().message()}});
    return send_error(s, wire_error::denied, allowed.error().message(), io(), &stopping).has_value();
  }
  if (!info) info.emplace(artifact(id));
  if (!*info) {
    bool missing = info->error().code() == errc::not_found;
    return send_error(s, missing ? wire_error::not_found : wire_error::internal,
                      missing ? fmt::format("no artifact {}", id) : "the store cannot read this artifact", io(), &stopping)
        .has_value();
  }
  // Once per artifact and connection, for artifacts the store holds (so the set is bounded by
  // the store, not by what a caller asks for).
  if (c.granted.insert(id).second) {
    detail::log(log_level::debug, "request granted", {{"caller", who.display()}, {"artifact", id}});
    detail::audit("peer.granted", {{"caller", who.display()}, {"artifact", id}});
  }
  const artifact_info& a = ***info;
  auto pace = [this](std::size_t bytes) { pace_upload(bytes); };
  if (type == frame::get_bundle)
    return send_answer(s, *c.tcp, std::as_bytes(std::span(a.bundle.data(), a.bundle.size())), o.io_timeout, &stopping, {})
        .has_value();
  if (type == frame::get_have) {
    auto stored = st->stored_pieces(id);
    if (!stored) return send_error(s, wire_error::internal, "the store cannot list its pieces", io(), &stopping).has_value();
    std::vector<bool> have(a.piece_length.size());
    for (std::size_t i = 0; i < have.size() && i < stored->size(); ++i) have[i] = (*stored)[i];
    peer::writer w;
    peer::encode_holdings(w, have);
    return send_answer(s, *c.tcp, w.view(), o.io_timeout, &stopping, {}).has_value();
  }
  if (piece_index >= a.piece_length.size() || a.piece_file[piece_index] != file_index)
    return send_error(s, wire_error::not_found, fmt::format("artifact {} has no piece {} in file {}", id, piece_index,
                                                            file_index),
                      io(), &stopping)
        .has_value();
  std::uint64_t length = a.piece_length[piece_index];
  transport::data_path& path = c.rdma ? static_cast<transport::data_path&>(*c.rdma) : *c.tcp;
  // Large pieces stream through a chunk: 1 MiB (or max_buffered_piece if smaller), rounded up to
  // a multiple of the data path's granule.
  const bool streamed = length > o.max_buffered_piece;
  const std::uint64_t granule = std::max<std::size_t>(1, path.send_granule());
  const std::uint64_t chunk_size = std::clamp<std::uint64_t>(o.max_buffered_piece, 1, std::uint64_t{1} << 20);
  const std::uint64_t hold = streamed ? (chunk_size + granule - 1) / granule * granule : length;
  const std::string caller = who.display();
  auto taken = take_buffer(hold, caller);
  if (!taken) {
    if (stopping.load()) return false;
    n.buffers_busy();
    return send_error(s, wire_error::busy, "the server's piece buffers are all in use; try again", io(), &stopping)
        .has_value();
  }
  auto& buf = *taken;
  auto served = [&] {
    n.served(length, c.rdma != nullptr);
    c.pieces++, c.bytes += length;
  };
  auto cannot_read = [&](const error& e) {  // nothing of the answer went out: say why, and carry on
    bool absent = e.code() == errc::model_mismatch;
    return send_error(s, absent ? wire_error::not_found : wire_error::internal,
                      absent ? fmt::format("piece {} is not stored here (yet)", piece_index)
                             : "the store cannot read this piece",
                      io(), &stopping)
        .has_value();
  };
  // The tag only: every receiver checks the piece against its signed digest before using it, so
  // hashing here would double the server's CPU per byte for no added safety.
  if (streamed) {
    bool started = false;
    auto sent = st->stream_piece(id, piece_index, buf, [&](std::span<const std::byte> chunk) -> result<void> {
      if (!started) {
        started = true;
        peer::writer w;
        peer::encode_answer_length(w, length);
        if (auto r = peer::write_frame(s, frame::body, w.view(), io(), &stopping); !r) return r;
      }
      // Each chunk has its own deadline, sized for a slow but honest reader (64 KiB/s).
      return path.send(chunk, clock::now() + o.io_timeout + std::chrono::seconds(chunk.size() >> 16), &stopping, pace);
    }, read_check::tag_only);
    bool keep = sent.has_value();
    if (!sent && !started) {
      keep = cannot_read(sent.error());
    } else if (keep) {
      served();
    }
    // A failure half-way through an answer ends the connection: the caller cannot resynchronize.
    give_buffer(std::move(buf), hold, caller);
    return keep;
  }
  auto read = st->read_piece(id, piece_index, buf, read_check::tag_only);
  bool keep = true;
  if (!read) {
    keep = cannot_read(read.error());
  } else {
    // Pieces take RDMA when the caller set it up; a failure there ends the connection, and the
    // caller asks again over TCP+TLS.
    auto sent = send_answer(s, path, buf, o.io_timeout, &stopping, pace);
    keep = sent.has_value();
    if (!sent && c.rdma && c.rdma->broken())
      detail::log(log_level::warning, fmt::format("RDMA with {} failed ({}); the connection is closed and the caller "
                                                  "continues over TCP+TLS",
                                                  who.display(), sent.error().detail()));
    if (keep) served();
  }
  give_buffer(std::move(buf), hold, caller);
  return keep;
}

void peer_server::impl::serve(detail::unique_fd fd, const std::string& source, const std::string& address) {
  // This connection holds a handshake slot (of the server's, and of its address's) until its
  // WELCOME is sent, or it ends.
  bool in_handshake = true;
  auto handshake_over = [&] {
    if (!in_handshake) return;
    in_handshake = false;
    std::lock_guard lock(threads_mutex);
    handshaking--;
    if (auto it = handshaking_from.find(source); it != handshaking_from.end() && --it->second == 0)
      handshaking_from.erase(it);
  };
  struct on_exit {
    std::function<void()> f;
    ~on_exit() { f(); }
  } release_slot{handshake_over};
  // A caller that has not started its TLS handshake soon is not going to: idle sockets are closed
  // well before the handshake deadline, so holding slots costs an attacker reconnections.
  {
    pollfd p{fd.get(), POLLIN, 0};
    auto until = clock::now() + o.first_byte_timeout;
    int ready = 0;
    while (!stopping.load() && (ready = ::poll(&p, 1, 100)) == 0 && clock::now() < until) {
    }
    if (ready <= 0) {
      n.refused(metrics::refusal::tls);
      return;
    }
  }
  peer::ssl_ptr ssl(SSL_new(ctx.get()));
  if (!ssl) return;
  peer::tls_stream s(std::move(fd), std::move(ssl));
  auto hs_deadline = clock::now() + o.handshake_timeout;
  auto refuse = [&](wire_error code, const std::string& why) {
    n.refused(code == wire_error::unauthenticated ? metrics::refusal::authorization : metrics::refusal::tls);
    (void)send_error(s, code, why, clock::now() + o.io_timeout, &stopping);
  };
  if (!s.accept(hs_deadline, &stopping)) {
    n.refused(metrics::refusal::tls);
    return;
  }
  peer_identity who = s.identity();
  // The first frame must be a HELLO: its type is checked before its body is read (or allocated).
  auto head = peer::read_header(s, hs_deadline, &stopping);
  if (!head) {
    if (head.error().code() == errc::malformed_bundle) return refuse(wire_error::bad_request, head.error().detail());
    n.refused(metrics::refusal::tls);
    return;
  }
  if (static_cast<frame>(head->type) != frame::hello) return refuse(wire_error::bad_request, "expected a HELLO frame");
  std::vector<std::byte> hello(head->length);
  if (auto r = s.read_exact(hello, hs_deadline, &stopping); !r) {
    n.refused(metrics::refusal::tls);
    return;
  }
  struct wipe_hello {  // the body holds the token
    std::vector<std::byte>& b;
    ~wipe_hello() { sodium_memzero(b.data(), b.size()); }
  } wipe{hello};
  auto decoded = peer::decode_hello(hello);
  if (!decoded)
    return refuse(decoded.error().code() == errc::unsupported ? wire_error::unsupported_version : wire_error::bad_request,
                  decoded.error().detail());
  const std::span<const std::byte> token = decoded->token, traceparent = decoded->traceparent;
  // The connection's span: in the caller's trace when it named one, so that what this server
  // logs about serving a fetch joins the fetch's own lines.
  trace_context trace = trace_context::fresh();
  if (!traceparent.empty()) {
    auto parent = trace_context::parse(std::string_view(reinterpret_cast<const char*>(traceparent.data()), traceparent.size()));
    if (!parent) return refuse(wire_error::bad_request, "the HELLO's " + parent.error().detail());
    trace = parent->child();
  }
  detail::trace_scope in_trace(&trace);
  if (!token.empty()) {
    std::string text(reinterpret_cast<const char*>(token.data()), token.size());
    if (!o.token_keys) {
      sodium_memzero(text.data(), text.size());
      return refuse(wire_error::unauthenticated, "this server accepts no tokens");
    }
    token_check check;
    check.audience = o.audience;
    check.issuer = o.token_issuer;
    check.require_binding = o.require_bound_tokens;
    check.certificate_thumbprint = who.certificate_thumbprint;  // a bound token must name this connection's
    auto claims = verify_token(text, *o.token_keys, check);
    sodium_memzero(text.data(), text.size());
    if (!claims) {
      n.token_refused(claims.error());
      detail::log(log_level::warning, "token refused",
                  {{"caller", who.has_certificate ? who.display() : std::string("(no certificate)")},
                   {"reason", claims.error().detail()}});
      detail::audit("token.refused", {{"caller", who.has_certificate ? who.display() : std::string("(no certificate)")},
                                      {"reason", claims.error().detail()}});
      return refuse(wire_error::unauthenticated, "token refused: " + claims.error().detail());
    }
    who.token = std::move(*claims);
  }
  if (!who.has_certificate && !who.token) return refuse(wire_error::unauthenticated, "no certificate and no token");
  peer::writer w;
  peer::encode(w, peer::welcome{decoded->version, rdma_device ? peer::feature_rdma : std::uint16_t{0}});
  if (!peer::write_frame(s, frame::welcome, w.view(), clock::now() + o.io_timeout, &stopping)) return;
  handshake_over();
  connection conn{s, transport::make_tcp_transport(s), nullptr, nullptr, 0, 0, 0, {}};
  struct log_on_close {  // one line per connection, however it ends
    const connection& c;
    const peer_identity& who;
    const std::string& address;
    clock::time_point start = clock::now();
    ~log_on_close() {
      detail::log(log_level::info, "connection closed",
                  {{"caller", who.display()}, {"address", address}, {"pieces", c.pieces}, {"bytes", c.bytes},
                   {"seconds", std::chrono::duration<double>(clock::now() - start).count()}});
    }
  } summary{conn, who, address};

  // Requests, each slowed to the per-connection rate.
  auto gap = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(1.0 / std::max(o.max_requests_per_second, 0.001)));
  auto next = clock::now();
  while (!stopping.load()) {
    // One deadline for the whole request: a caller trickling a frame gets no more than an idle one.
    auto deadline = clock::now() + o.idle_timeout;
    auto h = peer::read_header(s, deadline, &stopping);
    auto t = h ? static_cast<frame>(h->type) : frame::error;
    if (h && t != frame::get_bundle && t != frame::get_have && t != frame::get_piece && t != frame::rdma_setup)
      h = error(errc::malformed_bundle, fmt::format("frame type 0x{:02x} is not a request", h->type));
    if (!h) {
      if (h.error().code() == errc::malformed_bundle) {
        n.protocol_error();
        (void)send_error(s, wire_error::bad_request, h.error().detail(), clock::now() + o.io_timeout, &stopping);
      }
      return;
    }
    peer::frame_in f{h->type, std::vector<std::byte>(h->length)};
    if (!s.read_exact(f.body, deadline, &stopping)) return;
    // A token is good until it expires, also on a connection opened before.
    if (who.token && std::chrono::system_clock::now() > who.token->expires + std::chrono::seconds(60)) {
      metrics::global().token_failures[metrics::token_failure::expired].add();
      detail::audit("token.refused", {{"caller", who.display()}, {"reason", "the token expired during the connection"}});
      (void)send_error(s, wire_error::unauthenticated, "the token has expired", clock::now() + o.io_timeout, &stopping);
      return;
    }
    n.request();
    auto now = clock::now();
    if (next > now) std::this_thread::sleep_until(next);
    next = std::max(now, next) + gap;
    if (!handle(conn, who, f)) return;
  }
}

namespace {

// What handshake slots are counted by: the IPv4 address, or the /64 of an IPv6 one (a single
// host commonly holds a whole /64). An IPv4 address mapped into IPv6 counts as IPv4.
std::string source_key(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(a).sin_addr;
    return std::string(reinterpret_cast<const char*>(&v4), 4);
  }
  if (a.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(a).sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(&v6)) return std::string(reinterpret_cast<const char*>(v6.s6_addr) + 12, 4);
    return std::string(reinterpret_cast<const char*>(v6.s6_addr), 8);
  }
  return {};
}

std::string address_text(const sockaddr_storage& a) {
  char text[INET6_ADDRSTRLEN] = {};
  const void* bytes = a.ss_family == AF_INET6 ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in6&>(a).sin6_addr)
                                              : static_cast<const void*>(&reinterpret_cast<const sockaddr_in&>(a).sin_addr);
  return ::inet_ntop(a.ss_family, bytes, text, sizeof text) ? text : "?";
}

// Runs fn on a thread that is created detached. Not std::thread(fn).detach(): glibc's
// pthread_detach marks the thread detached and then reads its descriptor, and a thread exiting
// in between frees that descriptor itself (unmapping its stack once glibc's stack cache is full),
// so the read faults. The soak found it: a rare segfault in pthread_detach after connections
// that end at once (a reconnect storm). False when no thread can be had.
template <class F>
bool start_detached(F fn) noexcept {
  std::unique_ptr<F> heap;
  try {
    heap = std::make_unique<F>(std::move(fn));
  } catch (const std::bad_alloc&) {
    return false;
  }
  pthread_attr_t attr;
  if (::pthread_attr_init(&attr) != 0) return false;
  ::pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t thread;
  auto run = [](void* p) -> void* {
    std::unique_ptr<F> f(static_cast<F*>(p));
    (*f)();
    return nullptr;
  };
  int rc = ::pthread_create(&thread, &attr, run, heap.get());
  ::pthread_attr_destroy(&attr);
  if (rc != 0) return false;
  (void)heap.release();  // the thread owns it now
  return true;
}

}  // namespace

void peer_server::impl::accept_loop() {
  while (!stopping.load()) {
    pollfd p{listener.get(), POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    sockaddr_storage from{};
    socklen_t from_len = sizeof from;
    int fd = ::accept4(listener.get(), reinterpret_cast<sockaddr*>(&from), &from_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) continue;
    detail::unique_fd conn(fd);
    std::string source = source_key(from);
    // Answers are a small BODY frame and then the bytes: without this, Nagle holds the tail of an
    // answer until the caller's delayed ACK (tens of milliseconds per piece).
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    n.accepted();
    {
      std::lock_guard lock(threads_mutex);
      // Connections still in their handshake get a quarter of the slots: callers with no
      // certificate cannot crowd out the authenticated ones.
      // Once half of those are taken, an address holding its share gets no more, so that a
      // single host cannot take them all (and a burst from one host is fine while there is room).
      const unsigned cap = std::max(4u, o.max_connections / 4);
      auto& mine = handshaking_from[source];
      const bool full = n.active.load() >= o.max_connections || handshaking >= cap;
      if (full || (handshaking >= cap / 2 && mine >= std::max(1u, o.max_handshakes_per_address))) {
        if (mine == 0) handshaking_from.erase(source);
        n.refused(full ? metrics::refusal::limit : metrics::refusal::address);
        continue;  // closed at once: a connection beyond the limit costs no thread
      }
      n.opened();
      handshaking++;
      mine++;
    }
    bool started = start_detached([this, c = std::move(conn), source, address = address_text(from)]() mutable {
      try {
        serve(std::move(c), source, address);
      } catch (...) {  // out of memory, say: this connection ends, the server and its host live on
      }
      std::lock_guard lock(threads_mutex);
      n.closed();
      threads_cv.notify_all();
    });
    if (!started) {  // no thread to be had
      std::lock_guard lock(threads_mutex);
      n.closed();
      handshaking--;
      if (auto it = handshaking_from.find(source); it != handshaking_from.end() && --it->second == 0)
        handshaking_from.erase(it);
      n.refused(metrics::refusal::limit);
    }
  }
}

result<peer_server> peer_server::start(store& s, peer_server_options options) {
  auto hp = peer::split_host_port(options.listen);
  if (!hp) return std::move(hp).error();
  if (options.max_connections == 0) return error(errc::invalid_argument, "max_connections must be at least 1");
  if (!options.require_client_certificate && !options.token_keys)
    return error(errc::invalid_argument, "without client certificates, callers need tokens: give a JWKS");
  auto p = std::make_unique<impl>();
  p->st = &s;
  auto ctx = peer::server_context(options.cert_file, options.key_file, options.client_ca_file,
                                  options.require_client_certificate);
  if (!ctx) return std::move(ctx).error();
  p->ctx = std::move(*ctx);
  p->policy = options.policy ? options.policy
                             : std::make_shared<const access_policy>(access_policy::authenticated_callers());
  p->o = std::move(options);
  if (p->o.rdma.enabled) {
    if (auto c = rdma::check(p->o.rdma); !c) return std::move(c).error();
    auto dev = rdma::open_device(p->o.rdma);
    if (dev) p->rdma_device = std::move(*dev);
    else detail::log(log_level::warning, fmt::format("RDMA is not available ({}): peers are served over TCP+TLS",
                                                     dev.error().detail()));
  }

  if (!p->o.metrics_listen.empty()) {
    auto ms = metrics_server::start(p->o.metrics_listen);
    if (!ms) return std::move(ms).error();
    p->metrics.emplace(std::move(*ms));
  }
  auto l = peer::tcp_listen(hp->first, hp->second, 512);
  if (!l) return std::move(l).error();
  p->port = l->port;
  p->listener = std::move(l->fd);
  p->acceptor = std::thread([raw = p.get()] { raw->accept_loop(); });
  return peer_server(std::move(p));
}

peer_server::peer_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
peer_server::~peer_server() { stop(); }
peer_server::peer_server(peer_server&&) noexcept = default;
peer_server& peer_server::operator=(peer_server&& o) noexcept {
  if (this != &o) {
    stop();
    impl_ = std::move(o.impl_);
  }
  return *this;
}

std::uint16_t peer_server::port() const noexcept { return impl_ ? impl_->port : 0; }
std::uint16_t peer_server::metrics_port() const noexcept {
  return impl_ && impl_->metrics ? impl_->metrics->port() : 0;
}

peer_server_stats peer_server::stats() const noexcept {
  if (!impl_) return {};
  const auto& n = impl_->n;
  return {n.connections.load(), n.active.load(),          n.handshake_failures.load(), n.busy.load(),
          n.requests.load(),    n.denied.load(),          n.protocol_errors.load(),    n.pieces_served.load(),
          n.bytes_served.load(), n.rdma_connections.load(),   n.pieces_served_rdma.load()};
}

void peer_server::stop() noexcept {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  if (impl_->acceptor.joinable()) impl_->acceptor.join();
  impl_->listener = detail::unique_fd();
  // Connection threads notice `stopping` within one poll slice.
  std::unique_lock lock(impl_->threads_mutex);
  impl_->threads_cv.wait(lock, [&] { return impl_->n.active.load() == 0; });
  lock.unlock();
  impl_->metrics.reset();
}

}  // namespace drun
