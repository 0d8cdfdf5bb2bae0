// drun-bench's client and server, run in one process over the fake verbs fabric (rdma) and over
// loopback (tcp): the reports come out in ib_write_bw's columns with figures that add up, and
// the bytes that arrive are the ones sent.
#include "bench_transport.hpp"
#include "fake_verbs.hpp"
#include "support.hpp"

#include <future>
#include <sstream>
#include <thread>

using namespace drun;

namespace {

// Runs a server on a thread and a client against it; the client's report.
bench::report run_pair(bench::options o) {
  test::test_pki pki;
  o.cert = pki.file("node.pem"), o.key = pki.file("node.key"), o.ca = pki.file("ca.pem");
  o.bind = "127.0.0.1";
  o.port = "0";
  std::promise<std::uint16_t> listening;
  auto server_options = o;
  server_options.server = true;
  server_options.on_listening = [&](std::uint16_t port) { listening.set_value(port); };
  std::exception_ptr server_failed;
  std::thread server([&] {
    try {
      bench::run_server(server_options);
    } catch (...) {
      server_failed = std::current_exception();
    }
  });
  o.port = std::to_string(listening.get_future().get());
  o.host = "127.0.0.1";
  bench::report r;
  try {
    r = bench::run_client(o);
  } catch (const bench::failure& f) {
    server.join();
    FAIL(f.message);
  }
  server.join();
  if (server_failed) std::rethrow_exception(server_failed);
  return r;
}

// The row under perftest's header: bytes, iterations, peak, average, message rate.
std::vector<double> row_of(const std::string& text, const std::string& header) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line == header) break;
  REQUIRE_MESSAGE(in, "no header line in\n" << text);
  std::getline(in, line);
  std::istringstream fields(line);
  std::vector<double> v;
  for (double x; fields >> x;) v.push_back(x);
  return v;
}

}  // namespace

TEST_CASE("drun-bench rdma: a run over the fake fabric reports like ib_write_bw") {
  test::fake_verbs_scope fake;
  bench::options o;
  o.transport = "rdma";
  o.rdma.enabled = true;
  o.rdma.queue_pairs = o.qps = 3;
  o.size = 1 << 20;
  o.iters = 20;
  auto r = run_pair(o);
  CHECK(r.transport == "rdma");
  CHECK(r.device == "fake0 port 1 (GID index 0)");
  CHECK(r.qps == 3);
  // Every message went through the fabric, slice by slice (the client checked the bytes).
  CHECK(test::counters().write_bytes == std::uint64_t{20} << 20);
  CHECK(test::counters().writes == 20 * 4);  // 1 MiB in 256 KiB slots
  auto text = bench::format(r, false, false);
  MESSAGE("drun-bench rdma over the fake fabric (the figures are memcpy's, not a NIC's):\n" << text);
  CHECK(text.find("RDMA_Write BW Test (drun peer transport)") != std::string::npos);
  CHECK(text.find(" Connection type : RC") != std::string::npos);
  auto row = row_of(text, " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]");
  REQUIRE(row.size() == 5);
  CHECK(row[0] == 1048576);
  CHECK(row[1] == 20);
  CHECK(row[2] >= row[3]);
  CHECK(row[3] == doctest::Approx(row[4] * 1e6).epsilon(0.01));  // 1 MiB messages: MB/s = messages/s
  auto gbits = bench::format(r, true, false);
  auto grow = row_of(gbits, " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]");
  CHECK(grow[3] == doctest::Approx(row[3] * 1048576 * 8 / 1e9).epsilon(0.01));
  CHECK(bench::format(r, false, true).find("\"transport\": \"rdma\", \"device\": \"fake0 port 1 (GID index 0)\", \"qps\": 3") !=
        std::string::npos);
}

TEST_CASE("drun-bench tcp: a loopback run reports the TLS it used") {
  bench::options o;
  o.transport = "tcp";
  o.size = 65536;
  o.iters = 50;
  auto r = run_pair(o);
  CHECK(r.transport == "tcp+tls");
  CHECK(r.tls.rfind("TLSv1.3 ", 0) == 0);
  CHECK(r.iterations == 50);
  CHECK(r.fastest > 0);
  CHECK(r.fastest * 50 <= r.seconds);
}

TEST_CASE("drun-bench rdma without a device is refused with exit status 2") {
  test::fake_verbs_scope fake;
  test::set_knobs([](test::fake_knobs& k) { k.devices = 0; });
  bench::options o;
  o.transport = "rdma";
  o.rdma.enabled = true;
  try {
    bench::run_client(o);
    FAIL("no failure");
  } catch (const bench::failure& f) {
    CHECK(f.status == 2);
    CHECK(f.message == "RDMA is not available here: libibverbs lists no RDMA device");
  }
}
