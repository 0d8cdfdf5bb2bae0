// The process's operational metrics: what the fetch sessions, stores, peer servers and
// transports of this process did, in the Prometheus text exposition format (version 0.0.4).
//
// Every figure is process-wide and kept in relaxed atomics, so counting costs the data path
// nothing measurable. No label comes from input an attacker or a fleet controls: sources are
// counted by kind (origin, peer, rdma), refusals by reason, never by address, subject or token.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace drun {

// The exposition text: # HELP, # TYPE and samples of every drun_ metric, including zeros (a
// counter that exists from the start makes increase() and absent() rules work).
DRUN_API std::string metrics_text();

// Writes metrics_text() to `file` atomically (a temporary file in the same directory, fsynced,
// renamed over it, mode 0644): the convention of node_exporter's textfile collector, which must
// never read a half-written file. Errors: io_error, not_found (no such directory).
DRUN_API result<void> write_metrics_file(const std::filesystem::path& file);

// Serves GET /metrics over plain HTTP on ADDR:PORT, from a thread of its own, until destroyed.
// Requests are bounded (8 KiB, 2 s); anything but GET /metrics is answered 404 or 405, and a
// connection gets one response. The metrics hold no secret, but they do describe the node:
// the default is loopback, and another address has to be named.
class DRUN_API metrics_server {
 public:
  // `listen`: "PORT" (on 127.0.0.1), or "ADDR:PORT"/"[ADDR]:PORT"; port 0 picks a free one.
  // Errors: invalid_argument (the address), io_error (cannot listen).
  static result<metrics_server> start(const std::string& listen);

  ~metrics_server();
  metrics_server(metrics_server&&) noexcept;
  metrics_server& operator=(metrics_server&&) noexcept;

  std::uint16_t port() const noexcept;
  const std::string& address() const noexcept;  // ADDR:PORT as bound, for logs and scrape configs

 private:
  struct impl;
  explicit metrics_server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace drun
