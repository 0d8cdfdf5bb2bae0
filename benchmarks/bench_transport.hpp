// drun-bench: the bandwidth of drun's peer transports, reported the way perftest's ib_write_bw
// reports (the same columns and units), so that one can be read next to the other on the same
// hardware.
//
//   drun-bench tcp|rdma --server [--port P] [--bind ADDR] [RDMA and TLS options]
//   drun-bench tcp|rdma --client HOST [--port P] [--size BYTES] [--iters N] [--qps N]
//                       [--report-gbits] [--json] [RDMA and TLS options]
//   RDMA: [--device DEV] [--ib-port N] [--gid-index N];  TLS: --cert PEM --key PEM --ca PEM
//
// What is measured is the data path as a peer uses it for pieces: for every message the client
// asks on the TLS 1.3 control channel (mutual certificates, as drun serve and drun fetch do), the
// server answers with its length, and the bytes cross the data path: DATA frames in the TLS
// stream (tcp), or RDMA writes into the client's registered slots under credits (rdma). So the
// figure includes one control round trip per message; ib_write_bw streams writes with none.
//
// The wire is the peer protocol's framing: HELLO/WELCOME, RDMA_SETUP/RDMA_READY, then a
// GET_PIECE whose body is (message size u64, iterations u64) and is answered by that many BODY
// frames, each followed by the message on the data path, each sent when the client asks for it
// with a one-byte DATA frame. Bytes, peak and average bandwidth are per message: MB = 2^20 bytes
// as in perftest, Gb = 10^9 bits (--report-gbits); MsgRate in millions of messages a second.
#pragma once

#include <drun/transport.hpp>

#include <cstdint>
#include <functional>
#include <string>

namespace drun::bench {

inline constexpr int exit_ok = 0, exit_usage = 2, exit_failed = 3;

struct usage_error {
  std::string message;
};
// A run that could not be done; status is the exit status (2: no RDMA here, 3: it failed).
struct failure {
  std::string message;
  int status;
};

struct options {
  std::string transport;      // tcp | rdma
  bool server = false;
  std::string host;           // client: the server to connect to
  std::string bind = "0.0.0.0";
  std::string port = "18515"; // perftest's default; "0" picks a free one
  std::uint64_t size = std::uint64_t{1} << 20;
  std::uint64_t iters = 1000;
  unsigned qps = 1;
  bool gbits = false, json = false;
  std::string cert, key, ca;
  rdma_options rdma;
  // Server: called with the port once listening (instead of saying it on stderr).
  std::function<void(std::uint16_t)> on_listening;
};

struct report {
  std::string transport, device, tls, slots;
  unsigned qps = 1;
  std::uint64_t bytes = 0, iterations = 0;
  double seconds = 0;   // all iterations
  double fastest = 0;   // one message, the fastest
};

// Throws usage_error.
options parse(int argc, char** argv);
// One client's run, then returns (as ib_write_bw's server). Throws failure.
void run_server(const options& o);
report run_client(const options& o);
// perftest's columns and units (MB = 2^20 bytes, Gb = 10^9 bits), or one JSON object.
std::string format(const report& r, bool gbits, bool json);

}  // namespace drun::bench
