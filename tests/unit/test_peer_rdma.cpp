// RDMA through the whole peer stack, on the fake fabric: a real peer server (TLS 1.3, mutual
// certificates from a test CA made with openssl) serving a real store, a fetch into another
// store, every piece verified. Then each way RDMA can fail or be missing, with the fetch
// completing over TCP+TLS and the reason logged once; and a malformed RDMA_SETUP refused.
#include <drun/fetch.hpp>
#include <drun/log.hpp>
#include <drun/peer.hpp>
#include <drun/store.hpp>

#include "fake_verbs.hpp"
#include "peer/tls.hpp"
#include "peer/wire.hpp"
#include "support.hpp"
#include "transport/rdma.hpp"

#include <algorithm>
#include <functional>
#include <mutex>
#include <thread>

using namespace drun;
using test::set_knobs;
using namespace std::chrono_literals;

namespace {

node_key key_of(char c) { return std::move(node_key::from_text(std::string(64, c))).value(); }

// Messages from the library, captured for the test's scope.
struct captured_log {
  std::mutex m;
  std::vector<std::string> lines;
  captured_log() {
    set_log_sink([this](log_level, std::string_view msg) {
      std::lock_guard lock(m);
      lines.emplace_back(msg);
    });
  }
  ~captured_log() { set_log_sink({}); }
  std::size_t count(std::string_view part) {
    std::lock_guard lock(m);
    return static_cast<std::size_t>(std::count_if(lines.begin(), lines.end(), [&](const std::string& l) {
      return l.find(part) != std::string::npos;
    }));
  }
  std::string all() {
    std::lock_guard lock(m);
    std::string out;
    for (const auto& l : lines) out += l + "\n";
    return out;
  }
};

rdma_options fake_rdma() {
  rdma_options o;
  o.enabled = true;
  o.slot_size = 16384;  // 64 KiB pieces: four slices each
  o.slot_count = 8;
  o.queue_pairs = 2;
  o.timeout = 500ms;
  return o;
}

// A seeded server store and an empty client store, and a fetch between them.
struct swarm {
  test::fake_verbs_scope fake;
  test::test_pki certs;
  test::temp_dir d;
  std::string model = test::pattern(40 * 65536 + 1234, 3);
  std::string bundle;
  std::optional<verified_manifest> vm;
  std::optional<store> server_store, client_store;
  std::optional<peer_server> server;

  explicit swarm(bool server_rdma = true, const std::function<void(peer_server_options&)>& tweak = {}) {
    test::write_file(d / "m/weights.bin", model);
    vm.emplace(test::sign_and_verify(d / "m", 65536, &bundle));
    server_store.emplace(std::move(store::open(d / "s1", key_of('a'))).value());
    client_store.emplace(std::move(store::open(d / "s2", key_of('b'))).value());
    REQUIRE(import_model(*server_store, *vm, bundle, d / "m", 2));
    peer_server_options o;
    o.cert_file = certs.file("node.pem");
    o.key_file = certs.file("node.key");
    o.client_ca_file = certs.file("ca.pem");
    o.rdma = fake_rdma();
    o.rdma.enabled = server_rdma;
    if (tweak) tweak(o);
    auto s = peer_server::start(*server_store, o);
    REQUIRE(s);
    server.emplace(std::move(*s));
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }

  result<fetch_report> fetch_all(bool client_rdma = true) {
    peer_client_options po;
    po.ca_file = certs.file("ca.pem");
    po.cert_file = certs.file("node.pem");
    po.key_file = certs.file("node.key");
    po.rdma = fake_rdma();
    po.rdma.enabled = client_rdma;
    auto src = make_peer_source(address(), po);
    REQUIRE(src);
    std::vector<std::unique_ptr<source>> sources;
    sources.push_back(std::move(*src));
    fetch_options fo;
    fo.connections = 3;
    fo.per_peer = 3;
    return fetch(*client_store, *vm, bundle, sources, fo);
  }
  // The client's copy, decrypted, is the model.
  void check_copy() {
    test::temp_dir out;
    REQUIRE(client_store->materialize(vm->artifact_id(), out / "x"));
    CHECK(test::read_text(out / "x/weights.bin") == model);
  }
};

}  // namespace

TEST_CASE("peer rdma: pieces move over RDMA, verified, through several connections") {
  captured_log log;
  swarm s;
  auto r = s.fetch_all();
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  CHECK(r->fetched == s.vm->pieces().size());
  s.check_copy();
  auto st = s.server->stats();
  CHECK(st.pieces_served == s.vm->pieces().size());
  CHECK(st.pieces_served_rdma == st.pieces_served);
  CHECK(st.rdma_connections >= 1);
  CHECK(st.rdma_connections <= 3);
  CHECK(test::counters().writes == 4 * s.vm->pieces().size() - 3);  // the last piece is 1234 bytes
  CHECK_MESSAGE(log.count("RDMA") == 0, log.all());
}

TEST_CASE("peer: pieces over max_buffered_piece stream in chunks, over RDMA and over TCP+TLS") {
  for (bool rdma : {true, false}) {
    CAPTURE(rdma);
    // 4 KiB chunks on TCP; on RDMA the chunk is rounded up to the receiver's slot size.
    swarm s(true, [](peer_server_options& o) { o.max_buffered_piece = 4096; });
    auto r = s.fetch_all(rdma);
    REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
    CHECK(r->fetched == s.vm->pieces().size());
    s.check_copy();
    auto st = s.server->stats();
    CHECK(st.pieces_served == s.vm->pieces().size());
    CHECK(st.pieces_served_rdma == (rdma ? st.pieces_served : 0));
  }
}

TEST_CASE("peer rdma: a completion error mid-fetch: the peer's remaining pieces come over TCP+TLS") {
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.fail_write_after = 30; });
  auto r = s.fetch_all();
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  s.check_copy();
  auto st = s.server->stats();
  CHECK(st.pieces_served_rdma > 0);
  CHECK(st.pieces_served_rdma < s.vm->pieces().size());
  CHECK(r->sources.at(0).rejected == 0);
  CHECK_FALSE(r->sources.at(0).banned);
  // Said once for the peer, with the cause; the fetch never noticed otherwise.
  CHECK_MESSAGE(log.count("RDMA to peer " + s.address() + " ended") == 1, log.all());
  // The cause as the client saw it: its own completion error, or the server's QP gone to error.
  CHECK_MESSAGE(log.count("ended (RDMA on fake0: ") == 1, log.all());
  // The server says so too, naming the caller.
  CHECK_MESSAGE(log.count("RDMA with CN=node failed (RDMA on fake0: remote access error)") >= 1, log.all());
  CHECK(log.count("its pieces continue over TCP+TLS") == 1);
}

TEST_CASE("peer rdma: a peer that stops answering over RDMA: timeout, then TCP+TLS") {
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.drop_after = 12; });
  auto r = s.fetch_all();
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  s.check_copy();
  CHECK_MESSAGE(log.count("no completion for") >= 1, log.all());
  CHECK(log.count("ended") == 1);
}

TEST_CASE("peer rdma: the device removed mid-fetch, and a QP driven to error") {
  for (bool removal : {true, false}) {
    captured_log log;
    swarm s;
    // The first pieces go over RDMA; then the fabric fails under them.
    std::atomic<bool> done{false};
    std::thread breaker([&] {
      while (!done && test::counters().writes < 20) std::this_thread::sleep_for(1ms);
      if (removal) set_knobs([](test::fake_knobs& k) { k.device_removed = true; });
      else test::fail_all_qps();
    });
    auto r = s.fetch_all();
    done = true;
    breaker.join();
    REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
    s.check_copy();
    CHECK_MESSAGE(log.count("its pieces continue over TCP+TLS") == 1, log.all());
  }
}

TEST_CASE("peer rdma: a slice that lands short is a protocol breach: RDMA ends, the fetch goes on") {
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.short_write_after = 5; });
  auto r = s.fetch_all();
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  s.check_copy();
  CHECK_MESSAGE(log.count("bytes, not") == 1, log.all());
}

TEST_CASE("peer rdma: bytes flipped on the fabric fail the signed digest; nothing unverified is stored") {
  // The fabric is not trusted for integrity: a slice whose bytes changed passes the transport
  // and is caught by the manifest, and the peer is charged with it like any source.
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.corrupt_after = 9; });
  auto r = s.fetch_all();
  REQUIRE_FALSE(r);
  CHECK_MESSAGE(r.error().code() == errc::digest_mismatch, r.error().message());
  auto stored = s.client_store->stored_pieces(s.vm->artifact_id());
  REQUIRE(stored);
  auto held = static_cast<std::size_t>(std::count(stored->begin(), stored->end(), true));
  CHECK(held < s.vm->pieces().size());
  // What was stored verifies: the flipped piece is not among it.
  auto failures = s.client_store->scrub(s.vm->artifact_id());
  REQUIRE(failures);
  CHECK(failures->empty());
}

TEST_CASE("peer rdma: no device on the fetching host: TCP+TLS, said once for all peers") {
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.devices = 0; });
  rdma::install_verbs_for_testing(&test::fake_verbs());  // forget the opened device
  for (int i = 0; i < 2; ++i) {
    peer_client_options po;
    po.ca_file = s.certs.file("ca.pem");
    po.rdma = fake_rdma();
    REQUIRE(make_peer_source(s.address(), po));
  }
  auto r = s.fetch_all();
  REQUIRE(r);
  s.check_copy();
  CHECK(s.server->stats().rdma_connections == 0);
  CHECK_MESSAGE(log.count("RDMA is not available (libibverbs lists no RDMA device): peers are fetched from over TCP+TLS") == 1,
                log.all());
}

TEST_CASE("peer rdma: a server without RDMA, or a client that does not ask: TCP+TLS, nothing to say") {
  {
    captured_log log;
    swarm s(false);
    auto r = s.fetch_all(true);
    REQUIRE(r);
    s.check_copy();
    CHECK(s.server->stats().rdma_connections == 0);
    CHECK(test::counters().writes == 0);
    CHECK_MESSAGE(log.count("RDMA") == 0, log.all());
  }
  {
    swarm s(true);
    auto r = s.fetch_all(false);
    REQUIRE(r);
    CHECK(s.server->stats().rdma_connections == 0);
    CHECK(test::counters().writes == 0);
  }
}

TEST_CASE("peer rdma: a server that cannot set up RDMA answers rdma_unavailable; the fetch goes on") {
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.fail_rtr = true; });
  auto r = s.fetch_all();
  REQUIRE(r);
  s.check_copy();
  CHECK(s.server->stats().rdma_connections == 0);
  CHECK_MESSAGE(log.count("cannot bring QP 0 to RTR") == 1, log.all());
}

TEST_CASE("peer rdma: the client failing to connect its QPs: a fresh TCP+TLS connection, no error charged") {
  // The server brings its two QPs to RTR first; the client's first RTR (the third) fails, after
  // the server has already set up its side of this connection.
  captured_log log;
  swarm s;
  set_knobs([](test::fake_knobs& k) { k.fail_rtr_after = 2; });
  auto r = s.fetch_all();
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  s.check_copy();
  CHECK(r->sources.at(0).errors == 0);
  CHECK(s.server->stats().pieces_served_rdma == 0);
  CHECK_MESSAGE(log.count("ended (RDMA on fake0: cannot bring QP 0 to RTR") == 1, log.all());
}

TEST_CASE("peer rdma: registered memory counts against the server's budget") {
  // Each connection's staging ring (8 slices of 16 KiB here) is pinned memory: past the budget,
  // callers are told so and stay on TCP+TLS.
  captured_log log;
  swarm s(true, [](peer_server_options& o) { o.memory_budget = 100 << 10; });
  auto r = s.fetch_all();
  REQUIRE(r);
  s.check_copy();
  CHECK(s.server->stats().rdma_connections == 0);
  CHECK_MESSAGE(log.count("the server's RDMA memory is all in use") == 1, log.all());
}

TEST_CASE("peer rdma: a malformed or repeated RDMA_SETUP is a protocol error") {
  swarm s;
  auto ctx = peer::client_context(s.certs.file("ca.pem"), s.certs.file("node.pem"), s.certs.file("node.key"));
  REQUIRE(ctx);
  auto deadline = [] { return peer::clock::now() + 5s; };
  auto open = [&] {
    auto fd = peer::tcp_connect("127.0.0.1", std::to_string(s.server->port()), deadline());
    REQUIRE(fd);
    auto st = std::make_unique<peer::tls_stream>(std::move(*fd), peer::ssl_ptr(SSL_new(ctx->get())));
    REQUIRE(st->connect("127.0.0.1", deadline(), nullptr));
    peer::writer w;
    w.text(peer::protocol_magic).u16(peer::protocol_version).u16(0).u8(0);  // no trace context
    REQUIRE(peer::write_frame(*st, peer::frame::hello, w.view(), deadline(), nullptr));
    auto welcome = peer::read_frame(*st, deadline(), nullptr);
    REQUIRE(welcome);
    peer::reader rd(welcome->body);
    CHECK(rd.u16() == peer::protocol_version);
    CHECK(rd.u16() == peer::feature_rdma);  // offered
    return st;
  };
  auto answer_to = [&](peer::tls_stream& st, std::span<const std::byte> body) {
    REQUIRE(peer::write_frame(st, peer::frame::rdma_setup, body, deadline(), nullptr));
    auto a = peer::read_frame(st, deadline(), nullptr);
    REQUIRE(a);
    return std::move(*a);
  };
  auto st = open();
  std::vector<std::byte> junk(30, std::byte{0x5a});
  auto a = answer_to(*st, junk);
  CHECK(static_cast<peer::frame>(a.type) == peer::frame::error);
  peer::reader rd(a.body);
  CHECK(rd.u16() == static_cast<std::uint16_t>(peer::wire_error::bad_request));
  std::string msg(reinterpret_cast<const char*>(a.body.data()) + 2, a.body.size() - 2);
  CHECK_MESSAGE(msg.find("RDMA address") != std::string::npos, msg);
  CHECK(s.server->stats().protocol_errors == 1);

  // A good setup, then a second one on the same connection.
  auto st2 = open();
  auto dev = *rdma::open_device(fake_rdma());
  auto recv = rdma::endpoint::receiver(dev, fake_rdma(), st2->fd());
  REQUIRE(recv);
  auto ok = answer_to(*st2, rdma::encode((*recv)->address(), true));
  CHECK(static_cast<peer::frame>(ok.type) == peer::frame::rdma_ready);
  auto again = answer_to(*st2, rdma::encode((*recv)->address(), true));
  std::string msg2(reinterpret_cast<const char*>(again.body.data()) + 2, again.body.size() - 2);
  CHECK_MESSAGE(msg2.find("already set up") != std::string::npos, msg2);
  CHECK(s.server->stats().protocol_errors == 2);
}
