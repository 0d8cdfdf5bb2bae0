// The data path of one peer connection: how an answer's bytes cross once the TLS control channel
// has announced their length (a BODY frame). TCP+TLS sends them as DATA frames in the TLS stream;
// RDMA writes them into the fetching end's registered slots (transport/rdma.hpp). The peer
// server and client pick one per connection and otherwise do not care which.
#pragma once

#include <drun/error.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>

namespace drun::peer {
class tls_stream;
}

namespace drun::transport {

using clock = std::chrono::steady_clock;
// Called before each chunk is sent with its size; may sleep (the server's upload limit).
using pace_fn = std::function<void(std::size_t)>;

// Not thread safe: one connection, one request at a time, as the protocol is.
class data_path {
 public:
  virtual ~data_path() = default;
  virtual const char* kind() const noexcept = 0;  // "tcp+tls" or "rdma"
  // Moves exactly bytes.size() bytes to the other end, which expects that many. Time spent in
  // pace does not count against the deadline. Errors: io_error, cancelled (stop set).
  virtual result<void> send(std::span<const std::byte> bytes, clock::time_point deadline, const std::atomic<bool>* stop,
                            const pace_fn& pace) = 0;
  // Fills out exactly. Errors: io_error (also the other end breaking the protocol), cancelled.
  virtual result<void> receive(std::span<std::byte> out, clock::time_point deadline, const std::atomic<bool>* stop) = 0;
  // One answer may be sent in several send() calls, each but the last a multiple of this many
  // bytes, and the receiver's single receive() sees the same thing.
  virtual std::size_t send_granule() const noexcept { return 1; }
};

// DATA frames of at most 1 MiB inside the TLS stream, which must outlive the data path.
std::unique_ptr<data_path> make_tcp_transport(peer::tls_stream& stream);

}  // namespace drun::transport
