// The metrics registry behind include/drun/metrics.hpp: one process-wide set of fixed metrics.
// The set is closed on purpose. Labels are small enums, so no input can add a series, and a
// sample is one relaxed atomic add on the hot path.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace drun {
class error;
}

namespace drun::metrics {

// Where fetched bytes came from. A peer's pieces that moved over RDMA count as rdma.
enum class source_kind : unsigned { origin, peer, rdma, count_ };
// Why the peer server turned a connection away before serving it.
enum class refusal : unsigned { limit, tls, authorization, address, count_ };
// Why a bearer token was refused (verify_token's checks, in their order).
enum class token_failure : unsigned { malformed, signature, expired, audience, issuer, binding, count_ };
// Which check refused a token, from verify_token's error (src/auth/token.cpp, next to its messages).
token_failure token_failure_of(const drun::error& e) noexcept;
enum class fetch_result : unsigned { ok, failed, cancelled, count_ };

class counter {
 public:
  void add(std::uint64_t n = 1) noexcept { v_.fetch_add(n, std::memory_order_relaxed); }
  std::uint64_t value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> v_{0};
};

class gauge {
 public:
  void add(std::int64_t n) noexcept { v_.fetch_add(n, std::memory_order_relaxed); }
  std::int64_t value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> v_{0};
};

// One counter per value of an enum label.
template <class E>
class labeled {
 public:
  counter& operator[](E e) noexcept { return c_[static_cast<std::size_t>(e)]; }
  const counter& operator[](E e) const noexcept { return c_[static_cast<std::size_t>(e)]; }

 private:
  std::array<counter, static_cast<std::size_t>(E::count_)> c_{};
};

// Seconds, in fixed buckets from 10 ms to 1 h: a fetch takes from a cached no-op to a large
// model over a slow link.
class histogram {
 public:
  static constexpr std::array<double, 12> bounds{0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600};
  void observe(double seconds) noexcept;
  // Cumulative counts per bound, then the +Inf count, the sum and the count, read consistently
  // enough for a scrape (each is monotonic; a scrape racing an observation may see it in part).
  std::array<std::uint64_t, bounds.size()> cumulative() const noexcept;
  double sum() const noexcept { return static_cast<double>(sum_us_.load(std::memory_order_relaxed)) / 1e6; }
  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<std::uint64_t>, bounds.size()> buckets_{};  // not cumulative
  std::atomic<std::uint64_t> sum_us_{0}, count_{0};
};

struct registry {
  // fetch sessions
  labeled<source_kind> fetch_bytes, fetch_pieces, fetch_rejected;
  counter fetch_retries, peers_banned, peers_dropped;
  labeled<fetch_result> fetches;
  histogram fetch_duration;
  // stores
  counter store_pieces_sealed, store_seal_failures, store_open_failures, store_scrub_findings, store_gc_evictions,
      store_key_rotations;
  // peer servers
  gauge peer_connections;
  counter peer_connections_total, peer_requests, peer_pieces_served, peer_bytes_served, peer_denials,
      peer_protocol_errors, peer_busy_answers;
  labeled<refusal> peer_refused;
  labeled<token_failure> token_failures;
  // RDMA
  counter rdma_bytes_served, rdma_fallbacks;
  // the audit log
  counter audit_records, audit_write_failures;
};

registry& global() noexcept;

// A store's holdings, gathered when metrics are read (they are a property of the store, not of
// this process's activity). Stores register themselves while open.
struct store_usage {
  std::uint64_t pieces = 0, bytes = 0;
};
using usage_fn = std::function<store_usage()>;
// Returns a handle for remove_store_collector.
std::uint64_t add_store_collector(usage_fn fn);
void remove_store_collector(std::uint64_t handle) noexcept;

// What the /metrics endpoint makes of a request: the bytes it read, up to the blank line that
// ends the header (or up to its bound when none came).
enum class scrape_request { get, head, too_large, bad_request_line, not_found, not_allowed };
scrape_request judge_scrape_request(std::string_view request) noexcept;

}  // namespace drun::metrics
