// The fetch session: bring every missing piece of a verified artifact from its sources into the
// store. Each piece is checked against the signed manifest before it is sealed; a piece that
// fails is charged to the source that sent it and tried again elsewhere or later.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/manifest.hpp>
#include <drun/source.hpp>
#include <drun/store.hpp>
#include <drun/verify.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace drun {

// Where a fetch stands, handed to fetch_options::progress after every stored piece.
struct fetch_progress {
  std::uint64_t bytes_done = 0, bytes_total = 0;  // of the pieces this fetch has to bring
  std::size_t pieces_done = 0, pieces_total = 0;
  double bytes_per_second = 0;                    // since the fetch began
  double seconds_left = 0;                        // at that rate; 0 when unknown
};
using fetch_progress_callback = std::function<void(const fetch_progress&)>;

// Sources are peers (is_peer()) or origins. Pieces go to peers first, rarest first among the
// peers that hold them, to the least busy holder; pieces no peer holds go to the origins. A peer
// whose bytes do not match the signature is banned for the session; a peer that fails repeatedly
// (dead, unreachable) is dropped and its pieces go elsewhere.
struct fetch_options {
  unsigned connections = 8;                            // pieces in flight
  unsigned per_peer = 4;                               // pieces in flight to one peer
  unsigned attempts_per_piece = 6;                     // origin failures and mismatches per piece
  // Doubled per attempt, with jitter (each wait between half and all of it): with 6 attempts an
  // origin has 8 to 15 s to come back (a restart, a failover) before a piece fails.
  std::chrono::milliseconds first_backoff{500};
  std::uint64_t memory_budget = std::uint64_t{192} << 20;  // piece buffers, whatever the model size
  std::uint64_t max_bytes_per_second = 0;              // for the whole fetch; 0: unlimited
  // Called from worker threads, one call at a time; it should return quickly.
  fetch_progress_callback progress;
  // Set from another thread (or a signal handler) to stop: transfers in flight are abandoned,
  // what was stored stays stored, and fetch() returns errc::cancelled.
  const std::atomic<bool>* cancel = nullptr;
  // How often peers are asked what they hold (a leecher's holdings grow while it fetches).
  std::chrono::milliseconds peer_refresh{500};
  // With no origin, how long to wait for some peer to hold a missing piece before giving up.
  std::chrono::milliseconds peer_wait{30000};
  // Swarms started together: which node takes which piece from the origins, so that the origins
  // send each piece about once. Piece i belongs to origin_owners[i % size]: a source index (a
  // peer), or fetch_self for this node. A node takes another's piece from an origin only once that
  // peer is gone, its holdings stopped growing (for four times this node's slowest origin piece,
  // and at least peer_wait / 6), or after peer_wait; and one piece at a time per origin, so that
  // pieces become tradeable early. Empty: every node takes any piece no peer holds.
  std::vector<std::size_t> origin_owners;
  // Where to write the artifact's files as well (created; must not exist or be empty): each
  // verified piece goes there as it arrives, through a staging directory, and the files move into
  // place only when every piece is verified (store::begin_export). Empty: the store only.
  std::filesystem::path out;
  export_modes out_modes = export_modes::owner_only;
  // W3C traceparent of the caller's trace (trace.hpp); empty: the calling thread's trace_scope,
  // else a new trace. A malformed one is invalid_argument.
  std::string traceparent;
};

inline constexpr std::size_t fetch_self = static_cast<std::size_t>(-1);

// The origin_owners of a node in a swarm: every member's address (this node's own among them;
// the same list on every node), this node's address, and the address of each of its sources
// (empty for origins). Members without a source are skipped.
DRUN_API std::vector<std::size_t> swarm_origin_owners(std::vector<std::string> members, const std::string& self,
                                                      const std::vector<std::string>& source_addresses);

struct source_tally {
  std::string source;
  std::size_t pieces = 0;      // delivered intact
  std::uint64_t bytes = 0;
  std::size_t rejected = 0;    // delivered bytes that did not match the signed digest
  std::size_t errors = 0;      // network or HTTP failures
  bool peer = false;
  bool banned = false;         // a peer that sent bytes that do not match: not asked again
  bool dropped = false;        // a peer that kept failing or refused us: not asked again
};

struct fetch_report {
  std::size_t fetched = 0;
  std::size_t already_stored = 0;
  std::uint64_t bytes = 0;
  std::vector<source_tally> sources;
};

// Blocks until every piece is stored, a piece has exhausted its attempts, or cancel is set.
// Errors: digest_mismatch (a piece no source delivered intact: exit 1), io_error (sources kept
// failing: exit 3), cancelled, invalid_argument (no sources), and the store's errors.
DRUN_API result<fetch_report> fetch(store& s, const verified_manifest& m, std::string_view bundle_json,
                                    const std::vector<std::unique_ptr<source>>& sources,
                                    const fetch_options& options = {});

}  // namespace drun
