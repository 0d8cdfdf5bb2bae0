// The RDMA transport without hardware: the wire forms of its addresses, the endpoint's protocol
// (slicing, credits, striping over QPs) over the fake verbs fabric, every error path the fabric
// can produce, and the fallback to TCP+TLS through a real peer server and fetch. Also the
// dlopen seam with no library, a wrong library, and this host's real libibverbs.
#include <drun/fetch.hpp>
#include <drun/log.hpp>
#include <drun/peer.hpp>
#include <drun/store.hpp>
#include <drun/transport.hpp>

#include "fake_verbs.hpp"
#include "support.hpp"
#include "transport/rdma.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>

using namespace drun;
using test::fake_verbs_scope;
using test::set_knobs;

namespace {

using namespace std::chrono_literals;

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

std::vector<std::byte> bytes_of(std::size_t n, unsigned seed) {
  auto s = test::pattern(n, seed);
  std::vector<std::byte> out(n);
  std::memcpy(out.data(), s.data(), n);
  return out;
}

rdma_options small_options() {
  rdma_options o;
  o.enabled = true;
  o.slot_size = 4096;
  o.slot_count = 4;
  o.queue_pairs = 2;
  o.signal_every = 3;
  o.timeout = 300ms;
  return o;
}

// Two connected endpoints on the fake fabric, with a socket pair standing in for the control
// channel (closing one end is a peer going away).
struct rdma_pair {
  fake_verbs_scope fake;
  int fds[2] = {-1, -1};
  std::shared_ptr<rdma::device> dev;
  std::unique_ptr<rdma::endpoint> receiver, sender;

  explicit rdma_pair(const rdma_options& o = small_options()) {
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    auto d = rdma::open_device(o);
    REQUIRE(d);
    dev = *d;
    auto r = rdma::endpoint::receiver(dev, o, fds[0]);
    REQUIRE(r);
    receiver = std::move(*r);
    // The address crosses the wire as bytes, as it would on the control channel.
    auto addr = rdma::decode(rdma::encode(receiver->address(), true), true);
    REQUIRE(addr);
    auto s = rdma::endpoint::sender(dev, o, *addr, fds[1]);
    REQUIRE(s);
    sender = std::move(*s);
    auto back = rdma::decode(rdma::encode(sender->address(), false), false);
    REQUIRE(back);
    REQUIRE(receiver->connect(*back));
  }
  ~rdma_pair() {
    receiver.reset();
    sender.reset();
    dev.reset();
    ::close(fds[0]);
    ::close(fds[1]);
  }

  // Sends each message on a thread while this one receives them, one answer per request as on
  // a peer connection; the errors of both ends.
  std::pair<result<void>, result<void>> transfer(const std::vector<std::vector<std::byte>>& messages) {
    result<void> sent;
    std::atomic<std::size_t> requested{0};
    std::atomic<bool> over{false};
    std::thread t([&] {
      for (std::size_t i = 0; i < messages.size(); ++i) {
        while (requested.load() <= i)
          if (over.load()) return;
        sent = sender->send(messages[i], transport::clock::now() + 5s, nullptr, {});
        if (!sent) return;
      }
    });
    result<void> got;
    for (const auto& m : messages) {
      std::vector<std::byte> out(m.size());
      requested++;
      got = receiver->receive(out, transport::clock::now() + 5s, nullptr);
      if (!got) break;
      CHECK(out == m);
    }
    over = true;
    t.join();
    return {std::move(sent), std::move(got)};
  }
};

}  // namespace

TEST_CASE("rdma: addresses round-trip and every out-of-bounds field is refused") {
  rdma::endpoint_address a;
  a.lid = 0x1234;
  a.gid.raw[15] = 9;
  a.mtu = IBV_MTU_4096;
  a.qps = {{0x11, 0x22}, {0xabcdef, 0xffffff}};
  a.slots_addr = 0x7f0000001000;
  a.rkey = 0xdeadbeef;
  a.slot_size = 65536;
  a.slot_count = 32;
  auto b = rdma::decode(rdma::encode(a, true), true);
  REQUIRE(b);
  CHECK(b->lid == a.lid);
  CHECK(b->gid.raw[15] == 9);
  CHECK(b->qps.size() == 2);
  CHECK(b->qps[1].qpn == 0xabcdef);
  CHECK(b->slots_addr == a.slots_addr);
  CHECK(b->rkey == a.rkey);
  CHECK(b->slot_count == 32);
  CHECK(rdma::encode(a, true).size() <= rdma::max_encoded_size(true));

  using change = void (*)(rdma::endpoint_address&);
  const std::pair<change, const char*> bad[] = {
      {[](rdma::endpoint_address& x) { x.mtu = 0; }, "MTU code 0"},
      {[](rdma::endpoint_address& x) { x.mtu = 6; }, "MTU code 6"},
      {[](rdma::endpoint_address& x) { x.qps.clear(); }, "0 queue pairs"},
      {[](rdma::endpoint_address& x) { x.qps.assign(17, {1, 1}); }, "17 queue pairs"},
      {[](rdma::endpoint_address& x) { x.qps[0].psn = 0x1000000; }, "24 bits"},
      {[](rdma::endpoint_address& x) { x.slot_size = 4097; }, "slot size 4097"},
      {[](rdma::endpoint_address& x) { x.slot_size = 32 << 20; }, "slot size 33554432"},
      {[](rdma::endpoint_address& x) { x.slot_count = 0; }, "0 slots"},
      {[](rdma::endpoint_address& x) { x.slot_count = 5000; }, "5000 slots"},
      {[](rdma::endpoint_address& x) { x.slots_addr = ~std::uint64_t{0} - 4096; }, "wrap"},
  };
  for (auto [mutate, why] : bad) {
    auto x = a;
    mutate(x);
    auto r = rdma::decode(rdma::encode(x, true), true);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::malformed_bundle);
    CHECK_MESSAGE(contains(r.error().detail(), why), r.error().detail());
  }

  auto body = rdma::encode(a, true);
  body.push_back(std::byte{0});
  CHECK(contains(test::error_of(rdma::decode(body, true)).detail(), "trailing bytes"));
  body.resize(10);
  CHECK(contains(test::error_of(rdma::decode(body, true)).detail(), "too short"));
  CHECK(contains(test::error_of(rdma::decode(rdma::encode(a, true), false)).detail(), "trailing bytes"));
}

TEST_CASE("rdma: options are checked") {
  auto bad = [](auto change, std::string_view why) {
    auto o = small_options();
    change(o);
    auto r = rdma::check(o);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::invalid_argument);
    CHECK_MESSAGE(contains(r.error().detail(), why), r.error().detail());
  };
  bad([](rdma_options& o) { o.queue_pairs = 0; }, "queue_pairs");
  bad([](rdma_options& o) { o.queue_pairs = 17; }, "queue_pairs");
  bad([](rdma_options& o) { o.slot_size = 1000; }, "slot_size");
  bad([](rdma_options& o) { o.slot_count = 0; }, "slot_count");
  bad([](rdma_options& o) { o.signal_every = 0; }, "signal_every");
  bad([](rdma_options& o) { o.timeout = 0ms; }, "timeout");
  CHECK(rdma::check(small_options()));
}

TEST_CASE("rdma: the dlopen seam without a device") {
  std::string saved = std::getenv("DRUN_IBVERBS_LIBRARY") ? std::getenv("DRUN_IBVERBS_LIBRARY") : "";
  struct restore {
    std::string v;
    ~restore() {
      if (v.empty()) ::unsetenv("DRUN_IBVERBS_LIBRARY");
      else ::setenv("DRUN_IBVERBS_LIBRARY", v.c_str(), 1);
      rdma::install_verbs_for_testing(nullptr);
    }
  } r{saved};

  ::setenv("DRUN_IBVERBS_LIBRARY", "/nonexistent/libibverbs.so.1", 1);
  rdma::install_verbs_for_testing(nullptr);
  auto st = rdma_probe();
  CHECK_FALSE(st.available);
  CHECK(st.library == "/nonexistent/libibverbs.so.1");
  CHECK_MESSAGE(contains(st.reason, "cannot load /nonexistent/libibverbs.so.1"), st.reason);
  CHECK_FALSE(rdma_available());
  auto d = rdma::open_device(rdma_options{});
  REQUIRE_FALSE(d);
  CHECK(d.error().code() == errc::unsupported);

  // A library that loads but is not libibverbs.
  ::setenv("DRUN_IBVERBS_LIBRARY", "libc.so.6", 1);
  rdma::install_verbs_for_testing(nullptr);
  st = rdma_probe();
  CHECK_FALSE(st.available);
  CHECK_MESSAGE(contains(st.reason, "libc.so.6 is not libibverbs: it has no ibv_get_device_list"), st.reason);

  // This host's own libibverbs (libibverbs-dev brings it): a device where there is one.
  ::unsetenv("DRUN_IBVERBS_LIBRARY");
  rdma::install_verbs_for_testing(nullptr);
  st = rdma_probe();
  if (std::filesystem::exists("/sys/class/infiniband") && !std::filesystem::is_empty("/sys/class/infiniband")) {
    MESSAGE("this host has RDMA devices: " << st.devices.size() << (st.available ? " (available)" : " " + st.reason));
  } else {
    CHECK_FALSE(st.available);
    CHECK_MESSAGE(!st.reason.empty(), "a reason is given");
    MESSAGE("no RDMA device on this host: " << st.reason);
  }
}

TEST_CASE("rdma: devices that cannot be used are named") {
  fake_verbs_scope fake;
  set_knobs([](test::fake_knobs& k) { k.devices = 0; });
  CHECK(contains(test::error_of(rdma::open_device(small_options())).detail(), "lists no RDMA device"));
  rdma::install_verbs_for_testing(&test::fake_verbs());
  set_knobs([](test::fake_knobs& k) { k.devices = 1, k.port_active = false; });
  CHECK(contains(test::error_of(rdma::open_device(small_options())).detail(), "fake0 port 1: not active"));
  rdma::install_verbs_for_testing(&test::fake_verbs());
  set_knobs([](test::fake_knobs& k) { k.port_active = true; });
  auto o = small_options();
  o.device = "mlx5_9";
  CHECK(contains(test::error_of(rdma::open_device(o)).detail(), "no RDMA device named mlx5_9"));
  o.device = "fake1";
  set_knobs([](test::fake_knobs& k) { k.devices = 2; });
  auto d = rdma::open_device(o);
  REQUIRE(d);
  CHECK((*d)->name() == "fake1");
  o.gid_index = 9;
  o.device.clear();
  CHECK(contains(test::error_of(rdma::open_device(o)).detail(), "no GID index 9"));
  CHECK(rdma_probe().available);
  CHECK(rdma_probe().devices == std::vector<std::string>{"fake0", "fake1"});
}

TEST_CASE("rdma: RoCE picks the IPv4-mapped GID and addresses QPs with a GRH") {
  fake_verbs_scope fake;
  set_knobs([](test::fake_knobs& k) { k.ethernet = true; });
  auto d = rdma::open_device(small_options());
  REQUIRE(d);
  CHECK((*d)->ethernet());
  CHECK((*d)->gid_index() == 2);
  CHECK(rdma::gid_text((*d)->gid()) == "0000:0000:0000:0000:0000:ffff:0a00:0007");
  d->reset();
  rdma_pair p;  // the fake refuses RTR without a GRH on RoCE
  auto [sent, got] = p.transfer({bytes_of(10000, 1)});
  CHECK(sent);
  CHECK(got);
}

TEST_CASE("rdma: answers of every size arrive intact, in order, through few slots and several QPs") {
  for (unsigned qps : {1u, 3u}) {
    for (int max_poll : {16, 1}) {  // 1: every poll returns one completion (partial completions)
      auto o = small_options();
      o.queue_pairs = qps;
      rdma_pair p(o);
      set_knobs([&](test::fake_knobs& k) { k.max_poll = max_poll; });
      std::vector<std::vector<std::byte>> messages;
      for (std::size_t n : {std::size_t{1}, std::size_t{4096}, std::size_t{4097}, std::size_t{4096 * 4},
                            std::size_t{4096 * 13 + 17}, std::size_t{100000}})
        messages.push_back(bytes_of(n, static_cast<unsigned>(n)));
      auto [sent, got] = p.transfer(messages);
      CHECK_MESSAGE(sent, (sent ? "" : sent.error().message()));
      CHECK_MESSAGE(got, (got ? "" : got.error().message()));
      auto n = test::counters();
      std::uint64_t slices = 1 + 1 + 2 + 4 + 14 + 25;
      CHECK(n.writes == slices);
      CHECK(n.write_bytes == 1 + 4096 + 4097 + 4096 * 4 + 4096 * 13 + 17 + 100000);
      // Completions are asked for one write in signal_every per QP, plus the last on each QP.
      CHECK(n.signalled_writes < slices);
      CHECK(n.cq_overruns == 0);
      CHECK(n.recv_overruns == 0);
    }
  }
}

TEST_CASE("rdma: the sender waits for credits: a slow receiver never has a slot overwritten") {
  auto o = small_options();
  o.slot_count = 2;
  rdma_pair p(o);
  auto m = bytes_of(4096 * 9, 5);
  result<void> sent;
  std::thread t([&] { sent = p.sender->send(m, transport::clock::now() + 5s, nullptr, {}); });
  std::this_thread::sleep_for(100ms);
  // With two slots, only two slices can have been written before the receiver read any.
  CHECK(test::counters().writes == 2);
  std::vector<std::byte> out(m.size());
  auto got = p.receiver->receive(out, transport::clock::now() + 5s, nullptr);
  t.join();
  CHECK(sent);
  REQUIRE(got);
  CHECK(out == m);
}

TEST_CASE("rdma: slots are registered once and reused by later connections") {
  fake_verbs_scope fake;
  auto o = small_options();
  auto dev = *rdma::open_device(o);
  auto first = rdma::endpoint::receiver(dev, o, -1);
  REQUIRE(first);
  CHECK(test::counters().reg_mr == 1);
  first->reset();
  for (int i = 0; i < 3; ++i) {
    auto again = rdma::endpoint::receiver(dev, o, -1);
    REQUIRE(again);
  }
  CHECK(test::counters().reg_mr == 1);
  CHECK(dev->registrations() == 1);
  // Two at once need two regions (each with its own protection domain).
  auto a = rdma::endpoint::receiver(dev, o, -1);
  auto b = rdma::endpoint::receiver(dev, o, -1);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(test::counters().reg_mr == 2);
  CHECK(test::counters().alloc_pd == 2);
  a->reset();
  b->reset();
  dev.reset();
  // Everything made was destroyed, children before parents (the fake refuses otherwise).
  CHECK(test::live_objects() == 0);
}

TEST_CASE("rdma: one connection's rkey does not reach another connection's slots") {
  rdma_pair p;
  auto victim = rdma::endpoint::receiver(p.dev, small_options(), -1);
  auto own = rdma::endpoint::receiver(p.dev, small_options(), -1);
  REQUIRE(victim);
  REQUIRE(own);
  // A peer that aims its writes, through its own connection's QPs, at another connection's slots.
  auto aim = (*own)->address();
  aim.slots_addr = (*victim)->address().slots_addr;
  aim.rkey = (*victim)->address().rkey;
  auto rogue = rdma::endpoint::sender(p.dev, small_options(), aim, -1);
  REQUIRE(rogue);
  REQUIRE((*own)->connect((*rogue)->address()));
  auto r = (*rogue)->send(bytes_of(100, 1), transport::clock::now() + 2s, nullptr, {});
  CHECK_MESSAGE(contains(test::error_of(r).detail(), "remote access error"), test::error_of(r).detail());
  CHECK(test::counters().write_bytes == 0);
}

TEST_CASE("rdma: a completion error ends the endpoint for good, and the other end notices") {
  rdma_pair p;
  set_knobs([](test::fake_knobs& k) { k.fail_write_after = 2; });
  auto [sent, got] = p.transfer({bytes_of(4096 * 3, 1)});
  REQUIRE_FALSE(sent);
  CHECK_MESSAGE(contains(sent.error().detail(), "remote access error"), sent.error().detail());
  CHECK(sent.error().code() == errc::io_error);
  // No third slice, and its credits go to a QP in the error state (or time out).
  REQUIRE_FALSE(got);
  CHECK(got.error().code() == errc::io_error);
  CHECK(p.sender->broken());
  CHECK(p.receiver->broken());
  // Broken is final: the next call fails at once with the first cause.
  auto again = p.sender->send(bytes_of(10, 2), transport::clock::now() + 5s, nullptr, {});
  CHECK(contains(test::error_of(again).detail(), "remote access error"));
}

TEST_CASE("rdma: other completion statuses are named") {
  for (auto [status, words] : {std::pair{IBV_WC_RETRY_EXC_ERR, "retry counter exceeded"},
                               std::pair{IBV_WC_LOC_PROT_ERR, "local protection error"},
                               std::pair{IBV_WC_FATAL_ERR, "fatal device error"}}) {
    rdma_pair p;
    set_knobs([&](test::fake_knobs& k) { k.fail_write_after = 0, k.write_error = status; });
    auto r = p.sender->send(bytes_of(100, 1), transport::clock::now() + 2s, nullptr, {});
    CHECK_MESSAGE(contains(test::error_of(r).detail(), words), test::error_of(r).detail());
  }
}

TEST_CASE("rdma: a QP moved to the error state flushes what was posted") {
  rdma_pair p;
  test::fail_all_qps();
  std::vector<std::byte> out(100);
  auto got = p.receiver->receive(out, transport::clock::now() + 2s, nullptr);
  CHECK_MESSAGE(contains(test::error_of(got).detail(), "flushed"), test::error_of(got).detail());
  auto sent = p.sender->send(bytes_of(100, 1), transport::clock::now() + 2s, nullptr, {});
  CHECK_MESSAGE(contains(test::error_of(sent).detail(), "flushed"), test::error_of(sent).detail());
}

TEST_CASE("rdma: a removed device fails posts and polls") {
  rdma_pair p;
  set_knobs([](test::fake_knobs& k) { k.device_removed = true; });
  auto sent = p.sender->send(bytes_of(100, 1), transport::clock::now() + 2s, nullptr, {});
  CHECK_MESSAGE(contains(test::error_of(sent).detail(), "ibv_post_send failed"), test::error_of(sent).detail());
  std::vector<std::byte> out(100);
  auto got = p.receiver->receive(out, transport::clock::now() + 2s, nullptr);
  CHECK_MESSAGE(contains(test::error_of(got).detail(), "the device is gone"), test::error_of(got).detail());
}

TEST_CASE("rdma: a dead peer: writes vanish (timeout) or its control channel closes") {
  {
    rdma_pair p;
    set_knobs([](test::fake_knobs& k) { k.drop_after = 1; });
    auto start = transport::clock::now();
    auto [sent, got] = p.transfer({bytes_of(4096 * 3, 1)});
    CHECK(contains(test::error_of(sent).detail(), "no completion for"));
    CHECK(contains(test::error_of(got).detail(), "no completion for"));
    CHECK(transport::clock::now() - start < 3s);  // the RDMA timeout (300 ms), not the answer's deadline
  }
  {
    rdma_pair p;
    ::shutdown(p.fds[1], SHUT_RDWR);
    std::vector<std::byte> out(100);
    auto got = p.receiver->receive(out, transport::clock::now() + 5s, nullptr);
    CHECK_MESSAGE(contains(test::error_of(got).detail(), "the control channel closed"), test::error_of(got).detail());
  }
  {
    rdma_pair p;
    std::atomic<bool> stop{true};
    std::vector<std::byte> out(100);
    CHECK(test::error_of(p.receiver->receive(out, transport::clock::now() + 5s, &stop)).code() == errc::cancelled);
  }
}

TEST_CASE("rdma: a sender that breaks the protocol is caught") {
  {
    rdma_pair p;
    set_knobs([](test::fake_knobs& k) { k.bad_imm_after = 1; });
    auto [sent, got] = p.transfer({bytes_of(4096 * 3, 1)});
    CHECK_MESSAGE(contains(test::error_of(got).detail(), "arrived outside the answer"), test::error_of(got).detail());
  }
  {
    rdma_pair p;
    set_knobs([](test::fake_knobs& k) { k.short_write_after = 0; });
    auto [sent, got] = p.transfer({bytes_of(4096 * 2, 1)});
    CHECK_MESSAGE(contains(test::error_of(got).detail(), "has 4095 bytes, not 4096"), test::error_of(got).detail());
  }
  {
    rdma_pair p;
    set_knobs([](test::fake_knobs& k) { k.inflate_credit_after = 0; });
    auto [sent, got] = p.transfer({bytes_of(4096 * 6, 1), bytes_of(4096 * 2, 2)});
    CHECK_MESSAGE(contains(test::error_of(sent).detail(), "slices read of"), test::error_of(sent).detail());
  }
}

TEST_CASE("rdma: setup failures name the verb") {
  {
    fake_verbs_scope fake;
    set_knobs([](test::fake_knobs& k) { k.fail_reg_mr = 1; });
    auto dev = *rdma::open_device(small_options());
    auto r = rdma::endpoint::receiver(dev, small_options(), -1);
    CHECK_MESSAGE(contains(test::error_of(r).detail(), "ibv_reg_mr"), test::error_of(r).detail());
    set_knobs([](test::fake_knobs& k) { k.fail_create_qp = 1; });
    r = rdma::endpoint::receiver(dev, small_options(), -1);
    CHECK_MESSAGE(contains(test::error_of(r).detail(), "ibv_create_qp failed"), test::error_of(r).detail());
    set_knobs([](test::fake_knobs& k) { k.fail_rtr = true; });
    auto recv = rdma::endpoint::receiver(dev, small_options(), -1);
    REQUIRE(recv);
    auto s = rdma::endpoint::sender(dev, small_options(), (*recv)->address(), -1);
    CHECK_MESSAGE(contains(test::error_of(s).detail(), "to RTR"), test::error_of(s).detail());
  }
  {
    rdma_pair p;
    auto addr = p.sender->address();
    addr.qps.pop_back();
    auto fresh = rdma::endpoint::receiver(p.dev, small_options(), -1);
    REQUIRE(fresh);
    CHECK(contains(test::error_of((*fresh)->connect(addr)).detail(), "1 queue pairs, this one 2"));
  }
}
