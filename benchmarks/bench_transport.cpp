// drun-bench's runs and reports (bench_transport.hpp).
#include "bench_transport.hpp"

#include "peer/tls.hpp"
#include "peer/wire.hpp"
#include "transport/rdma.hpp"
#include "transport/transport.hpp"

#include <fmt/format.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace drun::bench {
namespace {

using peer::clock;
using peer::frame;

std::uint64_t number(const std::string& text, const char* what, std::uint64_t lo, std::uint64_t hi) {
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  std::string_view suffix(p, static_cast<std::size_t>(text.data() + text.size() - p));
  unsigned shift = suffix.empty() ? 0 : suffix == "K" ? 10 : suffix == "M" ? 20 : suffix == "G" ? 30 : 99;
  if (ec != std::errc() || p == text.data() || shift == 99 || (shift && v > (UINT64_MAX >> shift)))
    throw usage_error{fmt::format("--{} \"{}\" is not a number", what, text)};
  v <<= shift;
  if (v < lo || v > hi) throw usage_error{fmt::format("--{} must be between {} and {}", what, lo, hi)};
  return v;
}

}  // namespace

options parse(int argc, char** argv) {
  if (argc < 2) throw usage_error{"give tcp or rdma"};
  options o;
  o.transport = argv[1];
  if (o.transport != "tcp" && o.transport != "rdma") throw usage_error{fmt::format("unknown transport \"{}\"", o.transport)};
  const std::map<std::string, bool> takes_value = {
      {"server", false}, {"client", true},  {"port", true},   {"bind", true},    {"size", true},
      {"iters", true},   {"qps", true},     {"report-gbits", false}, {"json", false}, {"device", true},
      {"ib-port", true}, {"gid-index", true}, {"cert", true}, {"key", true},     {"ca", true}};
  std::map<std::string, std::string> seen;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) throw usage_error{fmt::format("unexpected argument \"{}\"", a)};
    std::string name = a.substr(2), value;
    if (auto eq = name.find('='); eq != std::string::npos) value = name.substr(eq + 1), name = name.substr(0, eq);
    auto it = takes_value.find(name);
    if (it == takes_value.end()) throw usage_error{fmt::format("unknown option --{}", name)};
    if (it->second && value.empty()) {
      if (i + 1 >= argc) throw usage_error{fmt::format("--{} needs a value", name)};
      value = argv[++i];
    }
    if (seen.count(name)) throw usage_error{fmt::format("--{} given twice", name)};
    seen[name] = value;
  }
  o.server = seen.count("server") != 0;
  if (o.server == (seen.count("client") != 0)) throw usage_error{"give --server or --client HOST"};
  if (!o.server) o.host = seen["client"];
  // A server may ask for port 0 (the kernel picks a free one, and the "waiting" line names it).
  if (seen.count("port")) o.port = std::to_string(number(seen["port"], "port", o.server ? 0 : 1, 65535));
  if (seen.count("bind")) o.bind = seen["bind"];
  if (seen.count("size")) o.size = number(seen["size"], "size", 1, peer::max_answer);
  if (seen.count("iters")) o.iters = number(seen["iters"], "iters", 1, 100000000);
  if (seen.count("qps")) o.qps = static_cast<unsigned>(number(seen["qps"], "qps", 1, rdma::max_queue_pairs));
  o.gbits = seen.count("report-gbits") != 0;
  o.json = seen.count("json") != 0;
  for (const char* rdma_only : {"device", "ib-port", "gid-index", "qps"})
    if (o.transport == "tcp" && seen.count(rdma_only)) throw usage_error{fmt::format("--{} is for rdma", rdma_only)};
  o.rdma.enabled = o.transport == "rdma";
  o.rdma.queue_pairs = o.qps;
  if (seen.count("device")) o.rdma.device = seen["device"];
  if (seen.count("ib-port")) o.rdma.port = static_cast<unsigned>(number(seen["ib-port"], "ib-port", 1, 255));
  if (seen.count("gid-index")) o.rdma.gid_index = static_cast<int>(number(seen["gid-index"], "gid-index", 0, 255));
  for (const char* tls : {"cert", "key", "ca"})
    if (!seen.count(tls))
      throw usage_error{fmt::format("--{} is required: both ends authenticate each other with certificates from one CA "
                                    "(benchmarks/transport.sh makes a throwaway one)",
                                    tls)};
  o.cert = seen["cert"], o.key = seen["key"], o.ca = seen["ca"];
  return o;
}

namespace {

[[noreturn]] void die(const std::string& what, int status = exit_failed) { throw failure{what, status}; }

template <class T>
T must(result<T> r, const char* what) {
  if (!r) die(fmt::format("{}: {}", what, r.error().message()));
  return std::move(r).value();
}
void must(result<void> r, const char* what) {
  if (!r) die(fmt::format("{}: {}", what, r.error().message()));
}

clock::time_point soon() { return clock::now() + std::chrono::seconds(60); }

std::shared_ptr<rdma::device> device_or_fail(const options& o) {
  if (!o.rdma.enabled) return nullptr;
  auto d = rdma::open_device(o.rdma);
  if (!d) die("RDMA is not available here: " + d.error().detail(), exit_usage);
  return std::move(*d);
}

void fill_pattern(std::vector<std::byte>& b) {
  std::uint32_t x = 2463534242u;
  for (auto& c : b) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    c = static_cast<std::byte>(x);
  }
}

}  // namespace

void run_server(const options& o) {
  auto dev = device_or_fail(o);
  auto ctx = must(peer::server_context(o.cert, o.key, o.ca, true), "TLS");
  auto l = must(peer::tcp_listen(o.bind, o.port, 4), "listen");
  auto port = l.port;
  if (o.on_listening) o.on_listening(port);
  else fmt::print(stderr, "drun-bench {}: waiting for a client on port {}\n", o.transport, port);
  // One run per start, as ib_write_bw's server does.
  pollfd ready{l.fd.get(), POLLIN, 0};
  int fd = ::poll(&ready, 1, -1) == 1 ? ::accept4(l.fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC) : -1;
  if (fd < 0) die(fmt::format("accept: {}", std::strerror(errno)));
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as the peer server does
  peer::tls_stream s(detail::unique_fd(fd), peer::ssl_ptr(SSL_new(ctx.get())));
  must(s.accept(soon(), nullptr), "TLS handshake");
  auto hello = must(peer::read_frame(s, soon(), nullptr), "hello");
  if (static_cast<frame>(hello.type) != frame::hello) die("the client did not say hello");
  peer::writer w;
  w.u16(peer::protocol_version).u16(dev ? peer::feature_rdma : 0);
  must(peer::write_frame(s, frame::welcome, w.view(), soon(), nullptr), "welcome");
  std::unique_ptr<transport::data_path> path = transport::make_tcp_transport(s);
  auto req = must(peer::read_frame(s, soon(), nullptr), "request");
  if (static_cast<frame>(req.type) == frame::rdma_setup) {
    if (!dev) die("the client asked for RDMA, but this is a tcp server");
    auto remote = must(rdma::decode(req.body, true), "RDMA_SETUP");
    auto ep = must(rdma::endpoint::sender(dev, o.rdma, remote, s.fd()), "RDMA setup");
    must(peer::write_frame(s, frame::rdma_ready, rdma::encode(ep->address(), false), soon(), nullptr), "RDMA_READY");
    path = std::move(ep);
    req = must(peer::read_frame(s, soon(), nullptr), "request");
  }
  peer::reader rd(req.body);
  auto size = rd.u64(), iters = rd.u64();
  if (static_cast<frame>(req.type) != frame::get_piece || !size || !iters || !rd.done() || *size == 0 ||
      *size > peer::max_answer)
    die("the client's request is malformed");
  std::vector<std::byte> buf(static_cast<std::size_t>(*size));
  fill_pattern(buf);
  peer::writer body;
  body.u64(*size);
  for (std::uint64_t i = 0; i < *iters; ++i) {
    auto ask = must(peer::read_frame(s, soon(), nullptr), "the client's next request");
    if (static_cast<frame>(ask.type) != frame::data) die("the client's request is malformed");
    must(peer::write_frame(s, frame::body, body.view(), soon(), nullptr), "answer");
    must(path->send(buf, soon(), nullptr, {}), "sending");
  }
  if (!o.on_listening)
    fmt::print(stderr, "drun-bench {}: sent {} messages of {} bytes over {}\n", o.transport, *iters, *size, path->kind());
}

report run_client(const options& o) {
  auto dev = device_or_fail(o);
  auto ctx = must(peer::client_context(o.ca, o.cert, o.key), "TLS");
  auto fd = must(peer::tcp_connect(o.host, o.port, clock::now() + std::chrono::seconds(10)), "connect");
  peer::tls_stream s(std::move(fd), peer::ssl_ptr(SSL_new(ctx.get())));
  must(s.connect(o.host, soon(), nullptr), "TLS handshake");
  peer::writer hello;
  hello.text(peer::protocol_magic).u16(peer::protocol_version).u16(0);
  must(peer::write_frame(s, frame::hello, hello.view(), soon(), nullptr), "hello");
  auto welcome = must(peer::read_frame(s, soon(), nullptr), "welcome");
  peer::reader wr(welcome.body);
  auto version = wr.u16(), features = wr.u16();
  if (static_cast<frame>(welcome.type) != frame::welcome || !version || !features) die("the server did not welcome us");
  std::unique_ptr<transport::data_path> path = transport::make_tcp_transport(s);
  std::string device_name = "-";
  if (dev) {
    if (!(*features & peer::feature_rdma)) die("the server offers no RDMA (start it with drun-bench rdma --server)");
    auto ep = must(rdma::endpoint::receiver(dev, o.rdma, s.fd()), "RDMA setup");
    must(peer::write_frame(s, frame::rdma_setup, rdma::encode(ep->address(), true), soon(), nullptr), "RDMA_SETUP");
    auto ready = must(peer::read_frame(s, soon(), nullptr), "RDMA_READY");
    if (static_cast<frame>(ready.type) != frame::rdma_ready) die("the server refused RDMA");
    must(ep->connect(must(rdma::decode(ready.body, false), "RDMA_READY")), "RDMA connect");
    device_name = fmt::format("{} port {} (GID index {})", dev->name(), dev->port(), dev->gid_index());
    path = std::move(ep);
  }
  peer::writer req;
  req.u64(o.size).u64(o.iters);
  must(peer::write_frame(s, frame::get_piece, req.view(), soon(), nullptr), "request");
  std::vector<std::byte> buf(static_cast<std::size_t>(o.size)), expected(buf.size());
  fill_pattern(expected);
  std::array<std::byte, 1> next{};
  double best = 1e300;
  auto start = clock::now();
  for (std::uint64_t i = 0; i < o.iters; ++i) {
    auto t0 = clock::now();
    must(peer::write_frame(s, frame::data, next, soon(), nullptr), "asking");
    auto head = must(peer::read_frame(s, soon(), nullptr), "answer");
    peer::reader rd(head.body);
    if (static_cast<frame>(head.type) != frame::body || rd.u64() != o.size) die("the server's answer is malformed");
    must(path->receive(buf, soon(), nullptr), "receiving");
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count());
    // The bytes are what the server sent: checked on the first and last message (not timed
    // apart: a memcmp of one message is noise next to moving it).
    if ((i == 0 || i + 1 == o.iters) && buf != expected) die("the bytes that arrived are not the ones sent");
  }
  report r;
  r.transport = path->kind();
  r.device = device_name;
  r.tls = s.protocol();
  r.qps = dev ? o.qps : 1;
  r.slots = dev ? fmt::format("{} x {} bytes", o.rdma.slot_count, o.rdma.slot_size) : std::string("-");
  r.bytes = o.size;
  r.iterations = o.iters;
  r.seconds = std::chrono::duration<double>(clock::now() - start).count();
  r.fastest = best;
  return r;
}

std::string format(const report& r, bool gbits, bool json) {
  double bytes = static_cast<double>(r.bytes);
  double unit = gbits ? 1e9 / 8 : 1048576.0;
  double peak = bytes / r.fastest / unit, average = bytes * static_cast<double>(r.iterations) / r.seconds / unit;
  double rate = static_cast<double>(r.iterations) / r.seconds / 1e6;
  const char* units = gbits ? "Gb/sec" : "MB/sec";
  if (json)
    return fmt::format("{{\"transport\": \"{}\", \"device\": \"{}\", \"qps\": {}, \"bytes\": {}, \"iterations\": {}, "
                       "\"bw_peak\": {:.2f}, \"bw_average\": {:.2f}, \"units\": \"{}\", \"msg_rate_mpps\": {:.6f}, "
                       "\"seconds\": {:.6f}, \"tls\": \"{}\"}}\n",
                       r.transport, r.device, r.qps, r.bytes, r.iterations, peak, average, units, rate, r.seconds, r.tls);
  bool rdma = r.transport == "rdma";
  std::string line(87, '-');
  std::string out = line + "\n";
  out += fmt::format("                    {} BW Test (drun peer transport)\n", rdma ? "RDMA_Write" : "TCP+TLS");
  out += fmt::format(" Transport       : {:<16}Device         : {}\n", r.transport, r.device);
  out += fmt::format(" Number of qps   : {:<16}Control channel: {}\n", r.qps, r.tls);
  out += fmt::format(" Connection type : {:<16}Slot size      : {}\n", rdma ? "RC" : "TCP", r.slots);
  out += line + "\n";
  out += fmt::format(" #bytes     #iterations    BW peak[{}]    BW average[{}]   MsgRate[Mpps]\n", units, units);
  out += fmt::format(" {:<7}    {:<7}          {:<7.2f}            {:<7.2f}\t\t   {:<7.6f}\n", r.bytes, r.iterations, peak,
                     average, rate);
  out += line + "\n";
  return out;
}

}  // namespace drun::bench
